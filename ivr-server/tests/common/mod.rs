//! A test server over real TCP on port 0, mounted exactly as `main.rs` mounts it, with logs
//! captured for the whole test binary.

#![allow(dead_code)] // each test binary uses a part of this

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ivr_server::app::{App, Stores};
use ivr_server::settings::{LogFormat, Settings};
use ivr_server::AppState;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Secrets every test uses, so the log check can look for all of them.
pub const SECRET_KEY: &str = "test-secret-key-0123456789-abcdefghij-XYZ";
pub const ARI_PASSWORD: &str = "ari-password-Q7w8e9";
pub const USER: &str = "alice";
pub const PASSWORD: &str = "pa55word-Zx81-alice";

/// The longest any single step of a test may take.
pub const STEP: Duration = Duration::from_secs(20);

/// Awaits `future`, failing the test if it takes longer than [`STEP`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future).await.unwrap_or_else(|_| panic!("{what}: no result within {STEP:?}"))
}

/// Everything logged by this test binary.
pub fn logs() -> String {
    String::from_utf8_lossy(&log_buffer().lock().unwrap()).into_owned()
}

fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUFFER.get_or_init(|| Arc::new(Mutex::new(Vec::new())))
}

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends every log of the binary (debug for ivr, info for the rest) to the capture buffer,
/// as JSON lines, through the server's own subscriber builder.
pub fn capture_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let buffer = Arc::clone(log_buffer());
        let filter = tracing_subscriber::EnvFilter::new("info,ivr_server=debug,ivr_core=debug");
        let subscriber = ivr_server::logging::subscriber(&LogFormat::Json, filter, move || Capture(buffer.clone()));
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
    });
}

/// Which Asterisk the server talks to.
pub enum Ari {
    /// A closed port: every ARI request fails at once (a 502 path), the event loop never runs.
    Down,
    /// This URL, username and password, with the event loop running.
    At { http_url: String, username: String, password: String },
}

