//! The API over real TCP, without a live call: tokens and users (SQLite, PostgreSQL when
//! IVR_TEST_DATABASE_URL is set), auth failures, every route's error shapes, DISABLE_DB,
//! metrics and docs gating, the OpenAPI document against the router, ARI and store outages,
//! pagination, shutdown with a stream open, the binary's settings errors, and the logs.

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::time::{Duration, Instant};

use common::*;
use ivr_core::{Call, CallId};
use serde_json::{json, Value};

fn auth(request: reqwest::RequestBuilder, token: &str) -> reqwest::RequestBuilder {
    request.header("authorization", format!("Bearer {token}"))
}

fn form(server: &TestServer, body: &str) -> reqwest::RequestBuilder {
    client()
        .post(server.url("/api/v1/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned())
}

async fn token_flow(server: &TestServer) {
    let token = server.login().await;
    let (status, _, body) = send(auth(client().get(server.url("/api/v1/calls")), &token)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"calls": [], "next_cursor": null}));

    // The token's claims.
    let claims = token.split('.').nth(1).expect("a JWT");
    use base64::Engine as _;
    let claims: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    assert_eq!(claims["sub"], USER);
    assert!(claims["exp"].as_u64().unwrap() > claims["iat"].as_u64().unwrap());

    // Wrong password and unknown user: the same answer.
    let wrong_password = problem(form(server, &format!("username={USER}&password=not-the-password")), 401).await;
    let unknown_user = problem(form(server, &format!("username=nobody&password={PASSWORD}")), 401).await;
    assert_eq!(wrong_password, unknown_user);
    let (_, headers, _) = send(form(server, "username=nobody&password=whatever1")).await;
    assert!(headers["www-authenticate"].to_str().unwrap().starts_with("Bearer"));

    // Malformed token requests.
    problem(form(server, "username=alice"), 400).await;
    problem(form(server, &format!("grant_type=client_credentials&username={USER}&password={PASSWORD}")), 400).await;
    problem(form(server, "username=alice&password=x&color=blue"), 400).await;
    let json_body = client().post(server.url("/api/v1/token")).json(&json!({"username": USER, "password": PASSWORD}));
    problem(json_body, 415).await;

    // A disabled user can neither log in nor use a token minted before: logging in at once,
    // the token within USER_CACHE_SECONDS (1 s by default; SECURITY.md).
    let users = server.state.users().unwrap();
    let (status, _, _) = send(auth(client().get(server.url("/api/v1/calls")), &token)).await;
    assert_eq!(status, 200, "the user is found enabled, and remembered so");
    within("disable", users.set_disabled(USER, true)).await.unwrap();
    problem(form(server, &format!("username={USER}&password={PASSWORD}")), 401).await;
    tokio::time::sleep(ivr_server::cache::DEFAULT_USER_CACHE).await;
    problem(auth(client().get(server.url("/api/v1/calls")), &token), 401).await;
    within("enable", users.set_disabled(USER, false)).await.unwrap();
    let (status, _, _) = send(auth(client().get(server.url("/api/v1/calls")), &token)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn token_flow_on_sqlite() {
    let server = TestServer::start(&[], Db::Sqlite, Ari::Down).await;
    token_flow(&server).await;
    server.shutdown().await;
}

/// A server with `vars` on a fresh schema of IVR_TEST_DATABASE_URL, and that URL; `None`
/// (the test `name` skipped, and said so) without it.
async fn on_postgres(name: &str, vars: &[(&str, &str)]) -> Option<(TestServer, String)> {
    let Ok(url) = std::env::var("IVR_TEST_DATABASE_URL") else {
        let _ = writeln!(std::io::stderr(), "{name}: skipped (IVR_TEST_DATABASE_URL is not set)");
        return None;
    };
    let sql = within("postgres", ivr_core::store::conformance::postgres_in_fresh_schema(&url)).await.expect("postgres");
    Some((TestServer::start(vars, Db::Sql(sql), Ari::Down).await, url))
}

#[tokio::test]
async fn token_flow_on_postgres() {
    let Some((server, _)) = on_postgres("token_flow_on_postgres", &[]).await else { return };
    token_flow(&server).await;
    // Calls land in the same database: a refused originate is stored and listed.
    let token = server.mint(USER);
    let body = problem(auth(client().post(server.url("/api/v1/interaction/+15550000001")), &token), 502).await;
    let call_id = body["call_id"].as_str().unwrap();
    let (status, _, call) = send(auth(client().get(server.url(&format!("/api/v1/calls/{call_id}"))), &token)).await;
    assert_eq!((status, call["status"].as_str()), (200, Some("failed")));
    server.shutdown().await;
}

#[tokio::test]
async fn auth_failures() {
    let issuer = [("JWT_ISSUER", "ivr-tests"), ("JWT_AUDIENCE", "ivr-api")];
    let server = TestServer::start(&issuer, Db::Sqlite, Ari::Down).await;
    let calls = || client().get(server.url("/api/v1/calls"));

    let missing = problem(calls(), 401).await;
    assert!(missing["detail"].as_str().unwrap().contains("Bearer"));
    let (_, headers, _) = send(calls()).await;
    assert!(headers["www-authenticate"].to_str().unwrap().starts_with("Bearer"));

    problem(calls().header("authorization", "Bearer"), 401).await;
    problem(calls().header("authorization", "Bearer not.a.jwt"), 401).await;
    problem(calls().header("authorization", "Basic YWxpY2U6cGFzcw=="), 401).await;

    let tokens_with = |vars: &[(&str, &str)]| ivr_server::auth::Tokens::new(&settings(vars).auth);
    let good = tokens_with(&issuer);
    let (status, _, _) = send(auth(calls(), &good.issue(USER).unwrap().access_token)).await;
    assert_eq!(status, 200);

    let expired = good.issue_at(USER, ivr_server::auth::unix_now() - 3 * 3600).unwrap().access_token;
    let body = problem(auth(calls(), &expired), 401).await;
    assert!(body["detail"].as_str().unwrap().contains("expired"), "{body}");

    let other_key = [("SECRET_KEY", "another-secret-key-of-enough-length-0000"), issuer[0], issuer[1]];
    let forged = tokens_with(&other_key).issue(USER).unwrap().access_token;
    assert!(problem(auth(calls(), &forged), 401).await["detail"].as_str().unwrap().contains("signature"));

    let wrong_iss = tokens_with(&[("JWT_ISSUER", "someone-else"), issuer[1]]).issue(USER).unwrap().access_token;
    assert!(problem(auth(calls(), &wrong_iss), 401).await["detail"].as_str().unwrap().contains("iss"));
    let wrong_aud = tokens_with(&[issuer[0], ("JWT_AUDIENCE", "another-api")]).issue(USER).unwrap().access_token;
    assert!(problem(auth(calls(), &wrong_aud), 401).await["detail"].as_str().unwrap().contains("aud"));
    let no_iss = tokens_with(&[]).issue(USER).unwrap().access_token;
    problem(auth(calls(), &no_iss), 401).await;

    // alg: none with the claims of a good token, with and without a signature part.
    let good_token = good.issue(USER).unwrap().access_token;
    let parts: Vec<&str> = good_token.split('.').collect();
    use base64::Engine as _;
    let none_header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    for token in [format!("{none_header}.{}.", parts[1]), format!("{none_header}.{}.{}", parts[1], parts[2])] {
        let body = problem(auth(calls(), &token), 401).await;
        assert!(body["detail"].as_str().unwrap().contains("HS256"), "{body}");
    }
    // HS512 with the right key is refused too.
    let hs512 = jsonwebtoken_hs512(&good_token);
    assert!(problem(auth(calls(), &hs512), 401).await["detail"].as_str().unwrap().contains("HS256"));

    // A token for a user that does not exist.
    let stranger = good.issue("mallory").unwrap().access_token;
    problem(auth(calls(), &stranger), 401).await;
    server.shutdown().await;
}

/// A token with an HS512 header (signature irrelevant: the algorithm is refused first).
fn jsonwebtoken_hs512(token: &str) -> String {
    use base64::Engine as _;
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"HS512","typ":"JWT"}"#);
    let parts: Vec<&str> = token.split('.').collect();
    format!("{header}.{}.{}", parts[1], parts[2])
}

#[tokio::test]
async fn error_shapes_of_every_route() {
    let server = TestServer::start(&[], Db::Sqlite, Ari::Down).await;
    let token = server.mint(USER);
    let c = client();

    // Unknown routes and wrong methods.
    problem(c.get(server.url("/nope")), 404).await;
    problem(c.get(server.url("/api/v1/calls/")), 404).await;
    let (status, headers, _) = send(c.put(server.url("/api/v1/calls"))).await;
    assert_eq!((status, headers["allow"].to_str().unwrap()), (405, "GET, POST"));
    let (status, headers, _) = send(c.get(server.url("/api/v1/token"))).await;
    assert_eq!((status, headers["allow"].to_str().unwrap()), (405, "POST"));
    problem(c.post(server.url("/healthz")), 405).await;

    // Call ids.
    let unknown = CallId::new();
    for path in [format!("/api/v1/calls/{unknown}"), format!("/api/v1/status/{unknown}")] {
        problem(auth(c.get(server.url(&path)), &token), 404).await;
        let bad = path.replace(&unknown.to_string(), "not-a-uuid");
        assert!(problem(auth(c.get(server.url(&bad)), &token), 400).await["detail"].as_str().unwrap().contains("UUID"));
    }
    problem(auth(c.delete(server.url(&format!("/api/v1/calls/{unknown}"))), &token), 404).await;
    problem(auth(c.delete(server.url("/api/v1/calls/123")), &token), 400).await;
    problem(auth(c.get(server.url(&format!("/api/v1/calls/{unknown}/events"))), &token), 404).await;
    problem(auth(c.get(server.url("/api/v1/calls/xyz/events")), &token), 400).await;

    // Call creation bodies.
    let create = || auth(c.post(server.url("/api/v1/calls")), &token);
    let detail = |body: Value| body["detail"].as_str().unwrap().to_owned();
    assert!(detail(problem(create().header("content-type", "text/plain").body("{}"), 415).await)
        .contains("application/json"));
    problem(create().body(r#"{"phone_number":"+15550000001"}"#), 415).await;
    let json_create = || create().header("content-type", "application/json");
    assert!(detail(problem(json_create().body("{\"phone_number\":"), 400).await).contains("JSON"));
    assert!(detail(problem(json_create().body(r#"{"phone_number": 5}"#), 400).await).contains("invalid type"));
    assert!(detail(problem(json_create().body(r#"{"phone_number":"+15550000001","colour":"red"}"#), 400).await)
        .contains("unknown field"));
    assert!(detail(problem(json_create().body(r#"{"phone_number":"+1555x"}"#), 400).await).contains("phone number"));
    assert!(detail(problem(json_create().body("{}"), 400).await).contains("phone_number"));
    problem(create(), 400).await;
    let priority = r#"{"phone_number":"+15550000001","priority":-1}"#;
    problem(json_create().body(priority), 400).await;
    let big = format!(r#"{{"phone_number":"+15550000001","context":"{}"}}"#, "x".repeat(70 * 1024));
    assert!(detail(problem(json_create().body(big), 413).await).contains("bytes"));
    let bad_key = json_create().header("idempotency-key", "").body(r#"{"phone_number":"+15550000001"}"#);
    problem(bad_key, 400).await;
    let long_context = json!({"phone_number": "+15550000001", "context": "x".repeat(200)});
    problem(create().json(&long_context), 400).await;

    // The interaction route.
    let interaction = |n: &str| auth(c.post(server.url(&format!("/api/v1/interaction/{n}"))), &token);
    problem(interaction("12"), 400).await;
    problem(interaction("+1555;evil"), 400).await;
    problem(interaction("+15550000001").json(&json!({"phone_number": "+15550000002"})), 400).await;
    problem(interaction("+15550000001").json(&json!({"timeout": "soon"})), 400).await;

    // List parameters.
    for query in
        ["status=lost", "limit=0", "limit=x", "from=yesterday", "to=2025-13-01T00:00:00Z", "cursor=abc", "page=2"]
    {
        problem(auth(c.get(server.url(&format!("/api/v1/calls?{query}"))), &token), 400).await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn ari_failure_is_a_502_and_the_call_is_stored_as_failed() {
    let server = TestServer::start(&[], Db::Sqlite, Ari::Down).await;
    let token = server.mint(USER);
    let c = client();
    let body =
        problem(auth(c.post(server.url("/api/v1/calls")), &token).json(&json!({"phone_number": "+15550000001"})), 502)
            .await;
    let call_id = body["call_id"].as_str().expect("the failed call's id").to_owned();
    let (status, _, call) = send(auth(c.get(server.url(&format!("/api/v1/calls/{call_id}"))), &token)).await;
    assert_eq!(status, 200);
    assert_eq!(call["status"], "failed");
    // Nothing answered: whether it was placed is unknown, and the call says so.
    assert_eq!(call["failure_reason"], "lost");
    assert_eq!(call["is_completed"], true);
    assert_eq!(call["history"].as_array().unwrap().len(), 3, "accepted, sent, lost");
    // Same view under /status.
    let (_, _, status_view) = send(auth(c.get(server.url(&format!("/api/v1/status/{call_id}"))), &token)).await;
    assert_eq!(status_view, call);
    // An ended call cannot be canceled.
    let body = problem(auth(c.delete(server.url(&format!("/api/v1/calls/{call_id}"))), &token), 409).await;
    assert_eq!(body["call_id"], call_id.as_str());
    // Its events: the terminal state at once, then the stream ends.
    let response = within("events", auth(c.get(server.url(&format!("/api/v1/calls/{call_id}/events"))), &token).send())
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = within("event stream", response.text()).await.unwrap();
    assert!(text.starts_with("event: status\nid: 3\ndata: {"), "{text}");
    assert_eq!(text.matches("event: status").count(), 1, "{text}");

    // The interaction route with an empty body, and the documented shape of a call.
    let body = problem(auth(c.post(server.url("/api/v1/interaction/%2B15550000002")), &token), 502).await;
    assert!(body["call_id"].is_string());
    let schema = &ivr_server::openapi::spec()["components"]["schemas"]["Call"]["properties"];
    let documented: BTreeSet<&str> = schema.as_object().unwrap().keys().map(String::as_str).collect();
    let served: BTreeSet<&str> = call.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(documented, served, "the Call schema and the served call differ");
    let transition = &ivr_server::openapi::spec()["components"]["schemas"]["Transition"]["properties"];
    let documented: BTreeSet<&str> = transition.as_object().unwrap().keys().map(String::as_str).collect();
    let served: BTreeSet<&str> = call["history"][0].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(documented, served);
    server.shutdown().await;
}

fn stored_call(number: &str, created_at: time::OffsetDateTime) -> Call {
    Call::new(CallId::new(), ivr_core::store::conformance::new_call(number), created_at)
}

/// A fixed instant.
fn t0() -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(1_750_000_000).unwrap()
}

#[tokio::test]
async fn list_filters_and_pagination() {
    let server = TestServer::start(&[], Db::Sqlite, Ari::Down).await;
    let token = server.mint(USER);
    let store = server.state.manager().store().clone();
    let t0 = t0();
    let mut ids = Vec::new();
    for i in 0..7 {
        let number = if i % 2 == 0 { "+15550000001" } else { "+15550000002" };
        let call = stored_call(number, t0 + Duration::from_secs(i * 60));
        within("insert", store.insert(&call)).await.unwrap();
        ids.push(call.call_id.to_string());
    }
    // One of them failed.
    let failed = ivr_core::Transition::new(
        ivr_core::Step::Ended { reason_if_unanswered: ivr_core::FailureReason::Busy },
        "test",
    );
    within("apply", store.apply(ids[0].parse().unwrap(), &failed)).await.unwrap();

    let c = client();
    let get = |query: String| auth(c.get(server.url(&format!("/api/v1/calls?{query}"))), &token);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let query = match &cursor {
            Some(cursor) => format!("limit=3&cursor={cursor}"),
            None => "limit=3".into(),
        };
        let (status, _, page) = send(get(query)).await;
        assert_eq!(status, 200, "{page}");
        assert!(page["calls"].as_array().unwrap().len() <= 3);
        seen.extend(page["calls"].as_array().unwrap().iter().map(|c| c["call_id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);

    let (_, _, page) = send(get("status=failed".into())).await;
    assert_eq!(page["calls"].as_array().unwrap().len(), 1);
    assert_eq!(page["calls"][0]["failure_reason"], "busy");
    let (_, _, page) = send(get("status=failed,pending".into())).await;
    assert_eq!(page["calls"].as_array().unwrap().len(), 7);
    let (_, _, page) = send(get("status=pending&status=dialing".into())).await;
    assert_eq!(page["calls"].as_array().unwrap().len(), 6);
    let (_, _, page) = send(get("phone_number=%2B15550000002".into())).await;
    assert_eq!(page["calls"].as_array().unwrap().len(), 3);
    // A `+` left unencoded arrives as a space and is read as `+`.
    let (_, _, page) = send(get("phone_number=+15550000002".into())).await;
    assert_eq!(page["calls"].as_array().unwrap().len(), 3);
    let from = (t0 + Duration::from_secs(120)).format(&time::format_description::well_known::Rfc3339).unwrap();
    let to = (t0 + Duration::from_secs(240)).format(&time::format_description::well_known::Rfc3339).unwrap();
    let (_, _, page) = send(get(format!("from={from}&to={to}"))).await;
    let listed: Vec<&str> = page["calls"].as_array().unwrap().iter().map(|c| c["call_id"].as_str().unwrap()).collect();
    assert_eq!(listed, vec![ids[3].as_str(), ids[2].as_str()]);
    server.shutdown().await;
}

#[tokio::test]
async fn disable_db_mode() {
    let server = TestServer::start(&[], Db::Disabled, Ari::Down).await;
    assert!(server.state.users().is_none());
    let body = problem(form(&server, &format!("username={USER}&password={PASSWORD}")), 503).await;
    assert!(body["detail"].as_str().unwrap().contains("database"), "{body}");
    // Offline tokens (as `ivr-server token --sub dev` mints them) work, for any subject.
    let token = server.mint("dev");
    let body = problem(auth(client().post(server.url("/api/v1/interaction/+15550000005")), &token), 502).await;
    let call_id = body["call_id"].as_str().unwrap();
    let (status, _, call) = send(auth(client().get(server.url(&format!("/api/v1/calls/{call_id}"))), &token)).await;
    assert_eq!((status, call["status"].as_str()), (200, Some("failed")));
    problem(client().get(server.url("/api/v1/calls")), 401).await;
    server.shutdown().await;
}

#[tokio::test]
async fn store_outage_is_a_503() {
    let server = TestServer::start(&[], Db::Sqlite, Ari::Down).await;
    let token = server.mint(USER);
    let (status, _, _) = send(auth(client().get(server.url("/api/v1/calls")), &token)).await;
    assert_eq!(status, 200);
    within("close pool", server.sql.as_ref().unwrap().pool().close()).await;
    problem(auth(client().get(server.url("/api/v1/calls")), &token), 503).await;
    problem(auth(client().get(server.url(&format!("/api/v1/calls/{}", CallId::new()))), &token), 503).await;
    problem(form(&server, &format!("username={USER}&password={PASSWORD}")), 503).await;
    let body = problem(client().get(server.url("/readyz")), 503).await;
    assert_eq!(body["store"], "unavailable");
    server.shutdown().await;
}

#[tokio::test]
async fn health_docs_and_metrics_gating() {
    let server = TestServer::start(&[], Db::Sqlite, Ari::Down).await;
    let c = client();
    let (status, _, body) = send(c.get(server.url("/healthz"))).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let body = problem(c.get(server.url("/readyz")), 503).await;
    assert_eq!((body["store"].as_str(), body["ari"].as_str()), (Some("ok"), Some("disconnected")));
    let response = within("get", c.get(server.url("/docs")).send()).await.unwrap();
    let policy = response.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(policy.contains("default-src 'none'") && policy.contains("connect-src 'self'"), "{policy}");
    let docs = within("docs", response.text()).await.unwrap();
    assert!(docs.contains("<html") && docs.contains("/docs/swagger-ui-bundle.js"), "{docs}");
    let response = within("docs file", c.get(server.url("/docs/swagger-ui-bundle.js")).send()).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/javascript; charset=utf-8");
    let (status, headers, spec) = send(c.get(server.url("/openapi.json"))).await;
    assert_eq!((status, headers["content-type"].to_str().unwrap()), (200, "application/json"));
    assert_eq!(spec["openapi"], "3.1.0");
    assert!(spec["paths"]["/api/v1/calls/{call_id}/events"]["get"].is_object());
    problem(c.get(server.url("/metrics")), 404).await;
    server.shutdown().await;

    let server =
        TestServer::start(&[("METRICS_ENABLED", "true"), ("DOCS_ENABLED", "false")], Db::Sqlite, Ari::Down).await;
    problem(c.get(server.url("/docs")), 404).await;
    problem(c.get(server.url("/docs/swagger-ui.css")), 404).await;
    problem(c.get(server.url("/openapi.json")), 404).await;
    let token = server.mint(USER);
    let id = CallId::new();
    problem(auth(c.get(server.url(&format!("/api/v1/calls/{id}"))), &token), 404).await;
    problem(auth(c.post(server.url("/api/v1/interaction/+15550009999")), &token), 502).await;
    let response = within("metrics", c.get(server.url("/metrics")).send()).await.unwrap();
    assert_eq!(response.status(), 200);
    let text = within("metrics body", response.text()).await.unwrap();
    assert!(
        text.contains(r#"ivr_http_requests_total{method="GET",route="/api/v1/calls/{call_id}",status="4xx"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"route="unmatched""#) || !text.contains("/nope"));
    assert!(text.contains("ivr_http_request_duration_seconds_bucket"));
    assert!(text.contains(r#"ivr_originations_total{outcome="lost"} 1"#), "the manager's metrics: {text}");
    assert!(!text.contains(&id.to_string()) && !text.contains("15550009999"), "no ids or numbers in labels");
    server.shutdown().await;
}

#[tokio::test]
async fn openapi_matches_the_router() {
    let spec = ivr_server::openapi::spec();
    let mut documented = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let routed: BTreeSet<(String, String)> =
        ivr_server::router::ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(documented, routed);
    // Every $ref resolves.
    let text = serde_json::to_string(spec).unwrap();
    for reference in text.split("\"$ref\":\"#/").skip(1) {
        let pointer = reference.split('"').next().unwrap();
        assert!(spec.pointer(&format!("/{pointer}")).is_some(), "dangling $ref {pointer}");
    }
    // The documented problem statuses are the ones the code uses.
    for (_, _, status, _) in ivr_server::problem::KINDS {
        assert!(text.contains(&format!("\"{status}\":")) || *status == 405, "status {status} is undocumented");
    }
}

#[tokio::test]
async fn shutdown_ends_event_streams_and_stops_accepting() {
    let mut server = TestServer::start(&[("SHUTDOWN_GRACE_SECONDS", "3")], Db::Sqlite, Ari::Down).await;
    let token = server.mint(USER);
    // A call that stays pending (no one follows it): its event stream stays open.
    let call = stored_call("+15550000001", ivr_core::call::now());
    within("insert", server.state.manager().store().insert(&call)).await.unwrap();
    let mut response = within(
        "events",
        auth(client().get(server.url(&format!("/api/v1/calls/{}/events", call.call_id))), &token).send(),
    )
    .await
    .unwrap();
    let first = within("first event", response.chunk()).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("\"status\":\"pending\""));
    let started = Instant::now();
    server.begin_shutdown();
    // The stream ends (rather than being cut after the grace period).
    while within("stream end", response.chunk()).await.unwrap().is_some() {}
    server.serve_stopped().await;
    assert!(started.elapsed() < Duration::from_secs(3), "drained in {:?}", started.elapsed());
    let refused = within("connect after shutdown", tokio::net::TcpStream::connect(server.addr)).await;
    assert!(refused.is_err(), "no longer accepting");
}

#[tokio::test]
async fn the_binary_reports_bad_settings_and_arguments() {
    let binary = env!("CARGO_BIN_EXE_ivr-server");
    let run = |args: &[&str], vars: &[(&str, &str)]| {
        let output = std::process::Command::new(binary)
            .args(args)
            .env_clear()
            .envs(vars.iter().copied())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run ivr-server");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, _, stderr) = run(&["frobnicate"], &[]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("usage: ivr-server"), "{stderr}");
    let (code, _, stderr) = run(&["token"], &[]);
    assert_eq!(code, Some(2), "{stderr}");

    let (code, _, stderr) = run(&["serve"], &[("ARI_PASSWORD", ARI_PASSWORD)]);
    assert_eq!(code, Some(1));
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("SECRET_KEY") && stderr.contains("required"), "{stderr}");
    let (code, _, stderr) = run(&["serve"], &[("SECRET_KEY", "too-short-secret"), ("ARI_PASSWORD", ARI_PASSWORD)]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("SECRET_KEY") && !stderr.contains("too-short-secret"), "{stderr}");
    let (code, _, stderr) =
        run(&[], &[("SECRET_KEY", SECRET_KEY), ("ARI_PASSWORD", ARI_PASSWORD), ("LISTEN_ADDR", "nowhere")]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("LISTEN_ADDR"), "{stderr}");
    let (code, _, stderr) = run(
        &[],
        &[("SECRET_KEY", SECRET_KEY), ("ARI_PASSWORD", ARI_PASSWORD), ("DATABASE_URL", "mysql://root:hunter2@db/x")],
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains("DATABASE_URL") && !stderr.contains("hunter2"), "{stderr}");

    // `token --sub` mints offline a token the server accepts.
    let (code, stdout, stderr) = run(&["token", "--sub", "dev"], &[("SECRET_KEY", SECRET_KEY)]);
    assert_eq!(code, Some(0), "{stderr}");
    let tokens = ivr_server::auth::Tokens::new(&settings(&[]).auth);
    assert_eq!(tokens.verify(stdout.trim()).unwrap(), "dev");

    // `migrate` and `user add` (password from stdin) on a fresh SQLite file.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("cli.db").display());
    let db = [("DATABASE_URL", url.as_str()), ("BCRYPT_COST", "4")];
    let (code, _, stderr) = run(&["migrate"], &db);
    assert_eq!(code, Some(0), "{stderr}");
    let mut child = std::process::Command::new(binary)
        .args(["user", "add", "bob"])
        .env_clear()
        .envs(db.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"bobs-password-1\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let (code, stdout, _) = run(&["user", "list"], &db);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("bob\tenabled"), "{stdout}");
    let (code, _, _) = run(&["user", "disable", "bob"], &db);
    assert_eq!(code, Some(0));
    let (code, _, stderr) = run(&["user", "disable", "nobody"], &db);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("nobody"), "{stderr}");
}

/// Runs a whole flow with the known secrets, then looks for them in everything logged.
#[tokio::test]
async fn no_secret_appears_in_the_logs() {
    let server = TestServer::start(&[("METRICS_ENABLED", "true")], Db::Sqlite, Ari::Down).await;
    let token = server.login().await;
    let c = client();
    send(auth(c.get(server.url("/api/v1/calls")), &token)).await;
    send(auth(c.post(server.url("/api/v1/calls")), &token).json(&json!({"phone_number": "+15550000001"}))).await;
    send(form(&server, &format!("username={USER}&password=wrong-{PASSWORD}"))).await;
    send(auth(c.get(server.url("/api/v1/calls")), &format!("{token}x"))).await;
    send(c.get(server.url("/metrics"))).await;
    let hash: String = within(
        "hash",
        sqlx::query_scalar::<_, String>("SELECT password_hash FROM ivr_users WHERE username = $1")
            .bind(USER)
            .fetch_one(server.sql.as_ref().unwrap().pool()),
    )
    .await
    .unwrap();
    server.shutdown().await;

    let logs = logs();
    assert!(logs.contains("\"route\":\"/api/v1/calls\""), "request lines are captured");
    for secret in [SECRET_KEY, ARI_PASSWORD, PASSWORD, token.as_str(), hash.as_str()] {
        assert!(!logs.contains(secret), "a secret was logged");
    }
    let token_body = token.split('.').nth(1).unwrap();
    assert!(!logs.contains(token_body), "a token's claims part was logged");
    assert!(!logs.to_ascii_lowercase().contains("authorization: bearer"));
}

/// Used steadily, a user is asked about again in the background once half of
/// USER_CACHE_SECONDS has passed: disabled just after a check, they are locked out about half a
/// bound later rather than a whole one (and never later than the bound).
#[tokio::test]
async fn under_steady_use_the_user_is_asked_again_before_the_bound_lapses() {
    let bound = Duration::from_secs(2);
    let server = TestServer::start(&[("USER_CACHE_SECONDS", "2")], Db::Sqlite, Ari::Down).await;
    let token = server.login().await;
    let get = || auth(client().get(server.url("/api/v1/calls")), &token);
    let (status, _, _) = send(get()).await;
    assert_eq!(status, 200, "found enabled, and remembered from now");
    within("disable", server.state.users().unwrap().set_disabled(USER, true)).await.unwrap();
    let disabled = Instant::now();
    let locked_out = loop {
        let (status, _, body) = send(get()).await;
        if status == 401 {
            break disabled.elapsed();
        }
        assert_eq!(status, 200, "{body}");
        let since = disabled.elapsed();
        assert!(since < bound + Duration::from_millis(500), "still let in {since:?} after being disabled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        locked_out < bound * 4 / 5,
        "locked out {locked_out:?} after being disabled: not asked again at half the bound"
    );
    problem(get(), 401).await;
    server.shutdown().await;
}

/// On PostgreSQL a user found enabled is trusted until the users table announces a change
/// (user_changes.rs: LISTEN, kept honest by a heartbeat), not for USER_CACHE_SECONDS: with a
/// bound of a minute, disabling the user still locks their token out within moments, and
/// enabling them lets them in again at once.
#[tokio::test]
async fn on_postgres_a_disabled_user_is_heard_of_at_once() {
    let vars = [("USER_CACHE_SECONDS", "60")];
    let Some((server, url)) = on_postgres("on_postgres_a_disabled_user_is_heard_of_at_once", &vars).await else {
        return;
    };
    let hearing = tokio::spawn(ivr_server::user_changes::follow(server.state.clone(), url, std::future::pending()));
    within("the first heartbeat", async {
        while !server.state.enabled_users().is_hearing() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let metrics = ivr_server::metrics::render(server.state.registry());
    assert!(metrics.contains("\nivr_user_changes_heard 1\n"), "{metrics}");
    let token = server.login().await;
    let get = || auth(client().get(server.url("/api/v1/calls")), &token);
    let (status, _, _) = send(get()).await;
    assert_eq!(status, 200);
    let users = server.state.users().unwrap();
    within("disable", users.set_disabled(USER, true)).await.unwrap();
    let disabled = Instant::now();
    loop {
        let (status, _, body) = send(get()).await;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            disabled.elapsed() < Duration::from_secs(5),
            "still let in {:?} after being disabled",
            disabled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    within("enable", users.set_disabled(USER, false)).await.unwrap();
    let (status, _, _) = send(get()).await;
    assert_eq!(status, 200, "a no is never remembered");
    hearing.abort();
    server.shutdown().await;
}

/// A LISTEN connection that hears nothing, not even the heartbeat (here it listens on another
/// database, as one behind a pooler that drops notifications would), is never trusted: the
/// silence is noticed and logged, and a disabled user is locked out within USER_CACHE_SECONDS
/// as without it.
#[tokio::test]
async fn on_postgres_a_connection_that_hears_nothing_is_not_trusted() {
    let vars = [("USER_CACHE_SECONDS", "1")];
    let Some((server, url)) = on_postgres("on_postgres_a_connection_that_hears_nothing_is_not_trusted", &vars).await
    else {
        return;
    };
    let mut elsewhere = reqwest::Url::parse(&url).expect("IVR_TEST_DATABASE_URL");
    elsewhere.set_path("/postgres");
    let follow = ivr_server::user_changes::follow(server.state.clone(), elsewhere.to_string(), std::future::pending());
    let hearing = tokio::spawn(follow);
    within("the silence to be noticed", async {
        while !logs().contains("nothing heard for") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(!server.state.enabled_users().is_hearing());
    let metrics = ivr_server::metrics::render(server.state.registry());
    assert!(metrics.contains("\nivr_user_changes_heard 0\n"), "{metrics}");
    let token = server.login().await;
    let get = || auth(client().get(server.url("/api/v1/calls")), &token);
    let (status, _, _) = send(get()).await;
    assert_eq!(status, 200);
    within("disable", server.state.users().unwrap().set_disabled(USER, true)).await.unwrap();
    tokio::time::sleep(ivr_server::cache::DEFAULT_USER_CACHE).await;
    problem(get(), 401).await;
    hearing.abort();
    server.shutdown().await;
}

/// With USER_CACHE_SECONDS=0 every request asks the users table: a disabled user's token stops
/// working with the next request.
#[tokio::test]
async fn without_the_user_cache_disabling_locks_out_at_once() {
    let server = TestServer::start(&[("USER_CACHE_SECONDS", "0")], Db::Sqlite, Ari::Down).await;
    let token = server.login().await;
    let (status, _, _) = send(auth(client().get(server.url("/api/v1/calls")), &token)).await;
    assert_eq!(status, 200);
    within("disable", server.state.users().unwrap().set_disabled(USER, true)).await.unwrap();
    problem(auth(client().get(server.url("/api/v1/calls")), &token), 401).await;
    server.shutdown().await;
}
