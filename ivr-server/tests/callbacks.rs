//! Status callbacks through the API: a call's changes POSTed to a local receiver, signed, with
//! the call as `GET /api/v1/calls/{id}` shows it; the default events; the deliveries route;
//! and the URLs refused at creation (SSRF).

mod common;

use common::*;
use ivr_core::fake::{FakeAsterisk, FakeConfig};
use ivr_core::webhook::receiver::{Answer, Received, Receiver};
use serde_json::{json, Value};
use std::time::Duration;

const WEBHOOK_SECRET: &str = "whsec-callbacks-test-0123456789";

fn auth(request: reqwest::RequestBuilder, token: &str) -> reqwest::RequestBuilder {
    request.header("authorization", format!("Bearer {token}"))
}

async fn start(receiver: &Receiver) -> (TestServer, FakeAsterisk) {
    let fake =
        within("fake asterisk", FakeAsterisk::start_with(FakeConfig { time_scale: 0.05, ..FakeConfig::default() }))
            .await
            .expect("fake asterisk");
    let ari = Ari::At { http_url: fake.http_url(), username: fake.username().into(), password: fake.password().into() };
    let host = receiver.host();
    let vars = [("WEBHOOK_SECRET", WEBHOOK_SECRET), ("WEBHOOK_ALLOWED_HOSTS", &format!("hooks.example, {host}"))];
    (TestServer::start(&vars, Db::Sqlite, ari).await, fake)
}

/// The signed time, once the signature is checked (with ivr-core's signer: the independent
/// HMAC check is in ivr-core's tests/webhooks.rs).
fn verify(request: &Received) -> i64 {
    let header = request.header("ivr-signature").expect("Ivr-Signature");
    let t: i64 = header.split_once(',').unwrap().0.strip_prefix("t=").unwrap().parse().unwrap();
    assert_eq!(header, ivr_core::webhook::signature_header(WEBHOOK_SECRET.as_bytes(), t, &request.body));
    t
}

async fn create(server: &TestServer, token: &str, body: Value) -> (u16, Value) {
    let (status, _, answer) = send(auth(client().post(server.url("/api/v1/calls")), token).json(&body)).await;
    (status, answer)
}

