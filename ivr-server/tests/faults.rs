//! Faults of the whole server (issue 11): PostgreSQL restarted under load, and SIGTERM under
//! load. The first runs a private PostgreSQL cluster of its own (never the shared one other
//! tests use), the second the built `ivr-server` binary, each against the fake Asterisk.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ivr_core::fake::{FakeAsterisk, FakeConfig};
use ivr_core::{Call, CallId, CallStatus, CallStore, FailureReason, SqlCallStore};
use serde_json::{json, Value};
use tokio::time::Instant;

/// A number and what a call to it ends as.
type Callee = (&'static str, CallStatus, Option<FailureReason>);

/// The fake's recorded plans (`CalleePlan::default_for`): each call over in a few seconds.
const NUMBERS: &[Callee] = &[
    ("+15550000001", CallStatus::Completed, None),
    ("+15550000002", CallStatus::Failed, Some(FailureReason::Busy)),
    ("+15550000003", CallStatus::Failed, Some(FailureReason::Congestion)),
    ("+15550000005", CallStatus::Completed, None),
];

/// Callees that take 80 recorded seconds to end (set by [`slow_callees`]).
const SLOW: &[Callee] = &[
    ("+15550400001", CallStatus::Completed, None),
    ("+15550400002", CallStatus::Failed, Some(FailureReason::Busy)),
    ("+15550400003", CallStatus::Failed, Some(FailureReason::Congestion)),
    ("+15550400004", CallStatus::Completed, None),
];

/// A sound that outlasts every call: answered calls play it until the callee hangs up.
const LONG_SOUND: &str = "long-silence";

fn slow_callees(fake: &FakeAsterisk) {
    use ivr_core::fake::CalleePlan;
    let s = Duration::from_secs;
    fake.set_plan(SLOW[0].0, CalleePlan::LongCall { ring: s(2), talk: s(78) });
    fake.set_plan(SLOW[1].0, CalleePlan::Busy { ring: s(80) });
    fake.set_plan(SLOW[2].0, CalleePlan::Congestion { ring: s(80) });
    fake.set_plan(SLOW[3].0, CalleePlan::AnswerAtOnce { talk: s(80) });
}

fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

/// The answers a load client saw.
#[derive(Default)]
struct Seen {
    /// Accepted calls: id and the number dialled.
    accepted: Vec<(CallId, String)>,
    /// Status → how many.
    statuses: BTreeMap<u16, usize>,
    /// What should never be: a 5xx other than 503, a 503 without `Retry-After` or problem body.
    bad: Vec<String>,
    /// Requests whose connection was opened but that got no answer: the server closed or
    /// reset it (a connection the kernel completed in the instant the listener closed can
    /// only be reset). Such a request must have done nothing.
    unanswered: Vec<String>,
    /// Requests refused before they were sent (connection refused: the server was gone).
    not_connected: usize,
}

/// Clients creating calls until `stop`: one new request every `every` (at most 64 in flight),
/// whatever the earlier ones are waiting for, each on a new connection (so a refusal can only
/// be a refused connection, never a reused one closing). The task ends once every request it
/// sent has its outcome.
fn load(
    base: String,
    token: String,
    every: Duration,
    numbers: &'static [Callee],
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let client = reqwest::Client::builder().timeout(STEP).pool_max_idle_per_host(0).build().unwrap();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(64));
    let driver = tokio::spawn({
        let seen = seen.clone();
        async move {
            let mut requests = tokio::task::JoinSet::new();
            let mut ticks = tokio::time::interval(every);
            for i in 0.. {
                ticks.tick().await;
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(permit) = in_flight.clone().try_acquire_owned() else { continue };
                let number = numbers[i % numbers.len()].0;
                let request = client
                    .post(format!("{base}/api/v1/calls"))
                    .bearer_auth(&token)
                    .json(&json!({"phone_number": number, "audio": format!("sound:{LONG_SOUND}")}));
                let seen = seen.clone();
                requests.spawn(async move {
                    let outcome = answer(request).await;
                    let mut seen = seen.lock().unwrap();
                    match outcome {
                        Answer::NotConnected => seen.not_connected += 1,
                        Answer::Unanswered(e) => seen.unanswered.push(e),
                        Answer::Answered { status, retry_after, problem, body } => {
                            *seen.statuses.entry(status).or_default() += 1;
                            match status {
                                201 | 202 => {
                                    let id = body["call_id"].as_str().and_then(|id| id.parse().ok()).expect("call_id");
                                    seen.accepted.push((id, number.to_owned()));
                                }
                                503 if retry_after && problem => {}
                                _ => seen.bad.push(format!("{status} retry-after: {retry_after} {body}")),
                            }
                        }
                    }
                    drop(permit);
                });
            }
            while requests.join_next().await.is_some() {}
        }
    });
    (seen, driver)
}

