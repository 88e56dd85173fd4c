//! `CallStore::get` of one call among 100,000, for each store.
//!
//! `cargo bench --bench store_get`. PostgreSQL is included when `IVR_TEST_DATABASE_URL` is set
//! (a fresh schema is made for the run). Set `IVR_BENCH_CALLS` to change the 100,000.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use ivr_core::store::conformance::{new_call, postgres_in_fresh_schema};
use ivr_core::{Call, CallId, CallStore, MemoryCallStore, SqlCallStore, Step, Transition};

fn calls_to_seed() -> usize {
    std::env::var("IVR_BENCH_CALLS").ok().and_then(|n| n.parse().ok()).unwrap_or(100_000)
}

/// Inserts `n` calls (each with a few transitions of history) and returns their ids.
async fn seed(store: &dyn CallStore, name: &str, n: usize) -> Vec<CallId> {
    let started = Instant::now();
    let numbers = ["+15550000001", "+15550000002", "+15550000003"];
    let calls: Vec<Call> = (0..n)
        .map(|i| {
            let mut call = Call::new(CallId::new(), new_call(numbers[i % numbers.len()]), ivr_core::call::now());
            call.apply(&Transition::new(Step::Dialing, "originate").channel(format!("PJSIP/{i}@trunk"))).unwrap();
            call.apply(&Transition::new(Step::Ringing, "ChannelStateChange Ringing")).unwrap();
            call
        })
        .collect();
    let mut done = 0;
    for chunk in calls.chunks(10_000) {
        stream::iter(chunk).map(|c| store.insert(c)).buffer_unordered(32).try_collect::<Vec<()>>().await.expect("seed");
        done += chunk.len();
        let _ = writeln!(std::io::stderr(), "{name}: seeded {done}/{n} calls ({:.1?})", started.elapsed());
    }
    calls.iter().map(|c| c.call_id).collect()
}

fn bench_get(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let n = calls_to_seed();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut stores: Vec<(&str, Arc<dyn CallStore>)> = vec![("memory", Arc::new(MemoryCallStore::new()))];
    let sqlite = rt.block_on(SqlCallStore::open_sqlite(&dir.path().join("bench.db"))).expect("SQLite");
    stores.push(("sqlite", Arc::new(sqlite)));
    match std::env::var("IVR_TEST_DATABASE_URL") {
        Ok(url) => {
            stores.push(("postgres", Arc::new(rt.block_on(postgres_in_fresh_schema(&url)).expect("PostgreSQL"))))
        }
        Err(_) => eprintln!("postgres: skipped (IVR_TEST_DATABASE_URL is not set)"),
    }

    let mut group = c.benchmark_group(format!("get_one_of_{n}"));
    for (name, store) in stores {
        let ids = rt.block_on(seed(&*store, name, n));
        let mut next = 0usize;
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    // A different call each time, spread over the whole table.
                    next = (next + 7_919) % ids.len();
                    ids[next]
                },
                |id| rt.block_on(store.get(id)).expect("get").expect("found"),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench_get);
criterion_main!(benches);
