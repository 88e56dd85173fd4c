//! The status path piece by piece: token verification (and a remembered token), the call's
//! JSON, and the whole `GET /api/v1/status/{id}` through the server's service for each store,
//! in-process: hyper's server and client connections over an in-memory pipe
//! (`tokio::io::duplex`), no socket. Each store is measured with the ended calls' answer cache
//! (as deployed) and without it (`STATUS_CACHE_BYTES=0`: the store read, the user check and the
//! JSON every time).
//!
//! `cargo bench --bench status_path`. PostgreSQL is included when `IVR_TEST_DATABASE_URL` is set
//! (a fresh schema is made for the run). `IVR_BENCH_CALLS` (default 10,000) ended calls are
//! seeded per store. (`benches/store_get.rs` has the store `get` among 100,000.)

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use ivr_core::store::conformance::{answered_call_that_ended, postgres_in_fresh_schema};
use ivr_core::{Call, CallId, CallStore, SqlCallStore};
use ivr_server::app::{App, Stores};
use ivr_server::settings::Settings;
use ivr_server::view::CallView;

const SECRET_KEY: &str = "bench-secret-key-0123456789-abcdefghij";
const USER: &str = "bench";

fn calls_to_seed() -> usize {
    std::env::var("IVR_BENCH_CALLS").ok().and_then(|n| n.parse().ok()).unwrap_or(10_000)
}

fn settings(vars: &[(&str, &str)]) -> Settings {
    let mut map: HashMap<&str, &str> =
        [("SECRET_KEY", SECRET_KEY), ("ARI_PASSWORD", "bench"), ("ARI_HTTP_URL", "http://127.0.0.1:1/ari")].into();
    map.extend(vars.iter().copied());
    Settings::load(&move |name: &str| map.get(name).map(|v| v.to_string())).expect("bench settings")
}

fn bench_pieces(c: &mut Criterion) {
    let app = settings(&[("JWT_ISSUER", "ivr"), ("JWT_AUDIENCE", "ivr-api")]);
    let tokens = ivr_server::auth::Tokens::new(&app.auth);
    let token = tokens.issue(USER).expect("token").access_token;
    let cache = ivr_server::cache::TokenCache::new();
    let now = ivr_server::auth::unix_now();
    cache.insert(&token, USER, now + 3600, now);
    let mut group = c.benchmark_group("status_pieces");
    group.bench_function("token_verify", |b| b.iter(|| tokens.verify(&token).expect("valid")));
    group.bench_function("token_remembered", |b| {
        b.iter(|| cache.get(&token, ivr_server::auth::unix_now()).expect("remembered"))
    });
    let call = answered_call_that_ended(1);
    group.bench_function("call_json", |b| b.iter(|| serde_json::to_vec(&CallView::from(&call)).expect("json")));
    group.finish();
}

/// A server for `stores` with `vars`, its client over a pipe, a token and the seeded ids.
struct Rig {
    client: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    token: String,
    ids: Vec<CallId>,
}

async fn rig(stores: Stores, vars: &[(&str, &str)], ids: Vec<CallId>) -> Rig {
    if let Some(users) = &stores.users {
        match users.add(USER, "bench-password").await {
            Ok(()) | Err(ivr_server::users::UserError::Exists(_)) => {}
            Err(e) => panic!("bench user: {e}"),
        }
    }
    let app = App::with_stores(&settings(vars), stores).expect("app");
    let state = app.state.clone();
    let token = state.tokens().issue(USER).expect("token").access_token;
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        // The server's own service (`serve` gives it every request): metrics and access log
        // included, as over a socket.
        let wait = ivr_server::conn::HeadWait::new(&Default::default());
        let caller = ivr_server::server::Caller::new(std::net::Ipv4Addr::LOCALHOST.into(), wait);
        let service = hyper::service::service_fn(move |request| ivr_server::server::respond(&state, &caller, request));
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server_io), service).await;
    });
    let (client, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client_io)).await.expect("handshake");
    tokio::spawn(connection);
    // Keep the app (its stores) alive as long as the run.
    std::mem::forget(app);
    Rig { client, token, ids }
}

async fn seed(store: &dyn CallStore, name: &str, n: usize) -> Vec<CallId> {
    let calls: Vec<Call> = (0..n).map(answered_call_that_ended).collect();
    stream::iter(&calls).map(|c| store.insert(c)).buffer_unordered(32).try_collect::<Vec<()>>().await.expect("seed");
    let _ = writeln!(std::io::stderr(), "{name}: seeded {n} ended calls");
    calls.iter().map(|c| c.call_id).collect()
}

async fn get_status(rig: &mut Rig, id: CallId) -> usize {
    let request = Request::get(format!("/api/v1/status/{id}"))
        .header("host", "bench")
        .header("authorization", format!("Bearer {}", rig.token))
        .body(Empty::new())
        .expect("request");
    rig.client.ready().await.expect("connection");
    let response = rig.client.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.expect("body").to_bytes().len()
}

fn bench_whole_get(c: &mut Criterion) {
    // One thread: the client's and the server's connections run on the thread that waits for
    // the answer. On a runtime with a thread per core the three met on different threads or
    // not, from run to run, and the figure went between 27 and 75 µs with the wakeups.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let n = calls_to_seed();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rigs = Vec::new();
    for cache in ["cached", "uncached"] {
        let bytes = if cache == "cached" { "33554432" } else { "0" };
        let vars = [("STATUS_CACHE_BYTES", bytes)];
        // Memory (DISABLE_DB: no users table).
        let memory = Arc::new(ivr_core::MemoryCallStore::new());
        let ids = rt.block_on(seed(&*memory, "memory", n));
        let stores = Stores { calls: memory, sql: None, users: None };
        rigs.push((format!("memory_{cache}"), rt.block_on(rig(stores, &vars, ids))));
        // SQLite.
        let path = dir.path().join(format!("bench-{cache}.db"));
        let sqlite = rt.block_on(SqlCallStore::open_sqlite(&path)).expect("SQLite");
        let ids = rt.block_on(seed(&sqlite, "sqlite", n));
        let stores = rt.block_on(Stores::on(sqlite, 4)).expect("stores");
        rigs.push((format!("sqlite_{cache}"), rt.block_on(rig(stores, &vars, ids))));
        // PostgreSQL.
        match std::env::var("IVR_TEST_DATABASE_URL") {
            Ok(url) => {
                let pg = rt.block_on(postgres_in_fresh_schema(&url)).expect("PostgreSQL");
                let ids = rt.block_on(seed(&pg, "postgres", n));
                let stores = rt.block_on(Stores::on(pg, 4)).expect("stores");
                rigs.push((format!("postgres_{cache}"), rt.block_on(rig(stores, &vars, ids))));
            }
            Err(_) => eprintln!("postgres: skipped (IVR_TEST_DATABASE_URL is not set)"),
        }
    }
    let mut group = c.benchmark_group(format!("get_status_of_{n}_ended"));
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    for (name, mut rig) in rigs {
        let ids = rig.ids.clone();
        let mut next = 0usize;
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    // A different call each time, spread over all of them.
                    next = (next + 7_919) % ids.len();
                    ids[next]
                },
                |id| rt.block_on(get_status(&mut rig, id)),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench_pieces, bench_whole_get);
criterion_main!(benches);
