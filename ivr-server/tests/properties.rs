//! Property tests of ivr-server's parsers: the router, the list query, the settings' lists
//! (destination prefixes, trusted proxies), token checking, and, over real TCP, every body and
//! header a route reads (the token form, the call body, the interaction path, the list query,
//! Authorization and Idempotency-Key). Arbitrary input never panics and is never a 500; what
//! is accepted round-trips.

mod common;

use common::*;
use hyper::Method;
use ivr_server::client::TrustedProxies;
use ivr_server::policy::DestinationPolicy;
use ivr_server::router::{self, Miss, Route, ROUTES};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, ..ProptestConfig::default() }
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        prop::sample::select(vec![Method::GET, Method::POST, Method::DELETE, Method::PUT, Method::PATCH, Method::HEAD]),
        "[A-Z]{1,10}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
    ]
}

/// Paths made of the routes' own segments, odd ones and percent escapes, and anything at all.
fn path() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        prop::sample::select(vec![
            "api",
            "v1",
            "calls",
            "events",
            "token",
            "status",
            "interaction",
            "healthz",
            "",
            "%2B1",
            "%zz",
            "%",
            "%ff"
        ])
        .prop_map(str::to_owned),
        "[a-zA-Z0-9%+._~-]{0,12}",
    ];
    prop_oneof![prop::collection::vec(segment, 0..6).prop_map(|s| format!("/{}", s.join("/"))), any::<String>(),]
}