/// How a request of the load went.
enum Answer {
    /// Refused at connect: nothing listens.
    NotConnected,
    /// Connected, then no answer (closed or reset).
    Unanswered(String),
    Answered {
        status: u16,
        retry_after: bool,
        problem: bool,
        body: Value,
    },
}

async fn answer(request: reqwest::RequestBuilder) -> Answer {
    match request.send().await {
        Err(e) if e.is_connect() => Answer::NotConnected,
        Err(e) => Answer::Unanswered(format!("{e:?}")),
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after = response.headers().contains_key("retry-after");
            let problem = response.headers().get("content-type").is_some_and(|t| t == "application/problem+json");
            let body: Value = response.json().await.unwrap_or(Value::Null);
            Answer::Answered { status, retry_after, problem, body }
        }
    }
}

/// Every accepted call is stored, ends as its number's plan says, with its whole history.
async fn check_accepted(store: &dyn CallStore, numbers: &[Callee], accepted: &[(CallId, String)]) {
    let mut wrong = Vec::new();
    for (id, number) in accepted {
        let Some(call) = store.get(*id).await.expect("store") else {
            wrong.push(format!("{id}: accepted but not stored"));
            continue;
        };
        let (_, status, reason) = numbers.iter().find(|(n, ..)| n == number).unwrap();
        let statuses: Vec<CallStatus> = call.history.iter().map(|r| r.status).collect();
        // Accepted, sent once, (answered,) ended: Dialing may be missing when the events
        // outran the originate's answer, which is then no step forward.
        let sent = call.history.iter().filter(|r| r.cause == "sent to Asterisk").count();
        let answered = *status != CallStatus::Completed || statuses.contains(&CallStatus::Answered);
        let complete = statuses.first() == Some(&CallStatus::Pending) && sent == 1 && answered;
        if (call.status, call.failure_reason) != (*status, *reason) || !complete || call.sent_at.is_none() {
            let causes: Vec<&str> = call.history.iter().map(|r| r.cause.as_str()).collect();
            wrong.push(format!(
                "{number}: {} {:?} (want {status} {reason:?}) {statuses:?} {causes:?}",
                call.status, call.failure_reason
            ));
        }
    }
    assert!(wrong.is_empty(), "{} of {} accepted calls are wrong: {wrong:#?}", wrong.len(), accepted.len());
}

/// How many calls the store holds.
async fn count_calls(store: &dyn CallStore) -> usize {
    let mut query = ivr_core::CallQuery { limit: ivr_core::CallQuery::MAX_PAGE_SIZE, ..Default::default() };
    let mut n = 0;
    loop {
        let page = within("list", store.list(&query)).await.unwrap();
        n += page.calls.len();
        match page.next {
            Some(next) => query.after = Some(next),
            None => return n,
        }
    }
}