#[tokio::test]
async fn each_selected_change_is_posted_signed_with_the_call_as_get_shows_it() {
    let receiver = Receiver::start(|_, _| Answer::Status(200)).await.unwrap();
    let (server, fake) = start(&receiver).await;
    let token = server.login().await;
    let url = receiver.url("/hook");

    let every = ["pending", "dialing", "ringing", "answered", "completed", "failed"];
    let (status, created) = create(
        &server,
        &token,
        json!({"phone_number": "+15550000001", "status_callback": url, "status_callback_events": every}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let call_id = created["call_id"].as_str().unwrap().to_owned();
    // The default: the answer and the end (this number is busy: it fails).
    let (status, plain) =
        create(&server, &token, json!({"phone_number": "+15550000002", "status_callback": url})).await;
    assert_eq!(status, 201, "{plain}");
    let (_, _, shown) =
        send(auth(client().get(server.url(&format!("/api/v1/calls/{}", plain["call_id"].as_str().unwrap()))), &token))
            .await;
    assert_eq!(shown["status_callback"], url.as_str());
    assert_eq!(shown["status_callback_events"], json!(["answered", "completed", "failed"]));

    // Every change of the first call's history (Asterisk's events may skip `dialing`), and
    // the second call's failure.
    let stored = within("the call to end", async {
        loop {
            let (_, _, call) = send(auth(client().get(server.url(&format!("/api/v1/calls/{call_id}"))), &token)).await;
            if call["is_completed"] == true {
                return call;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let mut changes: Vec<String> = Vec::new();
    for entry in stored["history"].as_array().unwrap() {
        let status = format!("call.{}", entry["status"].as_str().unwrap());
        if changes.last() != Some(&status) {
            changes.push(status);
        }
    }
    let got = receiver.wait_for(changes.len() + 1, STEP).await;
    let of = |id: &str| -> Vec<Value> { got.iter().map(Received::json).filter(|b| b["call_id"] == id).collect() };
    let types =
        |events: &[Value]| -> Vec<String> { events.iter().map(|e| e["type"].as_str().unwrap().into()).collect() };
    let events = of(&call_id);
    assert_eq!(types(&events), changes);
    assert_eq!(changes.first().map(String::as_str), Some("call.pending"));
    assert!(changes.ends_with(&["call.answered".into(), "call.completed".into()]), "{changes:?}");
    assert_eq!(types(&of(plain["call_id"].as_str().unwrap())), ["call.failed"]);
    for request in &got {
        let t = verify(request);
        assert!((t - time::OffsetDateTime::now_utc().unix_timestamp()).abs() < 60);
        assert_eq!(request.json()["id"], request.header("ivr-event-id").unwrap());
    }
    assert_eq!(events.last().unwrap()["call"], stored, "the last event carries the call as GET shows it");
    for event in &events {
        assert_eq!(event["transition"]["status"], event["call"]["status"]);
        assert_eq!(event["call"].as_object().unwrap().len(), stored.as_object().unwrap().len(), "the same shape");
    }

    // The last attempt's result is stored just after the receiver answered it.
    let deliveries = within("every delivery recorded", async {
        loop {
            let (status, _, deliveries) =
                send(auth(client().get(server.url(&format!("/api/v1/calls/{call_id}/deliveries"))), &token)).await;
            assert_eq!(status, 200, "{deliveries}");
            if deliveries["deliveries"].as_array().unwrap().iter().all(|d| d["state"] != "pending") {
                return deliveries;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let list = deliveries["deliveries"].as_array().unwrap();
    assert_eq!(list.len(), changes.len());
    let ids: Vec<&Value> = events.iter().map(|e| &e["id"]).collect();
    for (delivery, id) in list.iter().zip(ids) {
        assert_eq!(&delivery["event_id"], id);
        assert_eq!((delivery["state"].as_str(), delivery["attempts"].as_u64()), (Some("delivered"), Some(1)));
        assert_eq!(delivery["last_result"], "HTTP 200");
        assert_eq!(delivery["url"], url.as_str());
    }
    // Both calls' deliveries are taken: counted as sent, none left in the outbox.
    let sent = format!("ivr_webhook_deliveries_total{{outcome=\"sent\"}} {}", changes.len() + 1);
    within("the metrics", async {
        loop {
            let text = ivr_server::metrics::render(server.state.registry());
            if text.contains(&sent) && text.contains("ivr_webhook_outbox_depth 0") {
                assert!(text.contains("ivr_webhook_deliveries_total{outcome=\"failed\"} 0"), "{text}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (status, _, _) =
        send(auth(client().get(server.url(&format!("/api/v1/calls/{}/deliveries", uuid::Uuid::new_v4()))), &token))
            .await;
    assert_eq!(status, 404);
    server.shutdown().await;
    fake.shutdown().await;
}

#[tokio::test]
async fn callbacks_to_hosts_not_allowed_are_refused_at_creation() {
    let receiver = Receiver::start(|_, _| Answer::Status(200)).await.unwrap();
    let (server, fake) = start(&receiver).await;
    let token = server.login().await;
    let other_port =
        format!("http://127.0.0.1:{}/x", receiver.host().rsplit(':').next().unwrap().parse::<u16>().unwrap() ^ 1);
    for (callback, events, why) in [
        (json!("http://169.254.169.254/latest/meta-data/"), Value::Null, "WEBHOOK_ALLOWED_HOSTS"),
        (json!("http://localhost:5432/"), Value::Null, "WEBHOOK_ALLOWED_HOSTS"),
        (json!(other_port), Value::Null, "WEBHOOK_ALLOWED_HOSTS"),
        (json!("http://hooks.example.attacker.test/"), Value::Null, "WEBHOOK_ALLOWED_HOSTS"),
        (json!("https://hooks.example/"), Value::Null, "http://"),
        (json!("http://user:pw@hooks.example/"), Value::Null, "credentials"),
        (json!("gopher://hooks.example/"), Value::Null, "http://"),
        (json!("http://hooks.example/"), json!([]), "at least one status"),
        (json!("http://hooks.example/"), json!(["ended"]), "unknown variant"),
    ] {
        let body =
            json!({"phone_number": "+15550000001", "status_callback": callback, "status_callback_events": events});
        let (status, problem) = create(&server, &token, body).await;
        assert_eq!(status, 400, "{callback}: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains(why), "{callback}: {problem}");
    }
    let (status, created) = create(
        &server,
        &token,
        json!({"phone_number": "+15550000001", "status_callback": "http://HOOKS.example:8080/ok"}),
    )
    .await;
    assert_eq!(status, 201, "an allowed host, any port: {created}");
    assert_eq!(fake.originate_count(), 1, "nothing refused was dialled");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(receiver.received().is_empty());
    server.shutdown().await;
    fake.shutdown().await;
}
