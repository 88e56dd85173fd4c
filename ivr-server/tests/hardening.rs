//! Abuse refused, over real TCP: tokens not yet valid, login throttling (per address and per
//! username, behind a trusted proxy), the destination policy against the fake Asterisk, and
//! the connection bounds (silent, idle and slow clients closed, a 60 KB header refused, the
//! connection cap). SECURITY.md names these tests.

mod common;

use std::time::Duration;

use common::*;
use ivr_core::fake::{FakeAsterisk, FakeConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn auth(request: reqwest::RequestBuilder, token: &str) -> reqwest::RequestBuilder {
    request.header("authorization", format!("Bearer {token}"))
}

/// A login for `user` with `password` as the client `from` (through the trusted proxy).
fn login_from(server: &TestServer, from: &str, user: &str, password: &str) -> reqwest::RequestBuilder {
    client()
        .post(server.url("/api/v1/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-for", from)
        .body(format!("grant_type=password&username={user}&password={password}"))
}

fn metric(server: &TestServer, line_start: &str) -> u64 {
    let text = ivr_server::metrics::render(server.state.registry());
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn sign(claims: &Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET_KEY.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), claims, &key).expect("sign")
}

#[tokio::test]
async fn a_token_not_yet_valid_is_refused() {
    let server = TestServer::start(&[], Db::Disabled, Ari::Down).await;
    let now = ivr_server::auth::unix_now();
    let calls = || client().get(server.url("/api/v1/calls"));
    let early = sign(&json!({"sub": "dev", "iat": now, "exp": now + 7200, "nbf": now + 3600}));
    let body = problem(auth(calls(), &early), 401).await;
    assert!(body["detail"].as_str().unwrap().contains("not valid yet"), "{body}");
    // Within the stated leeway, clocks a little apart still agree.
    let skewed = sign(&json!({"sub": "dev", "iat": now, "exp": now + 600, "nbf": now + 10}));
    let (status, _, body) = send(auth(calls(), &skewed)).await;
    assert_eq!(status, 200, "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn guessing_and_spraying_logins_are_refused_but_the_user_gets_in() {
    let vars = [("TRUSTED_PROXIES", "127.0.0.1"), ("LOGIN_SLOWDOWN_MS", "1")];
    let server = TestServer::start(&vars, Db::Sqlite, Ari::Down).await;
    // Alice logs in from her usual address.
    let home = "192.0.2.10";
    let (status, _, _) = send(login_from(&server, home, USER, PASSWORD)).await;
    assert_eq!(status, 200);

    // Someone guesses her password from elsewhere: refused after five failures.
    let attacker = "198.51.100.66";
    for i in 0..5 {
        let body = problem(login_from(&server, attacker, USER, &format!("guess-{i}")), 401).await;
        assert_eq!(body["error"], "invalid_grant");
    }
    let (status, headers, body) = send(login_from(&server, attacker, USER, "guess-5")).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(headers["content-type"], "application/problem+json");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert!(body["detail"].as_str().unwrap().contains("for this username"), "{body}");
    // Even the right password is refused there now: the limit is checked before the password.
    let (status, _, _) = send(login_from(&server, attacker, USER, PASSWORD)).await;
    assert_eq!(status, 429);
    // Alice, from home, is not locked out.
    let (status, _, body) = send(login_from(&server, home, USER, PASSWORD)).await;
    assert_eq!(status, 200, "{body}");

    // Spraying many usernames from one address is refused after ten failures, whatever the
    // client writes into X-Forwarded-For itself (the right-most untrusted hop counts).
    let sprayer = "203.0.113.5";
    for i in 0..10 {
        problem(login_from(&server, &format!("10.9.9.{i}, {sprayer}"), &format!("user{i}"), "password1"), 401).await;
    }
    let body = problem(login_from(&server, sprayer, "user99", "password1"), 429).await;
    assert!(body["detail"].as_str().unwrap().contains("from this address"), "{body}");
    // A neighbour is unaffected.
    problem(login_from(&server, "203.0.113.6", "user99", "password1"), 401).await;

    assert_eq!(metric(&server, r#"ivr_login_throttled_total{action="refused",scope="username"}"#), 2);
    assert_eq!(metric(&server, r#"ivr_login_throttled_total{action="refused",scope="address"}"#), 1);
    assert!(metric(&server, r#"ivr_login_throttled_total{action="slowed",scope="address"}"#) >= 2);
    server.shutdown().await;
}

/// A fake Asterisk and a server following it, with `vars`.
async fn with_fake(vars: &[(&str, &str)]) -> (TestServer, FakeAsterisk) {
    let fake = within("fake", FakeAsterisk::start_with(FakeConfig { time_scale: 0.05, ..FakeConfig::default() }))
        .await
        .expect("fake asterisk");
    let ari = Ari::At { http_url: fake.http_url(), username: fake.username().into(), password: fake.password().into() };
    let server = TestServer::start(vars, Db::Sqlite, ari).await;
    within("readiness", async {
        while send(client().get(server.url("/readyz"))).await.0 != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    (server, fake)
}

#[tokio::test]
async fn numbers_outside_the_destination_policy_never_reach_asterisk() {
    let vars = [("ALLOWED_PREFIXES", "+1555"), ("DENIED_PREFIXES", "+1900,+15550000006")];
    let (server, fake) = with_fake(&vars).await;
    let token = server.mint(USER);
    let create = |body: Value| auth(client().post(server.url("/api/v1/calls")), &token).json(&body);

    let body = problem(create(json!({"phone_number": "+19005550100"})), 403).await;
    assert!(body["detail"].as_str().unwrap().contains("+1900"), "{body}");
    let body = problem(create(json!({"phone_number": "+442071234567"})), 403).await;
    assert!(body["detail"].as_str().unwrap().contains("outside"), "{body}");
    problem(create(json!({"phone_number": "15550000005"})), 403).await;
    let interaction = auth(client().post(server.url("/api/v1/interaction/%2B15550000006")), &token);
    let body = problem(interaction, 403).await;
    assert!(body["detail"].as_str().unwrap().contains("+15550000006"), "{body}");
    assert_eq!(fake.originate_count(), 0, "a refused number reached Asterisk");
    let (_, _, list) = send(auth(client().get(server.url("/api/v1/calls")), &token)).await;
    assert_eq!(list["calls"].as_array().map(Vec::len), Some(0), "{list}");

    // A number inside the policy is placed.
    let (status, _, created) = send(create(json!({"phone_number": "+15550000005"}))).await;
    assert_eq!(status, 201, "{created}");
    within("the originate", async {
        while fake.originate_count() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(metric(&server, r#"ivr_destinations_refused_total{reason="denied"}"#), 2);
    assert_eq!(metric(&server, r#"ivr_destinations_refused_total{reason="not_allowed"}"#), 1);
    assert_eq!(metric(&server, r#"ivr_destinations_refused_total{reason="not_e164"}"#), 1);
    server.shutdown().await;
    fake.shutdown().await;
}

async fn connect(server: &TestServer) -> TcpStream {
    within("connect", TcpStream::connect(server.addr)).await.expect("connect")
}

/// Reads one response (headers and a Content-Length body); returns its text.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = within("response", stream.read(&mut buf)).await.expect("read");
        bytes.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if bytes.len() >= end + 4 + length {
                return text;
            }
        }
        assert!(n > 0, "the connection closed mid-response: {text:?}");
    }
}

/// Whether the server closed the connection (EOF or reset) within `wait` (virtual time).
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(wait, stream.read(&mut buf)).await {
        Err(_) => false,
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!("unexpected bytes: {:?}", String::from_utf8_lossy(&buf[..n])),
    }
}

#[tokio::test(start_paused = true)]
async fn silent_and_idle_connections_are_closed() {
    let server = TestServer::start(&[], Db::Disabled, Ari::Down).await;
    // A connection that never sends a byte.
    let mut silent = connect(&server).await;
    assert!(!closed_within(&mut silent, Duration::from_secs(9)).await, "closed before the header timeout");
    assert!(closed_within(&mut silent, Duration::from_secs(2)).await, "still open after the header timeout");

    // A kept-alive connection that goes quiet after its answer.
    let mut idle = connect(&server).await;
    within("write", idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")).await.expect("write");
    let answer = read_response(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!closed_within(&mut idle, Duration::from_secs(9)).await, "closed before the idle timeout");
    assert!(closed_within(&mut idle, Duration::from_secs(2)).await, "still open after the idle timeout");
    server.shutdown().await;
}

/// The header-read timeout runs from the end of each answer: a connection used more often
/// than that stays open however long it lives, and one answering an event stream is not
/// waiting for a head however quiet the stream is.
#[tokio::test(start_paused = true)]
async fn connections_in_use_outlast_the_header_timeout() {
    let server = TestServer::start(&[("HEADER_READ_TIMEOUT_SECONDS", "2")], Db::Disabled, Ari::Down).await;
    let token = server.mint("dev");
    // A call that stays pending (no event loop runs): its event stream stays open and quiet
    // (a keep-alive comment only every 15 s).
    let call = ivr_core::Call::new(
        ivr_core::CallId::new(),
        ivr_core::store::conformance::new_call("+15550000001"),
        ivr_core::call::now(),
    );
    within("insert", server.state.manager().store().insert(&call)).await.unwrap();
    let mut stream = connect(&server).await;
    let request = format!(
        "GET /api/v1/calls/{}/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\r\n",
        call.call_id
    );
    within("write", stream.write_all(request.as_bytes())).await.expect("write");
    let mut buf = [0u8; 4096];
    let n = within("first event", stream.read(&mut buf)).await.expect("read");
    let first = String::from_utf8_lossy(&buf[..n]);
    assert!(first.starts_with("HTTP/1.1 200") && first.contains("\"status\":\"pending\""), "{first}");

    // A kept-alive connection asked again every 1.5 s, for 9 s in all.
    let mut busy = connect(&server).await;
    for _ in 0..6 {
        within("write", busy.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")).await.expect("write");
        let answer = read_response(&mut busy).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(!closed_within(&mut busy, Duration::from_millis(1500)).await, "closed while in use");
    }
    // Then left idle, it is closed after the timeout, while the event stream, 9 s quiet, is not.
    assert!(closed_within(&mut busy, Duration::from_secs(1)).await, "still open after the idle timeout");
    assert!(!closed_within(&mut stream, Duration::from_millis(100)).await, "the event stream was closed");
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_header_client_is_closed() {
    let server = TestServer::start(&[], Db::Disabled, Ari::Down).await;
    let mut slow = connect(&server).await;
    let head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut sent = 0;
    let mut buf = [0u8; 1024];
    // One byte every 300 ms, never finishing the head: 54 bytes take 16 s, past the 10 s bound.
    let outcome = loop {
        if sent == head.len() {
            break "the whole head was sent and the connection is still open";
        }
        if slow.write_all(&head[sent..=sent]).await.is_err() {
            break "closed";
        }
        sent += 1;
        match tokio::time::timeout(Duration::from_millis(300), slow.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => break "closed",
            Ok(Ok(n)) => panic!("unexpected answer: {:?}", String::from_utf8_lossy(&buf[..n])),
        }
    };
    assert_eq!(outcome, "closed");
    assert!(sent >= 30, "closed after {sent} bytes, before the header timeout");
    server.shutdown().await;
}

#[tokio::test]
async fn a_60_kb_header_is_answered_431() {
    let server = TestServer::start(&[], Db::Disabled, Ari::Down).await;
    let mut stream = connect(&server).await;
    let request = format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(60 * 1024));
    within("write", stream.write_all(request.as_bytes())).await.expect("write");
    let answer = read_response(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // A head well under the bound is served.
    let (status, _, _) = send(client().get(server.url("/healthz")).header("x-big", "a".repeat(12 * 1024))).await;
    assert_eq!(status, 200);
    // And through reqwest, the 60 KB header gets the same answer.
    let (status, _, _) = send(client().get(server.url("/healthz")).header("x-big", "a".repeat(60 * 1024))).await;
    assert_eq!(status, 431);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_connection_cap_holds_and_health_answers_once_others_close() {
    let vars = [("MAX_CONNECTIONS", "3"), ("HEADER_READ_TIMEOUT_SECONDS", "3600")];
    let server = TestServer::start(&vars, Db::Disabled, Ari::Down).await;
    let open = |server: &TestServer| metric(server, "ivr_http_connections_open");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect(&server).await);
    }
    within("three open", async {
        while open(&server) < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // A fourth is answered 503 with Retry-After, and closed.
    let mut extra = connect(&server).await;
    within("write", extra.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")).await.expect("write");
    let answer = read_response(&mut extra).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 1") && lower.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("too-many-connections"), "{answer}");
    assert!(closed_within(&mut extra, Duration::from_secs(5)).await);
    assert_eq!(metric(&server, "ivr_http_connections_refused_total"), 1);
    assert_eq!(open(&server), 3);

    // One held connection closes: /healthz is served again.
    drop(held.pop());
    within("a slot to free", async {
        while open(&server) > 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let (status, _, body) = send(client().get(server.url("/healthz"))).await;
    assert_eq!(status, 200, "{body}");
    drop(held);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_body_is_answered_408() {
    let server = TestServer::start(&[], Db::Disabled, Ari::Down).await;
    let mut slow = connect(&server).await;
    let head = "POST /api/v1/token HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\n\
                content-length: 100\r\n\r\nusername=al";
    within("write", slow.write_all(head.as_bytes())).await.expect("write");
    // The rest of the body never comes; past the body timeout the answer is waiting.
    tokio::time::sleep(ivr_server::body::BODY_READ_TIMEOUT + Duration::from_secs(1)).await;
    let answer = read_response(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request-timeout") && answer.contains("did not arrive"), "{answer}");
    assert!(closed_within(&mut slow, Duration::from_secs(5)).await);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_dropped() {
    let server = TestServer::start(&[], Db::Disabled, Ari::Down).await;
    let open = |server: &TestServer| metric(server, "ivr_http_connections_open");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let stalled = within("connect", socket.connect(server.addr)).await.expect("connect");
    // Far more answer than the socket buffers hold, never read.
    let requests = "GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n".repeat(1000);
    let (_reader, mut writer) = stalled.into_split();
    within("write", writer.write_all(requests.as_bytes())).await.expect("write");
    within("the server to serve it", async {
        while open(&server) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // Still served a while later: the answers are stuck behind the full buffers.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(open(&server), 1);
    tokio::time::sleep(ivr_server::conn::WRITE_STALL).await;
    within("the server to give up on it", async {
        while open(&server) > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // Meanwhile and after, others are served.
    let (status, _, _) = send(client().get(server.url("/healthz"))).await;
    assert_eq!(status, 200);
    server.shutdown().await;
}

/// A connection to the server from the loopback address `from` (e.g. 127.0.0.2).
async fn connect_from(server: &TestServer, from: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(format!("{from}:0").parse().unwrap()).expect("bind a loopback source address");
    within("connect", socket.connect(server.addr)).await.expect("connect")
}

#[tokio::test(start_paused = true)]
async fn one_client_cannot_take_every_connection() {
    let vars =
        [("MAX_CONNECTIONS", "10"), ("MAX_CONNECTIONS_PER_CLIENT", "2"), ("HEADER_READ_TIMEOUT_SECONDS", "3600")];
    let server = TestServer::start(&vars, Db::Disabled, Ari::Down).await;
    let held = [connect_from(&server, "127.0.0.3").await, connect_from(&server, "127.0.0.3").await];
    within("two open", async {
        while metric(&server, "ivr_http_connections_open") < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // The flooding client's third connection is refused, with a detail naming the limit.
    let mut third = connect_from(&server, "127.0.0.3").await;
    within("write", third.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")).await.expect("write");
    let answer = read_response(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("MAX_CONNECTIONS_PER_CLIENT"), "{answer}");
    // Another client is served meanwhile.
    let mut other = connect_from(&server, "127.0.0.4").await;
    within("write", other.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")).await.expect("write");
    let answer = read_response(&mut other).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(held);
    server.shutdown().await;
}