/// `text` with every byte but unreserved ones percent-encoded.
fn encode_segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Text for a path segment other than `.` and `..`, which a URL client resolves away (encoded
/// or not) before sending.
fn not_a_dot_segment(pattern: &'static str) -> impl Strategy<Value = String> {
    pattern.prop_filter("a dot segment", |s| s != "." && s != "..")
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn the_router_never_panics_and_its_answers_agree(method in method(), path in path()) {
        match router::route(&method, &path) {
            Ok(route) => {
                let template = route.template();
                prop_assert!(ROUTES.iter().any(|(m, t)| *m == method && *t == template), "{} {}", method, template);
            }
            Err(Miss::MethodNotAllowed(allow)) => {
                prop_assert!(!allow.is_empty() && !allow.contains(&method));
                for other in allow {
                    prop_assert!(router::route(&other, &path).is_ok());
                }
            }
            Err(Miss::NotFound) => {}
        }
    }

    #[test]
    fn every_route_matches_with_any_parameter(param in not_a_dot_segment("\\PC{1,40}"), index in 0..ROUTES.len()) {
        let (method, template) = &ROUTES[index];
        let path = ["{number}", "{call_id}", "{file}"].iter().fold(template.to_string(), |path, name| path.replace(name, &encode_segment(&param)));
        let route = router::route(method, &path).unwrap();
        prop_assert_eq!(route.template(), *template);
        // The parameter comes back decoded, exactly as it was.
        let got = match &route {
            Route::Interaction { number } => Some(number.clone()),
            Route::GetCall { call_id } | Route::CancelCall { call_id } | Route::CallEvents { call_id } | Route::CallDeliveries { call_id } | Route::Status { call_id } => Some(call_id.clone()),
            Route::DocsFile { file } => Some(file.clone()),
            _ => None,
        };
        if template.contains('{') {
            prop_assert_eq!(got.as_deref(), Some(param.as_str()));
        }
    }

    #[test]
    fn list_queries_never_panic_and_refuse_with_400(query in prop_oneof![any::<String>(), "[a-z_]{1,12}=[a-z0-9,+:. -]{0,20}(&[a-z_]{1,12}=[a-z0-9,+:. -]{0,20}){0,3}"]) {
        if let Err(problem) = ivr_server::request::ListQuery::parse(&query) {
            prop_assert_eq!(problem.status.as_u16(), 400);
            prop_assert!(!problem.detail.is_empty());
        }
    }

    #[test]
    fn accepted_list_queries_round_trip(
        statuses in prop::sample::subsequence(ivr_core::CallStatus::ALL.to_vec(), 0..=6),
        limit in 1usize..=1000,
        digits in "[0-9]{3,15}",
        from in 0i64..4_000_000_000,
        span in 0i64..1_000_000,
        // A cursor's time has at most 18 digits (microseconds until the year 33658).
        micros in -999_999_999_999_999_999i64..=999_999_999_999_999_999,
        id in any::<u128>(),
    ) {
        let number = format!("+{digits}");
        let fmt = |secs: i64| time::OffsetDateTime::from_unix_timestamp(secs).unwrap().format(&time::format_description::well_known::Rfc3339).unwrap();
        let cursor = format!("{micros}.{}", uuid::Uuid::from_u128(id));
        let mut form = form_urlencoded::Serializer::new(String::new());
        if !statuses.is_empty() {
            // No statuses is said by leaving `status` out (an empty value is refused).
            form.append_pair("status", &statuses.iter().map(ToString::to_string).collect::<Vec<_>>().join(","));
        }
        form.append_pair("limit", &limit.to_string())
            .append_pair("phone_number", &number)
            .append_pair("from", &fmt(from))
            .append_pair("to", &fmt(from + span))
            .append_pair("cursor", &cursor);
        let q = ivr_server::request::ListQuery::parse(&form.finish()).map(|q| q.to_call_query()).unwrap();
        prop_assert_eq!(q.statuses, statuses);
        prop_assert_eq!(q.limit, limit);
        prop_assert_eq!(q.phone_number.map(|p| p.to_string()), Some(number.clone()));
        prop_assert_eq!(q.created_from.unwrap().unix_timestamp(), from);
        prop_assert_eq!(q.created_to.unwrap().unix_timestamp(), from + span);
        prop_assert_eq!(q.after.unwrap().to_string(), cursor);
        // A `+` sent unencoded (read as a space by form decoding) still means `+`.
        let q = ivr_server::request::ListQuery::parse(&format!("phone_number={number}")).map(|q| q.to_call_query()).unwrap();
        prop_assert_eq!(q.phone_number.map(|p| p.to_string()), Some(number.clone()));
    }

    #[test]
    fn prefix_lists_parse_or_name_the_bad_entry(text in prop_oneof![any::<String>(), "(\\+[0-9]{1,16}|[0-9+a ]{0,4})(, ?(\\+[0-9]{1,16}|[0-9+a ]{0,4})){0,4}"]) {
        match DestinationPolicy::parse(Some(&text), None) {
            Ok(policy) => {
                // Accepted: the list, joined again, gives the same policy.
                let again = DestinationPolicy::parse(Some(&policy.allowed().join(",")), None).unwrap();
                prop_assert_eq!(again, policy);
            }
            Err((variable, problem)) => {
                prop_assert_eq!(variable, "ALLOWED_PREFIXES");
                prop_assert!(problem.contains("is not an E.164 prefix"));
            }
        }
    }

    #[test]
    fn trusted_proxy_lists_parse_and_round_trip(text in prop_oneof![
        any::<String>(),
        "((25[0-5]|1?[0-9]{1,2})\\.){3}(25[0-5]|1?[0-9]{1,2})(/[0-9]{1,2})?(, ?::1(/[0-9]{1,3})?)?",
    ]) {
        if let Ok(proxies) = TrustedProxies::parse(&text) {
            prop_assert_eq!(TrustedProxies::parse(&proxies.to_string()).unwrap(), proxies);
        }
    }

    #[test]
    fn arbitrary_bearer_tokens_are_refused_without_panicking(token in prop_oneof![any::<String>(), "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,40}"]) {
        let tokens = tokens();
        prop_assert!(tokens.verify(&token).is_err());
        let mut headers = hyper::HeaderMap::new();
        if let Ok(value) = hyper::header::HeaderValue::from_str(&format!("Bearer {token}")) {
            headers.insert(hyper::header::AUTHORIZATION, value);
            prop_assert!(ivr_server::auth::bearer(&headers).and_then(|t| tokens.verify(t)).is_err());
        }
    }
}

fn tokens() -> ivr_server::auth::Tokens {
    ivr_server::auth::Tokens::new(&settings(&[]).auth)
}

// ---- Over real TCP: what each route reads ----

/// Runs `cases` inputs from `strategy` against one server, each through `check`.
fn against_server<S: Strategy>(
    cases: u32,
    strategy: S,
    check: impl Fn(&TestServer, String, S::Value) -> futures::BoxFuture<'_, Result<(), TestCaseError>>,
) where
    S::Value: std::fmt::Debug,
{
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let vars = [
        ("LOGIN_ADDRESS_FAILURES", "1000000"),
        ("LOGIN_USER_FAILURES", "1000000"),
        ("LOGIN_SLOWDOWN_MS", "0"),
        ("MAX_ACTIVE_CALLS", "1000000"),
    ];
    let server = runtime.block_on(TestServer::start(&vars, Db::Sqlite, Ari::Down));
    let token = server.mint(USER);
    let mut runner = TestRunner::new(Config { cases, ..Config::default() });
    let result = runner.run(&strategy, |value| runtime.block_on(check(&server, token.clone(), value)));
    runtime.block_on(server.shutdown());
    if let Err(e) = result {
        panic!("{e}");
    }
}

mod futures {
    pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
}

/// The answer is a success, or a problem+json 4xx/502/503 with a detail: never a 500.
async fn answered_cleanly(request: reqwest::RequestBuilder, allowed: &[u16]) -> Result<(u16, Value), TestCaseError> {
    let (status, headers, body) = send(request).await;
    prop_assert!(allowed.contains(&status), "status {} not in {:?}: {}", status, allowed, body);
    if status >= 400 {
        prop_assert_eq!(headers["content-type"].to_str().unwrap(), "application/problem+json");
        prop_assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{}", body);
    }
    Ok((status, body))
}

fn bytes_or_text(text: impl Strategy<Value = String>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![prop::collection::vec(any::<u8>(), 0..200), text.prop_map(String::into_bytes)]
}

#[test]
fn the_token_form_never_fails_badly_and_a_valid_form_in_any_order_logs_in() {
    let garbage = bytes_or_text("(username|password|grant_type|scope|client_id|x)=[a-zA-Z0-9%+&=-]{0,20}(&(username|password|grant_type|scope)=[a-z0-9%+-]{0,12}){0,4}");
    against_server(64, garbage, |server, _, body| {
        Box::pin(async move {
            let request = client()
                .post(server.url("/api/v1/token"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body);
            answered_cleanly(request, &[200, 400, 401]).await.map(drop)
        })
    });
    // Each optional OAuth2 field at most once (a field given twice is refused).
    let extras = (
        any::<bool>(),
        prop::collection::btree_map(
            prop::sample::select(vec!["scope", "client_id", "client_secret"]),
            any::<String>(),
            0..3,
        ),
    )
        .prop_map(|(grant_type, others)| {
            let mut fields: Vec<(String, String)> = others.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            if grant_type {
                fields.push(("grant_type".into(), "password".into()));
            }
            fields
        });
    against_server(32, (extras, any::<prop::sample::Index>()), |server, _, (extras, at)| {
        Box::pin(async move {
            let mut fields = extras;
            fields.push(("username".into(), USER.into()));
            fields.insert(at.index(fields.len()), ("password".into(), PASSWORD.into()));
            let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(&fields).finish();
            let request = client()
                .post(server.url("/api/v1/token"))
                .header("content-type", "application/x-www-form-urlencoded; charset=utf-8")
                .body(body);
            let (status, token) = answered_cleanly(request, &[200]).await?;
            let sub =
                ivr_server::auth::Tokens::new(&settings(&[]).auth).verify(token["access_token"].as_str().unwrap());
            prop_assert_eq!(sub.as_deref(), Ok(USER));
            prop_assert_eq!(status, 200);
            Ok(())
        })
    });
}

/// JSON objects with the call body's fields (and others), of any type.
fn call_json() -> impl Strategy<Value = Vec<u8>> {
    let key = prop::sample::select(vec![
        "phone_number",
        "context",
        "extension",
        "priority",
        "timeout",
        "caller_id",
        "audio",
        "variables",
        "max_attempts",
        "other",
    ]);
    let value = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "\\+?[0-9]{0,16}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
        prop::collection::btree_map("[A-Z_]{0,8}", "[a-z]{0,8}", 0..3).prop_map(|m| json!(m)),
    ];
    prop_oneof![
        prop::collection::btree_map(key, value, 0..6).prop_map(|m| serde_json::to_vec(&m).unwrap()),
        bytes_or_text(any::<String>()),
    ]
}

#[test]
fn call_bodies_paths_and_headers_never_fail_badly() {
    // Ari::Down: a call that passes validation is stored, then refused by Asterisk (502).
    let allowed = [201, 400, 403, 409, 413, 415, 502];
    let header_value = prop_oneof!["[ -~]{0,70}", Just(String::new()), "[a-z]{90,100}"];
    let input = (call_json(), not_a_dot_segment("\\PC{1,24}"), header_value.clone(), header_value);
    against_server(64, input, |server, token, (body, number, key, authorization)| {
        Box::pin(async move {
            let create = client()
                .post(server.url("/api/v1/calls"))
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .header("idempotency-key", key.clone())
                .body(body.clone());
            answered_cleanly(create, &allowed).await?;
            let interaction = client()
                .post(server.url(&format!("/api/v1/interaction/{}", encode_segment(&number))))
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(body);
            answered_cleanly(interaction, &allowed).await?;
            let list = client().get(server.url("/api/v1/calls")).header("authorization", format!("Bearer {token}"));
            answered_cleanly(list.query(&[("phone_number", number.as_str()), ("status", key.as_str())]), &[200, 400])
                .await?;
            let stranger = client().get(server.url("/api/v1/calls")).header("authorization", authorization);
            answered_cleanly(stranger, &[401]).await.map(drop)
        })
    });
}

#[test]
fn an_accepted_call_body_reads_back_as_sent() {
    let body = (
        "[0-9]{3,15}",
        "[a-z][a-z0-9-]{0,15}",
        "[a-z0-9]{1,8}",
        1u32..1000,
        1u32..=3600,
        prop::collection::btree_map("[A-Z][A-Z_]{0,8}", "[a-z0-9 ]{0,12}", 0..3),
    );
    // (The variables are sent to Asterisk, not shown by the API: only their acceptance is checked.)
    against_server(32, body, |server, token, (digits, context, extension, priority, timeout, variables)| {
        Box::pin(async move {
            let number = format!("+{digits}");
            let sent = json!({
                "phone_number": number, "context": context, "extension": extension,
                "priority": priority, "timeout": timeout, "variables": variables,
            });
            let create = client()
                .post(server.url("/api/v1/calls"))
                .header("authorization", format!("Bearer {token}"))
                .json(&sent);
            let (status, created) = answered_cleanly(create, &[400, 502]).await?;
            let Some(call_id) = created["call_id"].as_str() else {
                // Refused by validation (400), with its detail; nothing to read back.
                prop_assert_eq!(status, 400);
                return Ok(());
            };
            let get = client()
                .get(server.url(&format!("/api/v1/calls/{call_id}")))
                .header("authorization", format!("Bearer {token}"));
            let (_, call) = answered_cleanly(get, &[200]).await?;
            for field in ["phone_number", "context", "extension", "priority", "timeout"] {
                prop_assert_eq!(&call[field], &sent[field], "{}", field);
            }
            prop_assert_eq!(call["status"].as_str(), Some("failed"));
            Ok(())
        })
    });
}

fn callback_policy() -> ivr_core::webhook::CallbackPolicy {
    ivr_core::webhook::CallbackPolicy {
        enabled: true,
        default_url: Some("http://crm.example:9000/ivr".into()),
        allowed_hosts: vec![
            "hooks.example".into(),
            "10.0.0.5:8080".into(),
            "[::1]:81".into(),
            "plain.example:80".into(),
        ],
    }
}

/// A URL from the document's `status_callback` pattern for this policy.
fn documented_callback() -> impl Strategy<Value = String> {
    let pattern = ivr_server::openapi::callback_url_pattern(&callback_policy());
    // The generator takes the pattern without its anchors (it makes whole strings anyway).
    let body = pattern.strip_prefix('^').and_then(|p| p.strip_suffix('$')).unwrap().to_owned();
    proptest::string::string_regex(&body).unwrap()
}

proptest! {
    #![proptest_config(config(512))]

    /// The document's pattern for status_callback names only URLs the server takes.
    #[test]
    fn a_documented_callback_url_is_accepted(url in documented_callback()) {
        prop_assert!(ivr_server::fields::CallbackUrl::parse(&url).is_ok(), "{url:?}");
        prop_assert_eq!(callback_policy().check(&url), Ok(()), "{:?}", url);
    }
}