async fn until_all_ended(store: &dyn CallStore, limit: Duration) {
    within("every call to end", async {
        let deadline = Instant::now() + limit;
        loop {
            let active = store.list_active().await.map(|a| a.len()).unwrap_or(usize::MAX);
            if active == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "{active} calls still active after {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

async fn fake_asterisk(scale: f64) -> FakeAsterisk {
    let fake =
        within("fake asterisk", FakeAsterisk::start_with(FakeConfig { time_scale: scale, ..FakeConfig::default() }))
            .await
            .unwrap();
    fake.add_sound(LONG_SOUND, Duration::from_secs(36_000));
    fake
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL restarted under load

/// A PostgreSQL cluster of this test's own, in a temporary directory, on a free port. Run as
/// the `postgres` user when the test runs as root (as CI does: postgres refuses root).
struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl PrivatePostgres {
    /// `Err` says why it cannot run here (no binaries, no `postgres` user).
    fn start() -> Result<PrivatePostgres, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|_| "no PostgreSQL server binaries in /usr/lib/postgresql".to_string())?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
            .max()
            .ok_or("no initdb and pg_ctl under /usr/lib/postgresql/*/bin")?;
        // SAFETY: geteuid has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        if as_postgres {
            let id = |flag: &str| -> Result<u32, String> {
                let out = Command::new("id").args([flag, "postgres"]).output().map_err(|e| e.to_string())?;
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .map_err(|_| "no `postgres` user to run PostgreSQL as root".to_string())
            };
            std::os::unix::fs::chown(dir.path(), Some(id("-u")?), Some(id("-g")?)).map_err(|e| e.to_string())?;
            if Command::new("runuser").arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
                return Err("no runuser to run PostgreSQL as the postgres user".into());
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let pg = PrivatePostgres { dir, bin, port, as_postgres };
        let data = pg.data();
        pg.run("initdb", &["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])?;
        pg.start_cluster()?;
        Ok(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let program = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = command.args(args).current_dir(self.dir.path()).output().map_err(|e| format!("{tool}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    fn start_cluster(&self) -> Result<(), String> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("postgres.log").display().to_string();
        self.run("pg_ctl", &["-D", &self.data(), "-l", &log, "-w", "-t", "30", "-o", &options, "start"])
    }

    /// `pg_ctl stop -m fast`: sessions are cut at once, as in a restart.
    fn stop_cluster(&self) -> Result<(), String> {
        self.run("pg_ctl", &["-D", &self.data(), "-w", "-t", "30", "-m", "fast", "stop"])
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.run("pg_ctl", &["-D", &self.data(), "-w", "-t", "10", "-m", "immediate", "stop"]);
    }
}

async fn blocking<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    within(what, tokio::task::spawn_blocking(f)).await.unwrap()
}

/// PostgreSQL is stopped (`pg_ctl stop -m fast`) under a steady load of new calls, kept down
/// longer than the pool waits for a connection, and started again. During the outage every
/// answer is 503 with `Retry-After` (never a 500); afterwards the server serves again by
/// itself, and every call it accepted is stored and ends as its callee decided, with every
/// transition in its history (the writers held them through the outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_is_503_then_recovers_and_loses_nothing() {
    let pg = match blocking("a private PostgreSQL", PrivatePostgres::start).await {
        Ok(pg) => Arc::new(pg),
        Err(why) => return skip(&format!("PostgreSQL restart test: {why}")),
    };
    let store = within("connect", SqlCallStore::connect(&pg.url())).await.expect("private PostgreSQL");
    let fake = fake_asterisk(0.05).await;
    let ari = Ari::At { http_url: fake.http_url(), username: fake.username().into(), password: fake.password().into() };
    let vars =
        [("ARI_ENDPOINT_TEMPLATE", "Local/{number}@sim"), ("MAX_CALLS_PER_SECOND", "0"), ("MAX_ACTIVE_CALLS", "10000")];
    let server = TestServer::start(&vars, Db::Sql(store.clone()), ari).await;
    let token = server.mint(USER);

    let stop = Arc::new(AtomicBool::new(false));
    let (seen, driver) = load(server.base.clone(), token.clone(), Duration::from_millis(25), NUMBERS, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = seen.lock().unwrap().accepted.len();
    assert!(before > 0, "calls are accepted before the outage");
    let mut statuses = std::mem::take(&mut seen.lock().unwrap().statuses);

    blocking("pg_ctl stop", {
        let pg = pg.clone();
        move || pg.stop_cluster()
    })
    .await
    .expect("stop PostgreSQL");
    // Down longer than the pool's 5 s wait for a connection: requests must be refused, not held.
    tokio::time::sleep(Duration::from_secs(6)).await;
    // What was answered while PostgreSQL was down (a request sent just before may still
    // have been accepted).
    let during = std::mem::take(&mut seen.lock().unwrap().statuses);
    for (status, n) in &during {
        *statuses.entry(*status).or_default() += n;
    }
    blocking("pg_ctl start", {
        let pg = pg.clone();
        move || pg.start_cluster()
    })
    .await
    .expect("start PostgreSQL");
    let restarted = Instant::now();
    let accepted_at_restart = seen.lock().unwrap().accepted.len();

    within("calls to be accepted again", async {
        while seen.lock().unwrap().accepted.len() < accepted_at_restart + 10 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let recovered = restarted.elapsed();
    stop.store(true, Ordering::SeqCst);
    within("the load's requests to end", driver).await.unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(seen.bad.is_empty(), "only 201/202 and 503 with Retry-After: {:#?}", seen.bad);
    assert!(seen.unanswered.is_empty(), "every request answered: {:#?}", seen.unanswered);
    assert!(!during.contains_key(&500) && !seen.statuses.contains_key(&500) && !statuses.contains_key(&500));
    let (status, _, body) = send(client().get(server.url("/readyz"))).await;
    assert_eq!(status, 200, "ready again: {body}");

    until_all_ended(&store, Duration::from_secs(20)).await;
    check_accepted(&store, NUMBERS, &seen.accepted).await;
    for (status, n) in &seen.statuses {
        *statuses.entry(*status).or_default() += n;
    }
    // A request sent during the outage waits up to the pool's 5 s for a connection (twice: the
    // user's check, then the call's insert), so its 503 may come after the restart.
    assert!(statuses.get(&503).is_some_and(|n| *n > 0), "the outage was answered 503: {statuses:?}");
    assert_eq!(count_calls(&store).await, seen.accepted.len(), "no call stored that was not accepted");
    eprintln!(
        "{} calls accepted, answers {statuses:?}, during the outage {during:?}, serving again {recovered:?} after the restart",
        seen.accepted.len()
    );
    server.shutdown().await;
    fake.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// SIGTERM under load

/// The built `ivr-server`, serving on `port` with the calls in `db` and Asterisk at `fake`.
fn spawn_server(db: &Path, port: u16, fake: &FakeAsterisk) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_ivr-server"))
        .env_clear()
        .env("DATABASE_URL", format!("sqlite://{}", db.display()))
        .env("SECRET_KEY", SECRET_KEY)
        .env("BCRYPT_COST", "4")
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("ARI_HTTP_URL", fake.http_url())
        .env("ARI_USERNAME", fake.username())
        .env("ARI_PASSWORD", fake.password())
        .env("ARI_ENDPOINT_TEMPLATE", "Local/{number}@sim")
        .env("MAX_CALLS_PER_SECOND", "20")
        // Rings of 80 recorded seconds must not meet the originate timeout.
        .env("DEFAULT_TIMEOUT", "120")
        .env("MAX_ACTIVE_CALLS", "10000")
        .env("SHUTDOWN_GRACE_SECONDS", "5")
        // Live calls are not waited for: the next process must take them over.
        .env("CALL_DRAIN_SECONDS", "0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ivr-server");
    Server(Some(child))
}

/// A spawned `ivr-server`, killed if the test ends (or fails) before it exited.
struct Server(Option<Child>);

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn until_ready(base: &str) {
    within("the server to be ready", async {
        loop {
            if let Ok(r) = client().get(format!("{base}/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

async fn sigterm_and_wait(mut server: Server) -> std::process::ExitStatus {
    let mut child = server.0.take().expect("a running server");
    // SAFETY: kill with a pid of a child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let waited = tokio::task::spawn_blocking(move || {
        // Polled, so that a server that does not exit is killed rather than left behind.
        let deadline = std::time::Instant::now() + STEP;
        while std::time::Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    });
    match waited.await.expect("the wait") {
        Some(status) => status,
        None => panic!("ivr-server did not exit within {STEP:?} of SIGTERM"),
    }
}

/// SIGTERM while clients keep creating calls and calls are live: every request is answered
/// (201/202, or 503 with `Retry-After`) or refused at connect once the port is closed — at most
/// a connection the kernel completed in the very instant the listener closed is reset, and then
/// its request did nothing (the store holds exactly the calls answered 201/202); the process
/// exits 0; every accepted call is in the store; and the next process, on the same database,
/// takes over the calls still live (and those still queued) and follows each to its true end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_call_and_the_next_process_resumes() {
    // Recorded seconds are 100 ms: answered calls last about 1 s, so many are live at SIGTERM.
    let fake = fake_asterisk(0.1).await;
    slow_callees(&fake);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ivr.db");
    {
        let stores = within(
            "stores",
            ivr_server::app::Stores::on(within("sqlite", SqlCallStore::open_sqlite(&db)).await.unwrap(), 4),
        )
        .await
        .unwrap();
        within("user", stores.users.as_ref().unwrap().add(USER, PASSWORD)).await.unwrap();
        stores.close().await;
    }
    let token = ivr_server::auth::Tokens::new(&settings(&[]).auth).issue(USER).unwrap().access_token;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");

    let first = spawn_server(&db, port, &fake);
    until_ready(&base).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, driver) = load(base.clone(), token.clone(), Duration::from_millis(20), SLOW, stop.clone());
    within("a load to build up", async {
        while seen.lock().unwrap().accepted.len() < 30 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let exit = sigterm_and_wait(first).await;
    assert!(exit.success(), "a clean exit on SIGTERM: {exit:?}");
    // Clients keep trying a moment longer: the port is closed, every attempt refused at connect.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    within("the load's requests to end", driver).await.unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(seen.bad.is_empty(), "every request answered was answered cleanly: {:#?}", seen.bad);
    assert!(seen.not_connected > 0, "requests after the exit were refused at connect");

    let store = within("sqlite", SqlCallStore::open_sqlite(&db)).await.unwrap();
    assert_eq!(
        count_calls(&store).await,
        seen.accepted.len(),
        "a request without an answer created nothing ({} unanswered: {:?})",
        seen.unanswered.len(),
        seen.unanswered
    );
    let mut left_live = 0;
    for (id, _) in &seen.accepted {
        let call: Call = store.get(*id).await.unwrap().unwrap_or_else(|| panic!("{id}: accepted but not stored"));
        left_live += usize::from(call.is_active());
    }
    store.pool().close().await;
    assert!(left_live > 0, "some calls were still live at the exit, for the next process to resume");

    let second = spawn_server(&db, port, &fake);
    until_ready(&base).await;
    let store = within("sqlite", SqlCallStore::open_sqlite(&db)).await.unwrap();
    until_all_ended(&store, Duration::from_secs(20)).await;
    check_accepted(&store, SLOW, &seen.accepted).await;
    store.pool().close().await;
    let exit = sigterm_and_wait(second).await;
    assert!(exit.success(), "{exit:?}");
    eprintln!(
        "{} calls accepted, {left_live} live at SIGTERM, answers {:?}, {} refused at connect, {} reset unanswered",
        seen.accepted.len(),
        seen.statuses,
        seen.not_connected,
        seen.unanswered.len()
    );
    fake.shutdown().await;
}
