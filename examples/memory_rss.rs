//! Memory of the in-memory store per ended call: fills a `MemoryCallStore` with 100,000 calls
//! that went the whole way (queued, sent, dialled, ringing, answered, completed) and prints the
//! process's resident memory (VmRSS, /proc/self/status) before and after, per call.
//!
//! ```text
//! cargo run --release --example memory_rss [-- CALLS]
//! ```
//!
//! It runs on mimalloc, as ivr-server does. It also checks the bound: a store made to keep
//! half as many ended calls keeps exactly that many, the last to end.

use ivr_core::store::conformance::answered_call_that_ended;
use ivr_core::{CallStore, MemoryCallStore};

// The allocator ivr-server runs on, so the figure is the shipped binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let store = MemoryCallStore::with_max_ended(n);
    let before = rss_kib();
    let mut last = None;
    for i in 0..n {
        let call = answered_call_that_ended(i);
        last = Some(call.call_id);
        store.insert(&call).await.expect("insert");
    }
    let after = rss_kib();
    let json = serde_json::to_vec(&store.get(last.expect("a call")).await.expect("get").expect("kept")).expect("json");
    println!("{n} ended calls: VmRSS {before} KiB before, {after} KiB after");
    println!(
        "{:.0} bytes of RSS per ended call (one call's JSON: {} bytes); goal: at most 1024",
        (after.saturating_sub(before) * 1024) as f64 / n as f64,
        json.len()
    );

    let bounded = MemoryCallStore::with_max_ended(n / 2);
    let mut kept = Vec::new();
    for i in 0..n {
        let call = answered_call_that_ended(i);
        kept.push(call.call_id);
        bounded.insert(&call).await.expect("insert");
    }
    let first_kept = bounded.get(kept[n - n / 2]).await.expect("get").is_some();
    let first_gone = bounded.get(kept[n - n / 2 - 1]).await.expect("get").is_none();
    println!(
        "MEMORY_MAX_CALLS={}: {} calls kept; the oldest kept is there: {first_kept}; the one before it is gone: {first_gone}",
        n / 2,
        bounded.len()
    );
}
