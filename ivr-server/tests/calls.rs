//! Live calls through the API against the fake Asterisk: a whole call from POST to
//! `completed` (GET and Server-Sent Events), a busy callee, cancel, idempotent create, the
//! interaction route's options, readiness, and a graceful shutdown mid-call.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use ivr_core::fake::{CalleePlan, FakeAsterisk, FakeConfig};
use serde_json::{json, Value};

/// A fake Asterisk `scale` times the recorded speed, and a server following it.
async fn start(scale: f64, vars: &[(&str, &str)]) -> (TestServer, FakeAsterisk) {
    let fake =
        within("fake asterisk", FakeAsterisk::start_with(FakeConfig { time_scale: scale, ..FakeConfig::default() }))
            .await
            .expect("fake asterisk");
    let ari = Ari::At { http_url: fake.http_url(), username: fake.username().into(), password: fake.password().into() };
    let server = TestServer::start(vars, Db::Sqlite, ari).await;
    // Ready once the event WebSocket is up.
    within("readiness", async {
        loop {
            let (status, _, _) = send(client().get(server.url("/readyz"))).await;
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    (server, fake)
}

fn auth(request: reqwest::RequestBuilder, token: &str) -> reqwest::RequestBuilder {
    request.header("authorization", format!("Bearer {token}"))
}

/// Polls `GET /api/v1/calls/{id}` until the call has ended.
async fn until_ended(server: &TestServer, token: &str, call_id: &str) -> Value {
    within("the call to end", async {
        loop {
            let (status, _, call) =
                send(auth(client().get(server.url(&format!("/api/v1/calls/{call_id}"))), token)).await;
            assert_eq!(status, 200, "{call}");
            if call["is_completed"] == true {
                return call;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Polls until the call reached `status` (or beyond).
async fn until_status(server: &TestServer, token: &str, call_id: &str, wanted: &str) -> Value {
    within("the call to progress", async {
        loop {
            let (_, _, call) = send(auth(client().get(server.url(&format!("/api/v1/calls/{call_id}"))), token)).await;
            if call["status"] == wanted || call["is_completed"] == true {
                return call;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

#[tokio::test]
async fn a_whole_call_from_post_to_completed() {
    let (server, fake) = start(0.05, &[]).await;
    let token = server.login().await;
    let c = client();

    let (status, headers, created) =
        send(auth(c.post(server.url("/api/v1/calls")), &token).json(&json!({"phone_number": "+15550000001"}))).await;
    assert_eq!(status, 201, "{created}");
    let call_id = created["call_id"].as_str().unwrap().to_owned();
    assert_eq!(headers["location"], format!("/api/v1/calls/{call_id}").as_str());
    assert_eq!(created["success"], true);
    assert_eq!(created["phone_number"], "+15550000001");
    assert!(["dialing", "ringing", "answered"].contains(&created["status"].as_str().unwrap()), "{created}");
    let documented = &ivr_server::openapi::spec()["components"]["schemas"]["CreatedCall"]["properties"];
    assert_eq!(keys(documented), keys(&created), "CreatedCall schema vs the answer");

    // The events: the current state, each change, and the end closes the stream.
    let response = within("events", auth(c.get(server.url(&format!("/api/v1/calls/{call_id}/events"))), &token).send())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = within("event stream to close", response.text()).await.unwrap();
    let states: Vec<Value> = text
        .split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let statuses: Vec<&str> = states.iter().map(|s| s["status"].as_str().unwrap()).collect();
    assert_eq!(statuses.last(), Some(&"completed"), "{statuses:?}");
    assert!(statuses.windows(2).all(|w| w[0] != w[1]), "each event is a change: {statuses:?}");

    let call = until_ended(&server, &token, &call_id).await;
    assert_eq!(call["status"], "completed");
    assert_eq!(call["failure_reason"], Value::Null);
    assert!(call["answered_at"].is_string() && call["ended_at"].is_string() && call["dialed_at"].is_string());
    assert!(call["duration"].as_f64().unwrap() > 0.0);
    assert_eq!(call["is_active"], false);
    let history: Vec<&str> =
        call["history"].as_array().unwrap().iter().map(|h| h["status"].as_str().unwrap()).collect();
    assert_eq!(history.first(), Some(&"pending"));
    assert_eq!(history.last(), Some(&"completed"));
    assert!(history.contains(&"answered"), "{history:?}");
    assert_eq!(&call, states.last().unwrap(), "the last event is the stored call");
    let (_, _, via_status) = send(auth(c.get(server.url(&format!("/api/v1/status/{call_id}"))), &token)).await;
    assert_eq!(via_status, call);
    assert_eq!(fake.originate_count(), 1);

    // Listed, with a status filter.
    let (_, _, page) = send(auth(c.get(server.url("/api/v1/calls?status=completed")), &token)).await;
    assert_eq!(page["calls"][0]["call_id"], call_id.as_str());
    server.shutdown().await;
    fake.shutdown().await;
}

#[tokio::test]
async fn busy_callee_fails_with_its_reason_and_cause() {
    let (server, fake) = start(0.05, &[]).await;
    let token = server.mint(USER);
    let (status, _, created) = send(auth(client().post(server.url("/api/v1/interaction/+15550000002")), &token)).await;
    assert_eq!(status, 201, "{created}");
    let call = until_ended(&server, &token, created["call_id"].as_str().unwrap()).await;
    assert_eq!(call["status"], "failed");
    assert_eq!(call["failure_reason"], "busy");
    assert_eq!(call["hangup_cause"], 17);
    assert!(call["hangup_cause_text"].is_string());
    server.shutdown().await;
    fake.shutdown().await;
}

#[tokio::test]
async fn cancel_a_ringing_call() {
    let (server, fake) = start(0.05, &[("MAX_ACTIVE_CALLS", "1")]).await;
    let token = server.mint(USER);
    // Rings for 60 s (recorded time): long enough to cancel.
    fake.set_plan("+15550000042", CalleePlan::NoAnswer { ring_for: Duration::from_secs(600) });
    let body = json!({"phone_number": "+15550000042", "timeout": 600});
    let (status, _, created) = send(auth(client().post(server.url("/api/v1/calls")), &token).json(&body)).await;
    assert_eq!(status, 201, "{created}");
    let call_id = created["call_id"].as_str().unwrap();
    let ringing = until_status(&server, &token, call_id, "ringing").await;
    assert_eq!(ringing["status"], "ringing");
    // The one active call allowed is taken: a second one is refused with Retry-After.
    let second = auth(client().post(server.url("/api/v1/interaction/+15550000005")), &token);
    let (status, headers, _) = send(second.try_clone().unwrap()).await;
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"));
    problem(second, 503).await;
    let (status, _, canceled) =
        send(auth(client().delete(server.url(&format!("/api/v1/calls/{call_id}"))), &token)).await;
    assert_eq!(status, 202, "{canceled}");
    assert_eq!(canceled["call_id"], call_id);
    let call = until_ended(&server, &token, call_id).await;
    assert_eq!((call["status"].as_str(), call["failure_reason"].as_str()), (Some("failed"), Some("canceled")));
    let again = problem(auth(client().delete(server.url(&format!("/api/v1/calls/{call_id}"))), &token), 409).await;
    assert!(again["detail"].as_str().unwrap().contains("already ended"));
    server.shutdown().await;
    fake.shutdown().await;
}

/// An ended call's answer is kept (cache.rs), the same on every read and on both paths, and
/// memory's at-once path (`api::answer_at_once`) lets in no caller the full path would refuse:
/// a 401 without a valid token, and, with USER_CACHE_SECONDS=0, a 401 as soon as the user is
/// disabled (an at-once path that skipped the user check would answer 200). That the at-once
/// answer is the full path's, with the cache on, is checked by the last read of
/// `a_whole_call_from_post_to_completed`.
#[tokio::test]
async fn a_kept_answer_is_served_only_to_whom_the_full_path_would_serve_it() {
    let (server, _fake) = start(0.05, &[("USER_CACHE_SECONDS", "0")]).await;
    let token = server.login().await;
    let (status, _, created) =
        send(auth(client().post(server.url("/api/v1/calls")), &token).json(&json!({"phone_number": "+15550000005"})))
            .await;
    assert_eq!(status, 201, "{created}");
    let call_id = created["call_id"].as_str().unwrap();
    let ended = until_ended(&server, &token, call_id).await;
    for path in [format!("/api/v1/calls/{call_id}"), format!("/api/v1/status/{call_id}")] {
        let (status, _, again) = send(auth(client().get(server.url(&path)), &token)).await;
        assert_eq!((status, &again), (200, &ended), "{path}");
        problem(client().get(server.url(&path)), 401).await;
        problem(auth(client().get(server.url(&path)), &format!("{token}x")), 401).await;
    }
    within("disable", server.state.users().unwrap().set_disabled(USER, true)).await.unwrap();
    problem(auth(client().get(server.url(&format!("/api/v1/status/{call_id}"))), &token), 401).await;
    server.shutdown().await;
}

/// `Server-Timing: ari;dur=MS` on a create is Asterisk's part of the request: at least what the
/// fake took to take the originate, at most the whole request; none on a replay.
#[tokio::test]
async fn a_create_tells_how_long_asterisk_took() {
    let (server, fake) = start(0.05, &[]).await;
    fake.set_originate_delay(Duration::from_millis(200));
    let token = server.mint(USER);
    let post = || {
        auth(client().post(server.url("/api/v1/calls")), &token)
            .header("idempotency-key", "timed-1")
            .json(&json!({"phone_number": "+15550000005"}))
    };
    let started = std::time::Instant::now();
    let (status, headers, created) = send(post()).await;
    let took = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(status, 201, "{created}");
    let timing = headers["server-timing"].to_str().unwrap();
    let ari: f64 = timing.strip_prefix("ari;dur=").and_then(|ms| ms.parse().ok()).unwrap_or_else(|| panic!("{timing}"));
    assert!((200.0..=took).contains(&ari), "ari {ari} ms, the request {took} ms");
    let (status, headers, _) = send(post()).await;
    assert_eq!(status, 201);
    assert!(!headers.contains_key("server-timing"), "a replay waited on no originate");
    server.shutdown().await;
    fake.shutdown().await;
}

#[tokio::test]
async fn idempotent_create_dials_once() {
    let (server, fake) = start(0.05, &[]).await;
    let token = server.mint(USER);
    let post = || {
        auth(client().post(server.url("/api/v1/calls")), &token)
            .header("idempotency-key", "order-4711")
            .json(&json!({"phone_number": "+15550000005"}))
    };
    let (status, headers, first) = send(post()).await;
    assert_eq!(status, 201, "{first}");
    assert!(!headers.contains_key("idempotent-replayed"));
    let (status, headers, second) = send(post()).await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(second["call_id"], first["call_id"]);
    assert_eq!(headers["idempotent-replayed"], "true");
    until_ended(&server, &token, first["call_id"].as_str().unwrap()).await;
    let (_, _, third) = send(post()).await;
    assert_eq!(third["call_id"], first["call_id"]);
    // The same key for another request: refused, and it says why.
    for (body, differs) in [
        (json!({"phone_number": "+15550000001"}), "phone_number"),
        (json!({"phone_number": "+15550000005", "timeout": 5}), "timeout"),
    ] {
        let reused = auth(client().post(server.url("/api/v1/calls")), &token)
            .header("idempotency-key", "order-4711")
            .json(&body);
        let problem = problem(reused, 422).await;
        assert_eq!(problem["type"], "/docs#problem-idempotency-key-reused", "{problem}");
        assert_eq!(problem["call_id"], first["call_id"], "{problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains("different request") && detail.contains(differs), "{detail}");
    }
    assert_eq!(fake.originate_count(), 1, "one call dialed");
    server.shutdown().await;
    fake.shutdown().await;
}

#[tokio::test]
async fn a_burst_beyond_the_rate_is_queued_and_beyond_the_queue_refused() {
    let (server, fake) = start(0.05, &[("MAX_CALLS_PER_SECOND", "2"), ("MAX_QUEUED_CALLS", "2")]).await;
    let token = server.mint(USER);
    let post =
        || auth(client().post(server.url("/api/v1/calls")), &token).json(&json!({"phone_number": "+15550000005"}));
    let mut accepted = Vec::new();
    for expected in ["dialing", "pending", "pending"] {
        let (status, _, created) = send(post()).await;
        assert_eq!(status, 201, "{created}");
        // The first takes the token at once; the next two wait for theirs.
        if expected == "pending" {
            assert_eq!(created["status"], "pending", "{created}");
        } else {
            assert_ne!(created["status"], "pending", "{created}");
        }
        accepted.push(created["call_id"].as_str().unwrap().to_owned());
    }
    let (status, headers, refused) = send(post()).await;
    assert_eq!(status, 503, "{refused}");
    assert_eq!(refused["type"], "/docs#problem-queue-full", "{refused}");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    // The queued calls are dialled in their turn and end as the first did.
    for call_id in &accepted {
        let call = until_ended(&server, &token, call_id).await;
        assert_eq!(call["status"], "completed", "{call}");
    }
    assert_eq!(fake.originate_count(), 3, "the refused call was never dialled");
    server.shutdown().await;
    fake.shutdown().await;
}

#[tokio::test]
async fn interaction_with_options() {
    // Unpaced, so the refused originate below is dialled at once and its 502 is the answer.
    let vars = [("DEFAULT_CALLER_ID", "\"IVR\" <+15559990000>"), ("MAX_CALLS_PER_SECOND", "0")];
    let (server, fake) = start(0.05, &vars).await;
    let token = server.mint(USER);
    let options = json!({
        "audio": "sound:hello-world",
        "timeout": 12,
        "priority": 2,
        "variables": {"CUSTOMER": "42"},
    });
    let (status, headers, created) =
        send(auth(client().post(server.url("/api/v1/interaction/+15550000005")), &token).json(&options)).await;
    assert_eq!(status, 201, "{created}");
    assert!(headers.contains_key("location"));
    let call = until_ended(&server, &token, created["call_id"].as_str().unwrap()).await;
    assert_eq!(call["audio"], "sound:hello-world");
    assert_eq!(call["timeout"], 12);
    assert_eq!(call["priority"], 2);
    assert_eq!(call["caller_id"], "\"IVR\" <+15559990000>");
    assert_eq!(call["status"], "completed");
    // An originate Asterisk refuses: 502 with the stored call's id.
    fake.fail_next_originate(500, json!({"error": "Allocation failed"}));
    let body = problem(auth(client().post(server.url("/api/v1/interaction/+15550000001")), &token), 502).await;
    let failed = until_ended(&server, &token, body["call_id"].as_str().unwrap()).await;
    assert_eq!(failed["failure_reason"], "originate_failed");
    server.shutdown().await;
    fake.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_mid_call() {
    // Recorded timing at a fifth: rings 0.4 s, then the call runs about a second.
    let (mut server, fake) = start(0.2, &[("SHUTDOWN_GRACE_SECONDS", "5"), ("CALL_DRAIN_SECONDS", "20")]).await;
    let token = server.mint(USER);
    // A request in flight when the shutdown begins still gets its answer.
    fake.set_originate_delay(Duration::from_millis(400));
    let in_flight = {
        let request =
            auth(client().post(server.url("/api/v1/calls")), &token).json(&json!({"phone_number": "+15550000001"}));
        tokio::spawn(async move { send(request).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.begin_shutdown();
    let (status, _, created) = within("the in-flight request", in_flight).await.unwrap();
    assert_eq!(status, 201, "{created}");
    server.serve_stopped().await;
    assert!(tokio::net::TcpStream::connect(server.addr).await.is_err(), "no longer accepting");

    // The manager keeps following the live call to its end before it stops.
    server.follow_stopped().await;
    let call_id = created["call_id"].as_str().unwrap().parse().unwrap();
    let call = within("get", server.state.manager().get(call_id)).await.unwrap().unwrap();
    assert_eq!(call.status, ivr_core::CallStatus::Completed, "{:?}", call.history);
    fake.shutdown().await;
}
