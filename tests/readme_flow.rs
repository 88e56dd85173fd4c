//! End to end across both crates, as the README tells a newcomer: the server on a SQLite file
//! against the fake Asterisk, a token from the password grant, a call placed, its states
//! followed through Server-Sent Events to the end, and the call read back.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use ivr_core::fake::{FakeAsterisk, FakeConfig};
use ivr_server::app::App;
use ivr_server::settings::Settings;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("{what}: no result within {WAIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_flow_places_a_call_and_follows_it_to_its_end() {
    let fake = FakeAsterisk::start_with(FakeConfig { time_scale: 0.05, ..FakeConfig::default() }).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vars: HashMap<&str, String> = HashMap::from([
        ("DATABASE_URL", format!("sqlite://{}", dir.path().join("ivr.db").display())),
        ("SECRET_KEY", "readme-flow-secret-key-0123456789abcdef".to_owned()),
        ("ARI_HTTP_URL", fake.http_url()),
        ("ARI_USERNAME", fake.username().to_owned()),
        ("ARI_PASSWORD", fake.password().to_owned()),
        ("BCRYPT_COST", "4".to_owned()),
    ]);
    let settings = Settings::load(&|name: &str| vars.get(name).cloned()).expect("settings");
    let app = within("build", App::build(&settings)).await.expect("the app");
    app.state.users().expect("a database").add("demo", "demo-password").await.unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    // Mounted as `ivr-server` and the demo mount it: App::run until the shutdown signal.
    let manager = app.manager().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run(listener, async { stopped.await.unwrap_or(()) }));
    within("ready", async {
        while !manager.is_connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let http = reqwest::Client::new();

    // 1. A token for the demo user.
    let token: Value = within(
        "token",
        http.post(format!("{base}/api/v1/token"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("grant_type=password&username=demo&password=demo-password")
            .send(),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(token["token_type"], "bearer");
    let bearer = format!("Bearer {}", token["access_token"].as_str().expect("a token"));

    // 2. Place a call: +15550000001 answers after its ring and hangs up after a while.
    let created = within(
        "create",
        http.post(format!("{base}/api/v1/calls"))
            .header("Authorization", &bearer)
            .json(&serde_json::json!({"phone_number": "+15550000001"}))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = created.json().await.unwrap();
    let call_id = created["call_id"].as_str().unwrap().to_owned();
    assert!(location.ends_with(&call_id), "{location}");

    // 3. Its states as Server-Sent Events, until the stream closes with the end.
    let events = within(
        "events",
        http.get(format!("{base}/api/v1/calls/{call_id}/events")).header("Authorization", &bearer).send(),
    )
    .await
    .unwrap();
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let stream = within("the stream to close", events.text()).await.unwrap();
    let statuses: Vec<String> = stream
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str::<Value>(data).unwrap()["status"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(statuses.last().map(String::as_str), Some("completed"), "{stream}");
    assert!(statuses.iter().any(|s| s == "answered"), "{statuses:?}");

    // 4. Read it back.
    let call: Value = within("get", http.get(format!("{base}{location}")).header("Authorization", &bearer).send())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(call["status"], "completed");
    assert_eq!(call["hangup_cause"], 16);
    assert!(call["duration"].as_f64().unwrap() > 0.0);
    assert!(call["ringing_at"].is_string() && call["answered_at"].is_string());

    stop.send(()).unwrap();
    within("server and engine stop", server).await.unwrap().unwrap();
    assert!(!manager.is_connected(), "the engine stopped with the server");
}
