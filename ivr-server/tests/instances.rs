//! Several ivr-server processes (the real binary) over one PostgreSQL and one fake Asterisk:
//! calls placed through all of them, one killed with SIGKILL mid-call, and every call followed
//! to its right end exactly once by the survivors, readable, cancellable and watchable (SSE)
//! from each of them. Skipped without IVR_TEST_DATABASE_URL.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ivr_core::fake::{CalleePlan, FakeAsterisk, FakeConfig};
use ivr_core::SqlCallStore;
use ivr_server::users::UserStore;
use serde_json::{json, Value};
use sqlx::Row;

const SECRET_KEY: &str = "instances-secret-key-0123456789-abcdefghij";
const USER: &str = "alice";
const PASSWORD: &str = "pa55word-Zx81-alice";
/// Shared by all the instances: one originate every 200 ms, all of them together.
const CPS: &str = "5";
/// Rings, answers at once, and plays `sound:demo-congrats` (~6 s at the fake's 0.2 scale).
const PLAYS: &str = "+15550000007";
/// Rings for a minute (fake time): ends only when canceled.
const RINGS: &str = "+15550000044";
/// Rings for 6 s, answers and never hangs up: only ivr's hang-up after its audio ends it, so
/// it ends only if whoever follows it at the answer runs the answer action.
const ANSWERS_LATE: &str = "+15550000077";
/// The longest a step may take.
const STEP: Duration = Duration::from_secs(40);

/// One ivr-server process.
struct Node {
    id: String,
    base: String,
    child: Child,
    log: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    url: String,
    fake: FakeAsterisk,
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    http: reqwest::Client,
    token: String,
    db: SqlCallStore,
}

impl Cluster {
    /// A fresh schema, its user, and a fake Asterisk; no process yet.
    async fn new() -> Option<Cluster> {
        let Ok(url) = std::env::var("IVR_TEST_DATABASE_URL") else {
            let _ = writeln!(std::io::stderr(), "skipped: several instances (IVR_TEST_DATABASE_URL is not set)");
            return None;
        };
        let schema = format!("ivr_instances_{}", uuid::Uuid::new_v4().simple());
        let admin = SqlCallStore::connect_without_migrating(&url).await.expect("connect");
        sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(admin.pool()).await.expect("schema");
        admin.pool().close().await;
        let separator = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{separator}options[search_path]={schema}");
        let db = SqlCallStore::connect(&url).await.expect("migrate");
        let users = UserStore::new(&db, 4).expect("users");
        users.migrate().await.expect("users table");
        users.add(USER, PASSWORD).await.expect("user");
        let fake = FakeAsterisk::start_with(FakeConfig { time_scale: 0.2, ..FakeConfig::default() })
            .await
            .expect("fake asterisk");
        fake.set_plan(RINGS, CalleePlan::NoAnswer { ring_for: Duration::from_secs(300) });
        fake.set_plan(
            ANSWERS_LATE,
            CalleePlan::LongCall { ring: Duration::from_secs(30), talk: Duration::from_secs(30_000) },
        );
        let http = reqwest::Client::builder().timeout(STEP).build().expect("client");
        let dir = tempfile::tempdir().expect("temp dir");
        Some(Cluster { url, fake, dir, nodes: Vec::new(), http, token: String::new(), db })
    }

