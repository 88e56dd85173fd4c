//! ARI event ingestion: decode (JSON → `AriEvent`) + route (channel id → call, a hash lookup
//! among the live calls) + interpret (the call's tracker), no store, as events/s.
//!
//! `cargo bench --bench event_ingest`. The events are the recorded ones of
//! `ivr-core/tests/transcripts/` (answered, busy, no answer and rejected calls, over Local and
//! PJSIP channels), each call's channel ids rewritten to its own, and the calls' events
//! interleaved as concurrent calls' are. `decode` (the JSON decoding alone) is the baseline
//! measured in the same run. Set `IVR_BENCH_CALLS` to change the 10,000 live calls.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ivr_core::ari::AriEvent;
use ivr_core::ingest::{EventIngest, Ingested};
use ivr_core::{CallId, Step};
use serde_json::value::RawValue;

/// The recorded calls of the mix: each is one call's event socket texts.
const SCENARIOS: &[&str] = &[
    "answered_app",
    "answered_pjsip",
    "busy",
    "busy_pjsip",
    "no_answer",
    "no_answer_pjsip",
    "rejected",
    "rejected_pjsip",
];

/// One scenario's events, as JSON texts with their members in the recorded order (`type`
/// first, as Asterisk writes it; a `serde_json::Value` would sort them), and the channel id
/// they were recorded with.
fn recorded(scenario: &str) -> (String, Vec<String>) {
    let path = format!("{}/ivr-core/tests/transcripts/{scenario}.jsonl", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut channel_id = None;
    let mut events = Vec::new();
    for line in text.lines() {
        let record: HashMap<&str, &RawValue> = serde_json::from_str(line).unwrap_or_else(|e| panic!("{path}: {e}"));
        let field = |name: &str| record.get(name).map(|v| v.get());
        match field("kind") {
            Some(r#""meta""#) => channel_id = field("channel_id").map(|id| id.trim_matches('"').to_owned()),
            Some(r#""ws""#) => {
                events.push(field("event").unwrap_or_else(|| panic!("{path}: a ws record without an event")).to_owned())
            }
            _ => {}
        }
    }
    (channel_id.unwrap_or_else(|| panic!("{path}: no channel_id")), events)
}

/// `calls` calls cycling through the scenarios, their events interleaved round-robin.
fn workload(calls: usize) -> (Vec<CallId>, Vec<String>) {
    let scenarios: Vec<(String, Vec<String>)> = SCENARIOS.iter().map(|s| recorded(s)).collect();
    let ids: Vec<CallId> = (0..calls).map(|_| CallId::new()).collect();
    let per_call: Vec<Vec<String>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (recorded_id, events) = &scenarios[i % scenarios.len()];
            let ours = id.channel_id(1);
            events.iter().map(|e| e.replace(recorded_id.as_str(), &ours)).collect()
        })
        .collect();
    let longest = per_call.iter().map(Vec::len).max().unwrap_or(0);
    let texts = (0..longest).flat_map(|k| per_call.iter().filter_map(move |events| events.get(k).cloned())).collect();
    (ids, texts)
}

fn bench_ingest(c: &mut Criterion) {
    let calls = std::env::var("IVR_BENCH_CALLS").ok().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let (ids, texts) = workload(calls);

    // The mix means what it should: every call ends, as its recording did.
    let ingest = EventIngest::new(ids.iter().copied());
    let ends = texts
        .iter()
        .filter(|t| {
            matches!(ingest.ingest(t), Ingested::Interpreted { transition: Some(tr), .. } if matches!(tr.step, Step::Ended { .. }))
        })
        .count();
    assert_eq!(ends, calls, "every call of the mix ends once");
    eprintln!("{} events of {calls} calls ({:.1} per call)", texts.len(), texts.len() as f64 / calls as f64);

    let mut group = c.benchmark_group(format!("ingest_{calls}_calls"));
    group.throughput(Throughput::Elements(texts.len() as u64));
    group.sample_size(10);
    group.bench_function("decode", |b| {
        b.iter(|| {
            for text in &texts {
                black_box(AriEvent::parse(black_box(text)).ok());
            }
        })
    });
    group.bench_function("decode_route_interpret", |b| {
        b.iter_batched(
            || EventIngest::new(ids.iter().copied()),
            |ingest| {
                for text in &texts {
                    black_box(ingest.ingest(black_box(text)));
                }
                ingest
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_ingest);
criterion_main!(benches);
