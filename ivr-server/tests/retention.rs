//! Retention: the periodic task (CALL_RETENTION_DAYS) and `ivr-server purge --before DATE`.
//! That every store deletes exactly the right calls is the store conformance suite's
//! (`ivr-core/src/store/conformance/retention.rs`); here is what the server does with it.

mod common;

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ivr_core::store::conformance::new_call;
use ivr_core::{Call, CallId, CallStore, FailureReason, MemoryCallStore, SqlCallStore, Step, Transition};
use ivr_server::retention::{Retention, PURGE_INTERVAL};
use prometheus::Registry;
use time::OffsetDateTime;

/// A call to `number`, created at `created` and, unless `ended` is `None`, ended then.
fn call_at(number: &str, created: OffsetDateTime, ended: Option<OffsetDateTime>) -> Call {
    let mut call = Call::new(CallId::new(), new_call(number), created);
    if let Some(at) = ended {
        call.apply(&Transition::new(Step::Ended { reason_if_unanswered: FailureReason::Busy }, "Dial BUSY").at(at))
            .unwrap();
    }
    call
}

fn days_ago(days: i64) -> OffsetDateTime {
    ivr_core::call::now() - time::Duration::days(days)
}

fn purged_metric(registry: &Registry) -> f64 {
    registry
        .gather()
        .iter()
        .find(|f| f.name() == "ivr_calls_purged_total")
        .map(|f| f.get_metric()[0].get_counter().get_value())
        .expect("ivr_calls_purged_total is registered")
}

/// Yields to the (paused) runtime until `done` holds.
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    within(what, async {
        while !done().await {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_retention_task_purges_at_start_then_every_hour_and_counts() {
    capture_logs();
    let store = Arc::new(MemoryCallStore::new());
    let registry = Registry::new();
    let retention = Retention::new(store.clone(), Duration::from_secs(7 * 86_400), &registry).unwrap();
    let old = call_at("+15550000001", days_ago(10), Some(days_ago(8)));
    let recent = call_at("+15550000002", days_ago(10), Some(days_ago(6)));
    let active = call_at("+15550000003", days_ago(30), None);
    for call in [&old, &recent, &active] {
        store.insert(call).await.unwrap();
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(retention.run(async {
        let _ = stopped.await;
    }));

    until("the purge at start", async || store.get(old.call_id).await.unwrap().is_none()).await;
    assert!(store.get(recent.call_id).await.unwrap().is_some(), "ended 6 days ago: kept for 7");
    assert!(store.get(active.call_id).await.unwrap().is_some(), "not ended: never purged");
    assert_eq!(purged_metric(&registry), 1.0);
    let logs = logs();
    let line = logs.lines().find(|l| l.contains("retention: ended calls deleted")).expect("a log line of the purge");
    assert!(line.contains(r#""purged":1"#), "the line holds the count: {line}");
    assert!(!line.contains("+1555"), "no phone number in the log: {line}");

    // An hour later the next run takes what has aged past the limit since.
    let aged = call_at("+15550000004", days_ago(9), Some(days_ago(7) - time::Duration::seconds(1)));
    store.insert(&aged).await.unwrap();
    tokio::time::sleep(PURGE_INTERVAL / 2).await;
    assert!(store.get(aged.call_id).await.unwrap().is_some(), "no run before the hour is up");
    tokio::time::sleep(PURGE_INTERVAL / 2).await;
    until("the hourly purge", async || store.get(aged.call_id).await.unwrap().is_none()).await;
    assert_eq!(purged_metric(&registry), 2.0);
    assert!(store.get(recent.call_id).await.unwrap().is_some() && store.get(active.call_id).await.unwrap().is_some());

    stop.send(()).unwrap();
    within("the task to stop", task).await.unwrap();
}

#[tokio::test]
async fn the_setting_is_off_by_default_and_app_build_wires_it() {
    let off = ivr_server::app::App::with_stores(&settings(&[]), memory()).unwrap();
    assert!(off.retention.is_none());
    assert!(!ivr_server::metrics::render(off.state.registry()).contains("ivr_calls_purged_total"));
    let on = ivr_server::app::App::with_stores(&settings(&[("CALL_RETENTION_DAYS", "30")]), memory()).unwrap();
    let retention = on.retention.as_ref().expect("CALL_RETENTION_DAYS=30 turns retention on");
    let age = ivr_core::call::now() - retention.cutoff();
    assert!((age - time::Duration::days(30)).abs() < time::Duration::seconds(5), "{age}");
    assert!(ivr_server::metrics::render(on.state.registry()).contains("ivr_calls_purged_total"));
}

fn memory() -> ivr_server::app::Stores {
    ivr_server::app::Stores { calls: Arc::new(MemoryCallStore::new()), sql: None, users: None }
}

/// Runs the built `ivr-server` with `args` on the database at `url`.
async fn ivr_server(url: &str, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ivr-server"));
    command.args(args).env_clear().env("DATABASE_URL", url).env("BCRYPT_COST", "4");
    within("ivr-server to exit", tokio::task::spawn_blocking(move || command.output())).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_before_a_date_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ivr.db").display());
    let store = within("open", SqlCallStore::connect(&url)).await.unwrap();
    let date = |s: &str| ivr_server::retention::parse_cutoff(s).unwrap();
    let before = [
        call_at("+15550000001", date("2025-12-01"), Some(date("2025-12-31T23:59:59Z"))),
        call_at("+15550000002", date("2025-11-01"), Some(date("2025-11-02"))),
    ];
    let kept = [
        call_at("+15550000003", date("2025-12-01"), Some(date("2026-01-01T00:00:00Z"))),
        call_at("+15550000004", date("2025-01-01"), None),
    ];
    for call in before.iter().chain(&kept) {
        store.insert(call).await.unwrap();
    }
    store.pool().close().await;

    let out = ivr_server(&url, &["purge", "--before", "2026-01-01"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2\n", "the count, alone on stdout");
    assert!(stderr.contains("2 call(s) that ended before 2026-01-01T00:00:00Z deleted"), "{stderr}");

    let store = within("reopen", SqlCallStore::connect(&url)).await.unwrap();
    for call in &before {
        assert_eq!(store.get(call.call_id).await.unwrap(), None);
    }
    for call in &kept {
        assert_eq!(store.get(call.call_id).await.unwrap().as_ref(), Some(call));
    }
    store.pool().close().await;

    let again = ivr_server(&url, &["purge", "--before=2026-01-01T00:00:00Z"]).await;
    assert!(again.status.success());
    assert_eq!(String::from_utf8_lossy(&again.stdout), "0\n", "nothing left to purge");

    let bad = ivr_server(&url, &["purge", "--before", "01/01/2026"]).await;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "a bad date is a usage error: {stderr}");
    assert!(stderr.contains(r#"--before "01/01/2026" is not a date"#) && stderr.contains("RFC 3339"), "{stderr}");

    let mut command = Command::new(env!("CARGO_BIN_EXE_ivr-server"));
    command.args(["purge", "--before", "2026-01-01"]).env_clear().env("DISABLE_DB", "true");
    let no_db = within("exit", tokio::task::spawn_blocking(move || command.output())).await.unwrap().unwrap();
    assert!(!no_db.status.success());
    assert!(String::from_utf8_lossy(&no_db.stderr).contains("no database"), "{:?}", no_db);
}