    /// Starts the instance `id` and waits until it is ready (its ARI socket is up).
    async fn start(&mut self, id: &str) -> usize {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().unwrap().port();
        let log = self.dir.path().join(format!("{id}-{}.log", self.nodes.len()));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_ivr-server"))
            .env_clear()
            .envs([
                ("DATABASE_URL", self.url.as_str()),
                ("SECRET_KEY", SECRET_KEY),
                ("ARI_HTTP_URL", &self.fake.http_url()),
                ("ARI_USERNAME", self.fake.username()),
                ("ARI_PASSWORD", self.fake.password()),
                ("LISTEN_ADDR", &format!("127.0.0.1:{port}")),
                ("INSTANCE_ID", id),
                ("INSTANCE_LEASE_SECONDS", "2"),
                ("MAX_CALLS_PER_SECOND", CPS),
                ("BCRYPT_COST", "4"),
                // Long, so that a user locked out within moments is the LISTEN path's doing.
                ("USER_CACHE_SECONDS", "30"),
                ("LOG_FORMAT", "json"),
                ("RUST_LOG", "info"),
            ])
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn ivr-server");
        self.nodes.push(Node { id: id.into(), base: format!("http://127.0.0.1:{port}"), child, log });
        let n = self.nodes.len() - 1;
        self.within(&format!("instance {id} to be ready"), async {
            loop {
                if let Ok(r) = self.http.get(format!("{}/readyz", self.nodes[n].base)).send().await {
                    if r.status() == 200 {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if self.token.is_empty() {
            let response = self
                .http
                .post(format!("{}/api/v1/token", self.nodes[n].base))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("grant_type=password&username={USER}&password={PASSWORD}"))
                .send()
                .await
                .expect("token");
            let body: Value = response.json().await.expect("token json");
            self.token = body["access_token"].as_str().expect("access_token").to_owned();
        }
        n
    }

    /// Awaits `f`, failing with every instance's log if it takes longer than [`STEP`].
    async fn within<T>(&self, what: &str, f: impl std::future::Future<Output = T>) -> T {
        match tokio::time::timeout(STEP, f).await {
            Ok(v) => v,
            Err(_) => panic!("{what}: no result within {STEP:?}\n{}", self.logs()),
        }
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for node in &self.nodes {
            let text = std::fs::read_to_string(&node.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            all += &format!("--- {} ({})\n", node.id, node.log.display());
            for line in tail.into_iter().rev() {
                all += line;
                all.push('\n');
            }
        }
        all
    }

    /// `ivr-server user VERB alice` against the cluster's database.
    fn user(&self, verb: &str) {
        let out = Command::new(env!("CARGO_BIN_EXE_ivr-server"))
            .env_clear()
            .envs([("DATABASE_URL", self.url.as_str()), ("SECRET_KEY", SECRET_KEY), ("BCRYPT_COST", "4")])
            .args(["user", verb, USER])
            .stdin(Stdio::null())
            .output()
            .expect("ivr-server user");
        assert!(out.status.success(), "user {verb}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn kill(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.child.kill().expect("SIGKILL");
        node.child.wait().expect("reaped");
    }

    fn req(&self, method: reqwest::Method, n: usize, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.nodes[n].base)).bearer_auth(&self.token)
    }

    async fn place(&self, n: usize, body: Value) -> String {
        let response = self.req(reqwest::Method::POST, n, "/api/v1/calls").json(&body).send().await.expect("POST");
        let status = response.status();
        let call: Value = response.json().await.expect("call json");
        assert!(status.is_success(), "{status}: {call}");
        call["call_id"].as_str().expect("call_id").to_owned()
    }

    async fn get(&self, n: usize, call_id: &str) -> Value {
        let response =
            self.req(reqwest::Method::GET, n, &format!("/api/v1/calls/{call_id}")).send().await.expect("GET");
        assert_eq!(response.status(), 200, "GET {call_id} from {}", self.nodes[n].id);
        response.json().await.expect("call json")
    }

    /// The instance that follows the call now, by the store.
    async fn owner(&self, call_id: &str) -> Option<String> {
        let row = sqlx::query(
            "SELECT i.instance_id FROM calls c JOIN instances i ON i.lease_id = c.owner \
             WHERE c.call_id = $1 AND i.expires_at > (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT",
        )
        .bind(call_id)
        .fetch_optional(self.db.pool())
        .await
        .expect("owner");
        row.map(|r| r.get::<String, _>("instance_id"))
    }

    fn node(&self, id: &str) -> usize {
        self.nodes.iter().rposition(|n| n.id == id).expect("node")
    }

    /// Reads a call's event stream from instance `n` to its end, on a task of its own.
    fn watch(&self, n: usize, call_id: &str) -> tokio::task::JoinHandle<Vec<Value>> {
        let request = self.req(reqwest::Method::GET, n, &format!("/api/v1/calls/{call_id}/events"));
        tokio::spawn(async move {
            let response = request.send().await.expect("events");
            assert_eq!(response.status(), 200);
            let text = response.text().await.expect("the stream to end");
            text.split("\n\n")
                .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
                .map(|data| serde_json::from_str(data).expect("event json"))
                .collect()
        })
    }

    /// Waits until every call has ended, reading each from instance `n`.
    async fn all_ended(&self, n: usize, calls: &[String]) -> HashMap<String, Value> {
        self.within("every call to end", async {
            loop {
                let mut ended = HashMap::new();
                for id in calls {
                    let call = self.get(n, id).await;
                    if call["is_completed"] == true {
                        ended.insert(id.clone(), call);
                    }
                }
                if ended.len() == calls.len() {
                    return ended;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
    }

    /// Each call ended once, dialled once, and as its plan says.
    fn check_ends(&self, ended: &HashMap<String, Value>, canceled: &HashSet<String>) {
        for (id, call) in ended {
            let terminal: Vec<&Value> = call["history"]
                .as_array()
                .expect("history")
                .iter()
                .filter(|h| h["status"] == "completed" || h["status"] == "failed")
                .collect();
            assert_eq!(terminal.len(), 1, "one end in the history: {call}\n{}", self.logs());
            let originates = self.fake.originates_of(id);
            if originates == 0 {
                // Killed between the `sent` mark and the POST: never dialled, never dialled
                // twice, and told as lost.
                assert_eq!((&call["status"], &call["failure_reason"]), (&json!("failed"), &json!("lost")), "{call}");
                continue;
            }
            assert_eq!(originates, 1, "dialled exactly once: {call}");
            if canceled.contains(id) {
                assert_eq!(
                    (&call["status"], &call["failure_reason"]),
                    (&json!("failed"), &json!("canceled")),
                    "{call}"
                );
            } else {
                assert_eq!(call["status"], "completed", "{call}\n{}", self.logs());
            }
        }
    }
}

fn plays() -> Value {
    json!({"phone_number": PLAYS, "audio": "sound:demo-congrats"})
}

fn answers_late() -> Value {
    json!({"phone_number": ANSWERS_LATE, "audio": "sound:demo-thanks", "timeout": 300})
}

fn rings() -> Value {
    json!({"phone_number": RINGS, "timeout": 300})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_one_killed_mid_call_every_call_ends_once_and_is_served_by_every_survivor() {
    let Some(mut cluster) = Cluster::new().await else { return };
    for id in ["a", "b", "c"] {
        cluster.start(id).await;
    }
    // Through all three at once: one answered only after the victim's death (placed first, so
    // it is ringing by then), three that play and end by themselves, one that rings until
    // canceled, each.
    let mut late = Vec::new();
    for n in 0..3 {
        late.push(cluster.place(n, answers_late()).await);
    }
    let mut placing = Vec::new();
    for n in 0..3 {
        for body in [plays(), plays(), plays(), rings()] {
            placing.push(cluster.place(n, body));
        }
    }
    let calls: Vec<String> = cluster.within("placing", futures_util::future::join_all(placing)).await;
    let ringing: HashSet<String> = calls.iter().skip(3).step_by(4).cloned().collect();
    assert_eq!(ringing.len(), 3);
    // The victim dies with calls up, ringing, being dialled and queued.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut victims: Vec<String> = calls[..4].to_vec();
    victims.push(late[0].clone());
    let calls: Vec<String> = calls.into_iter().chain(late).collect();
    cluster.kill(0);
    let killed = std::time::Instant::now();

    // The survivors take each of its calls over once its lease lapses.
    cluster
        .within("the victim's calls to be taken over", async {
            loop {
                let mut left = 0;
                for id in &victims {
                    let call = cluster.get(1, id).await;
                    let owner = cluster.owner(id).await;
                    if call["is_completed"] != true && !matches!(owner.as_deref(), Some("b" | "c")) {
                        left += 1;
                    }
                }
                if left == 0 {
                    // A figure, not a bound: the lease term (2 s) and up to a third of it.
                    eprintln!("the victim's calls were taken over {:?} after the SIGKILL", killed.elapsed());
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;

    // Watched from both survivors, whoever follows the call.
    let streams: Vec<(String, usize, tokio::task::JoinHandle<Vec<Value>>)> =
        calls.iter().flat_map(|id| [1, 2].map(|n| (id.clone(), n, cluster.watch(n, id)))).collect();

    // Each ringing call is canceled through the survivor that does not follow it.
    for id in &ringing {
        let call = cluster
            .within("the ringing call to ring", async {
                loop {
                    let call = cluster.get(1, id).await;
                    if call["status"] == "ringing" || call["is_completed"] == true {
                        return call;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
        assert_eq!(call["status"], "ringing", "{call}");
        let owner = cluster.owner(id).await.expect("followed by a survivor");
        let other = if owner == "b" { cluster.node("c") } else { cluster.node("b") };
        let response =
            cluster.req(reqwest::Method::DELETE, other, &format!("/api/v1/calls/{id}")).send().await.expect("DELETE");
        assert!(response.status().is_success(), "cancel of a call followed by {owner}: {}", response.status());
    }

    let ended = cluster.all_ended(2, &calls).await;
    cluster.check_ends(&ended, &ringing);
    // Readable from every survivor, the same.
    for (id, call) in &ended {
        assert_eq!(&cluster.get(1, id).await, call);
        assert_eq!(&cluster.get(2, id).await, call);
    }
    // Every stream ended with the stored end, from either survivor.
    for (id, n, stream) in streams {
        let states = cluster.within("the stream to end", stream).await.expect("stream task");
        let last = states.last().unwrap_or_else(|| panic!("no event for {id} from {n}"));
        assert_eq!(last, &ended[&id], "the stream's last event is the stored call");
    }
    // One calls-per-second limit for the three together: any 6 originates in a row span at
    // least about a second (5 intervals of 200 ms); three separate limits would be 3x that rate.
    let mut dialed: Vec<time::OffsetDateTime> = ended
        .values()
        .filter_map(|c| c["dialed_at"].as_str())
        .map(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).expect("instant"))
        .collect();
    dialed.sort();
    for window in dialed.windows(6) {
        let span = window[5] - window[0];
        assert!(span >= time::Duration::milliseconds(750), "6 originates within {span}: {dialed:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_one_killed_and_restarted_at_once_never_fight_over_a_call() {
    let Some(mut cluster) = Cluster::new().await else { return };
    for id in ["a", "b"] {
        cluster.start(id).await;
    }
    let mut placing = Vec::new();
    for n in 0..2 {
        for _ in 0..4 {
            placing.push(cluster.place(n, plays()));
        }
    }
    let calls: Vec<String> = cluster.within("placing", futures_util::future::join_all(placing)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    cluster.kill(0);
    // Back at once under the same INSTANCE_ID: it waits for its old lease to lapse, then it
    // and b share the old calls, each taken by one of them.
    let returned = cluster.start("a").await;
    let ended = cluster.all_ended(returned, &calls).await;
    cluster.check_ends(&ended, &HashSet::new());
    for (id, call) in &ended {
        assert_eq!(&cluster.get(cluster.node("b"), id).await, call);
    }
    let logs = std::fs::read_to_string(&cluster.nodes[returned].log).unwrap_or_default();
    assert!(logs.contains("instance registered"), "{}", cluster.logs());
}

/// A user disabled with `ivr-server user disable` is locked out of every instance within
/// moments, though each trusts a user for USER_CACHE_SECONDS (30 s here): each hears the users
/// table's change. Enabled again, they are let in at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_user_is_locked_out_of_every_instance_at_once() {
    let Some(mut cluster) = Cluster::new().await else { return };
    for id in ["a", "b"] {
        cluster.start(id).await;
    }
    let hearing = |n: usize| {
        std::fs::read_to_string(&cluster.nodes[n].log).unwrap_or_default().contains("listening for the users table")
    };
    cluster
        .within("both to listen for the users table's changes", async {
            while !(hearing(0) && hearing(1)) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    let status = |n: usize| {
        let request = cluster.req(reqwest::Method::GET, n, "/api/v1/calls");
        async move { request.send().await.expect("GET").status().as_u16() }
    };
    for n in 0..2 {
        assert_eq!(status(n).await, 200);
    }
    cluster.user("disable");
    let disabled = std::time::Instant::now();
    for n in 0..2 {
        while status(n).await != 401 {
            assert!(disabled.elapsed() < Duration::from_secs(10), "still let in by {}\n{}", n, cluster.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!("locked out of both instances {:?} after `user disable`", disabled.elapsed());
    cluster.user("enable");
    for n in 0..2 {
        assert_eq!(status(n).await, 200, "a no is never remembered");
    }
}

/// SQLite serves one instance: a second process on the same file is refused with a message
/// that says why, while the first runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_one_sqlite_file_is_refused() {
    let fake = FakeAsterisk::start().await.expect("fake asterisk");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("ivr.db").display());
    let server = |port: u16, log: &str| {
        let out = std::fs::File::create(dir.path().join(log)).expect("log");
        Command::new(env!("CARGO_BIN_EXE_ivr-server"))
            .env_clear()
            .envs([
                ("DATABASE_URL", url.as_str()),
                ("SECRET_KEY", SECRET_KEY),
                ("ARI_HTTP_URL", &fake.http_url()),
                ("ARI_USERNAME", fake.username()),
                ("ARI_PASSWORD", fake.password()),
                ("LISTEN_ADDR", &format!("127.0.0.1:{port}")),
                ("INSTANCE_LEASE_SECONDS", "2"),
                ("BCRYPT_COST", "4"),
            ])
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn ivr-server")
    };
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let port = free();
    let first = Node {
        id: "first".into(),
        base: format!("http://127.0.0.1:{port}"),
        child: server(port, "first.log"),
        log: dir.path().join("first.log"),
    };
    let http = reqwest::Client::builder().timeout(STEP).build().unwrap();
    tokio::time::timeout(STEP, async {
        while !http.get(format!("{}/readyz", first.base)).send().await.is_ok_and(|r| r.status() == 200) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the first is ready");
    let mut second = server(free(), "second.log");
    let status = tokio::time::timeout(STEP, async {
        loop {
            if let Some(status) = second.try_wait().expect("wait") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the second gives up within a lease term or so");
    assert!(!status.success());
    let said = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    assert!(said.contains("SQLite serves one instance: run several over PostgreSQL"), "{said}");
    assert!(
        http.get(format!("{}/readyz", first.base)).send().await.is_ok_and(|r| r.status() == 200),
        "the first runs on"
    );
}