/// Which store holds the calls.
pub enum Db {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// DISABLE_DB=true.
    Disabled,
    /// This SQL store (e.g. PostgreSQL in a fresh schema).
    Sql(ivr_core::SqlCallStore),
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub base: String,
    pub state: AppState,
    pub sql: Option<ivr_core::SqlCallStore>,
    stop: watch::Sender<bool>,
    serve: Option<JoinHandle<std::io::Result<()>>>,
    follow: Option<JoinHandle<ivr_core::Result<()>>>,
    /// The status-callback worker, with WEBHOOK_SECRET (as `App::run` runs it).
    webhooks: Option<JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

/// The settings every test starts from; `vars` override or add.
pub fn settings(vars: &[(&str, &str)]) -> Settings {
    let mut map: HashMap<String, String> = [
        ("SECRET_KEY", SECRET_KEY),
        ("ARI_PASSWORD", ARI_PASSWORD),
        ("ARI_HTTP_URL", "http://127.0.0.1:1/ari"),
        ("BCRYPT_COST", "4"),
        ("SHUTDOWN_GRACE_SECONDS", "5"),
        ("CALL_DRAIN_SECONDS", "20"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in vars {
        map.insert(k.to_string(), v.to_string());
    }
    Settings::load(&move |name: &str| map.get(name).cloned()).expect("test settings")
}

impl TestServer {
    pub async fn start(vars: &[(&str, &str)], db: Db, ari: Ari) -> TestServer {
        capture_logs();
        let mut vars: Vec<(&str, &str)> = vars.to_vec();
        let ari_vars;
        if let Ari::At { http_url, username, password } = &ari {
            ari_vars = [("ARI_HTTP_URL", http_url.as_str()), ("ARI_USERNAME", username), ("ARI_PASSWORD", password)];
            vars.extend(ari_vars.iter().copied());
        }
        if matches!(db, Db::Disabled) {
            vars.push(("DISABLE_DB", "true"));
        }
        if matches!(ari, Ari::Down) {
            // Nothing listens: give the originate up at its first failure. And no event loop
            // runs, so no queue is served: every call is dialled at once.
            vars.push(("ORIGINATE_RETRY_SECONDS", "0"));
            vars.push(("MAX_CALLS_PER_SECOND", "0"));
        }
        let settings = settings(&vars);
        let (stores, dir) = match db {
            Db::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("ivr.db").display());
                let sql = within("open sqlite", ivr_core::SqlCallStore::connect(&url)).await.expect("sqlite");
                (within("users", Stores::on(sql, settings.db.bcrypt_cost)).await.expect("stores"), Some(dir))
            }
            Db::Disabled => (within("memory", Stores::open(&settings.db)).await.expect("memory"), None),
            Db::Sql(sql) => (within("users", Stores::on(sql, settings.db.bcrypt_cost)).await.expect("stores"), None),
        };
        let sql = stores.sql.clone();
        let app = App::with_stores(&settings, stores).expect("app");
        if let Some(users) = app.state.users() {
            within("add user", users.add(USER, PASSWORD)).await.expect("add user");
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = watch::channel(false);
        let until = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let follow = match ari {
            Ari::Down => None,
            Ari::At { .. } => Some(tokio::spawn(ivr_server::follow_calls(
                app.manager().clone(),
                until(stopped.clone()),
                settings.call_drain,
            ))),
        };
        let webhooks = app.webhooks.clone().map(|worker| tokio::spawn(worker.run(until(stopped.clone()))));
        let serve = tokio::spawn(ivr_server::serve(listener, app.state.clone(), until(stopped)));
        TestServer {
            addr,
            base: format!("http://{addr}"),
            state: app.state,
            sql,
            stop,
            serve: Some(serve),
            follow,
            webhooks,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A token for `sub`, minted as `ivr-server token --sub` does.
    pub fn mint(&self, sub: &str) -> String {
        self.state.tokens().issue(sub).expect("mint").access_token
    }

    /// A token for the test user through `POST /api/v1/token`.
    pub async fn login(&self) -> String {
        let response = within(
            "token",
            client()
                .post(self.url("/api/v1/token"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("grant_type=password&username={USER}&password={PASSWORD}"))
                .send(),
        )
        .await
        .expect("token request");
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = within("token body", response.json()).await.expect("token json");
        body["access_token"].as_str().expect("access_token").to_owned()
    }

    /// Begins the shutdown and waits for the server (and the manager, if running) to stop.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(serve) = self.serve.take() {
            within("serve to return", serve).await.expect("serve task").expect("serve");
        }
        if let Some(follow) = self.follow.take() {
            within("manager to stop", follow).await.expect("follow task").expect("follow_calls");
        }
        if let Some(webhooks) = self.webhooks.take() {
            within("webhooks to stop", webhooks).await.expect("webhook worker");
        }
    }

    /// Signals shutdown without waiting.
    pub fn begin_shutdown(&self) {
        self.stop.send_replace(true);
    }

    pub async fn serve_stopped(&mut self) {
        if let Some(serve) = self.serve.take() {
            within("serve to return", serve).await.expect("serve task").expect("serve");
        }
    }

    pub async fn follow_stopped(&mut self) {
        if let Some(follow) = self.follow.take() {
            within("manager to stop", follow).await.expect("follow task").expect("follow_calls");
        }
    }
}

/// An HTTP client with a timeout on every request.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(STEP).build().expect("client")
}

/// Sends a request and returns status, headers and the body as JSON (`Null` when empty or not JSON).
pub async fn send(request: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let response = within("request", request.send()).await.expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = within("body", response.bytes()).await.expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, headers, json)
}

/// Asserts an RFC 9457 problem answer with `status`; returns its body.
pub async fn problem(request: reqwest::RequestBuilder, status: u16) -> serde_json::Value {
    let (got, headers, body) = send(request).await;
    assert_eq!(got, status, "body: {body}");
    assert_eq!(headers["content-type"], "application/problem+json", "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert!(body["type"].as_str().is_some_and(|t| t.starts_with("/docs#problem-")), "{body}");
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    assert!(body["detail"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    body
}
