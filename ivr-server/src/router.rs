//! The one router: a `match` on (method, path segments).
//!
//! | method | path | auth | what |
//! |---|---|---|---|
//! | GET | `/healthz` | – | the process is up |
//! | GET | `/readyz` | – | the store answers and the ARI event WebSocket is connected (else 503) |
//! | GET | `/metrics` | – | Prometheus metrics; 404 unless METRICS_ENABLED=true |
//! | GET | `/docs` | – | the API as an interactive page (Swagger UI); 404 when DOCS_ENABLED=false |
//! | GET | `/docs/{file}` | – | the page's script and stylesheet, embedded; 404 when DOCS_ENABLED=false |
//! | GET | `/openapi.json` | – | the OpenAPI 3.1 document; 404 when DOCS_ENABLED=false |
//! | POST | `/api/v1/token` | – | OAuth2 password grant (form): `{access_token, token_type, expires_in}` |
//! | POST | `/api/v1/interaction/{number}` | Bearer | place a call to `number`; optional JSON body of options |
//! | POST | `/api/v1/calls` | Bearer | place a call; JSON body with `phone_number`; 201 + `Location` |
//! | GET | `/api/v1/calls` | Bearer | list calls: `status`, `from`, `to`, `phone_number`, `limit`, `cursor` |
//! | GET | `/api/v1/calls/{call_id}` | Bearer | one call |
//! | DELETE | `/api/v1/calls/{call_id}` | Bearer | cancel (hang up) a call; 202 |
//! | GET | `/api/v1/calls/{call_id}/events` | Bearer | Server-Sent Events: the call's state, then each change, until it ends |
//! | GET | `/api/v1/calls/{call_id}/deliveries` | Bearer | the call's status callbacks: attempts and last result of each |
//! | GET | `/api/v1/status/{call_id}` | Bearer | one call (same as `/api/v1/calls/{call_id}`) |
//!
//! An unknown path is 404; a known path with another method is 405 with `Allow`. [`ROUTES`] is
//! this table as data: tests check that the `match` answers each entry with a route of that
//! template (and that every route's template is listed), and that the OpenAPI document's
//! operations are exactly these.

use std::borrow::Cow;

use hyper::Method;

/// Every (method, path template) the router answers.
pub const ROUTES: &[(Method, &str)] = &[
    (Method::GET, "/healthz"),
    (Method::GET, "/readyz"),
    (Method::GET, "/metrics"),
    (Method::GET, "/docs"),
    (Method::GET, "/docs/{file}"),
    (Method::GET, "/openapi.json"),
    (Method::POST, "/api/v1/token"),
    (Method::POST, "/api/v1/interaction/{number}"),
    (Method::POST, "/api/v1/calls"),
    (Method::GET, "/api/v1/calls"),
    (Method::GET, "/api/v1/calls/{call_id}"),
    (Method::DELETE, "/api/v1/calls/{call_id}"),
    (Method::GET, "/api/v1/calls/{call_id}/events"),
    (Method::GET, "/api/v1/calls/{call_id}/deliveries"),
    (Method::GET, "/api/v1/status/{call_id}"),
];

/// The methods any route uses, for `Allow`.
const METHODS: [Method; 3] = [Method::GET, Method::POST, Method::DELETE];

/// A matched route with its path parameters (still text: handlers parse and report them),
/// borrowed from the path unless percent-decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    Healthz,
    Readyz,
    Metrics,
    Docs,
    DocsFile { file: Cow<'a, str> },
    OpenApi,
    Token,
    Interaction { number: Cow<'a, str> },
    CreateCall,
    ListCalls,
    GetCall { call_id: Cow<'a, str> },
    CancelCall { call_id: Cow<'a, str> },
    CallEvents { call_id: Cow<'a, str> },
    CallDeliveries { call_id: Cow<'a, str> },
    Status { call_id: Cow<'a, str> },
}

impl Route<'_> {
    /// The path template, for metrics and logs.
    pub fn template(&self) -> &'static str {
        match self {
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::Docs => "/docs",
            Route::DocsFile { .. } => "/docs/{file}",
            Route::OpenApi => "/openapi.json",
            Route::Token => "/api/v1/token",
            Route::Interaction { .. } => "/api/v1/interaction/{number}",
            Route::CreateCall | Route::ListCalls => "/api/v1/calls",
            Route::GetCall { .. } | Route::CancelCall { .. } => "/api/v1/calls/{call_id}",
            Route::CallEvents { .. } => "/api/v1/calls/{call_id}/events",
            Route::CallDeliveries { .. } => "/api/v1/calls/{call_id}/deliveries",
            Route::Status { .. } => "/api/v1/status/{call_id}",
        }
    }

    /// Whether the route needs a bearer token.
    pub fn needs_auth(&self) -> bool {
        self.template().starts_with("/api/v1/") && *self != Route::Token
    }

    /// The route with its parameters owned, to outlive the request's path.
    pub fn into_owned(self) -> Route<'static> {
        let own = |text: Cow<'_, str>| Cow::Owned(text.into_owned());
        match self {
            Route::Healthz => Route::Healthz,
            Route::Readyz => Route::Readyz,
            Route::Metrics => Route::Metrics,
            Route::Docs => Route::Docs,
            Route::DocsFile { file } => Route::DocsFile { file: own(file) },
            Route::OpenApi => Route::OpenApi,
            Route::Token => Route::Token,
            Route::Interaction { number } => Route::Interaction { number: own(number) },
            Route::CreateCall => Route::CreateCall,
            Route::ListCalls => Route::ListCalls,
            Route::GetCall { call_id } => Route::GetCall { call_id: own(call_id) },
            Route::CancelCall { call_id } => Route::CancelCall { call_id: own(call_id) },
            Route::CallEvents { call_id } => Route::CallEvents { call_id: own(call_id) },
            Route::CallDeliveries { call_id } => Route::CallDeliveries { call_id: own(call_id) },
            Route::Status { call_id } => Route::Status { call_id: own(call_id) },
        }
    }
}

/// Why no route matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    NotFound,
    /// The path exists with these methods.
    MethodNotAllowed(Vec<Method>),
}

/// Matches a request line to a route.
pub fn route<'a>(method: &Method, path: &'a str) -> Result<Route<'a>, Miss> {
    let rest = path.strip_prefix('/').ok_or(Miss::NotFound)?;
    let mut raw = [""; MAX_SEGMENTS];
    let (count, escaped) = split(rest, &mut raw).ok_or(Miss::NotFound)?;
    if !escaped {
        // The common case: the route borrows its parameters from the path, and a status GET
        // allocates nothing here.
        return matched(method, &raw[..count]);
    }
    let mut decoded: [Cow<'_, str>; MAX_SEGMENTS] = Default::default();
    for (slot, segment) in decoded.iter_mut().zip(&raw[..count]) {
        *slot = percent_decode(segment).ok_or(Miss::NotFound)?;
    }
    let segments: [&str; MAX_SEGMENTS] = std::array::from_fn(|i| &*decoded[i]);
    matched(method, &segments[..count]).map(Route::into_owned)
}

/// The route of `segments`, or why there is none (405 when another method has one).
fn matched<'s>(method: &Method, segments: &[&'s str]) -> Result<Route<'s>, Miss> {
    match_route(method, segments).ok_or_else(|| {
        let allowed: Vec<Method> = METHODS.iter().filter(|m| match_route(m, segments).is_some()).cloned().collect();
        if allowed.is_empty() {
            Miss::NotFound
        } else {
            Miss::MethodNotAllowed(allowed)
        }
    })
}

fn match_route<'s>(method: &Method, segments: &[&'s str]) -> Option<Route<'s>> {
    let id = |s: &'s str| Cow::Borrowed(s);
    Some(match (method.clone(), segments) {
        (Method::GET, ["healthz"]) => Route::Healthz,
        (Method::GET, ["readyz"]) => Route::Readyz,
        (Method::GET, ["metrics"]) => Route::Metrics,
        (Method::GET, ["docs"]) => Route::Docs,
        (Method::GET, ["docs", file]) => Route::DocsFile { file: id(file) },
        (Method::GET, ["openapi.json"]) => Route::OpenApi,
        (Method::POST, ["api", "v1", "token"]) => Route::Token,
        (Method::POST, ["api", "v1", "interaction", number]) => Route::Interaction { number: id(number) },
        (Method::POST, ["api", "v1", "calls"]) => Route::CreateCall,
        (Method::GET, ["api", "v1", "calls"]) => Route::ListCalls,
        (Method::GET, ["api", "v1", "calls", call_id]) => Route::GetCall { call_id: id(call_id) },
        (Method::DELETE, ["api", "v1", "calls", call_id]) => Route::CancelCall { call_id: id(call_id) },
        (Method::GET, ["api", "v1", "calls", call_id, "events"]) => Route::CallEvents { call_id: id(call_id) },
        (Method::GET, ["api", "v1", "calls", call_id, "deliveries"]) => Route::CallDeliveries { call_id: id(call_id) },
        (Method::GET, ["api", "v1", "status", call_id]) => Route::Status { call_id: id(call_id) },
        _ => return None,
    })
}

/// The most segments a route has (`/api/v1/calls/{call_id}/events`); a longer path has no route.
const MAX_SEGMENTS: usize = 5;

/// Puts the segments of `rest` (the path after its `/`) into `out`; their count, and whether
/// any has a `%` escape. `None` (no route) for an empty segment (`/healthz/`, `/api//v1`) or
/// more than [`MAX_SEGMENTS`].
fn split<'a>(rest: &'a str, out: &mut [&'a str; MAX_SEGMENTS]) -> Option<(usize, bool)> {
    // Most requests are the API's, whose paths all begin `api/v1/`: those two segments are
    // taken as they are, and only the rest is searched. memchr's vector searches rather than
    // `split` and a `%` search per segment, which went byte by byte; for a path this short
    // each search costs more in its setup than in its bytes (callgrind, a cached status GET:
    // 1,230 instructions with `split`, 540 searching the whole path, ~400 so; a plain loop over
    // the bytes took 740, and eight bytes at a time as a word about 500).
    const API: &str = "api/v1/";
    let (mut count, mut start) = match rest.starts_with(API) {
        true => {
            (out[0], out[1]) = ("api", "v1");
            (2, API.len())
        }
        false => (0, 0),
    };
    let (bytes, searched) = (rest.as_bytes(), start);
    let escaped = memchr::memchr(b'%', &bytes[searched..]).is_some();
    for end in memchr::memchr_iter(b'/', &bytes[searched..]).map(|at| searched + at).chain([bytes.len()]) {
        // `/` is ASCII, so `start..end` lies on character boundaries.
        let segment = &rest[start..end];
        if segment.is_empty() {
            return None;
        }
        *out.get_mut(count)? = segment;
        count += 1;
        start = end + 1;
    }
    Some((count, escaped))
}

/// A segment percent-decoded; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(segment: &str) -> Option<Cow<'_, str>> {
    if !segment.contains('%') {
        return Some(Cow::Borrowed(segment));
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A concrete path for a template.
    pub fn sample(template: &str) -> String {
        template
            .replace("{number}", "+15550000001")
            .replace("{call_id}", "7d8e0f4c-61a6-4a51-9f4e-2b1ac3e0c9d1")
            .replace("{file}", "docs.js")
    }

    proptest::proptest! {
        /// The split finds what `str::split` would, whether or not the path begins as the
        /// API's do (`/`, `%` and multi-byte characters anywhere).
        #[test]
        fn segments_are_found_as_str_split_finds_them(rest in "(api/v1/|api/v1|api/)?[a/%é-]{0,40}") {
            let mut out = [""; MAX_SEGMENTS];
            let expected: Vec<&str> = rest.split('/').collect();
            let valid = expected.len() <= MAX_SEGMENTS && !expected.contains(&"");
            match split(&rest, &mut out) {
                Some((count, escaped)) => {
                    proptest::prop_assert!(valid, "{rest:?} split as {:?}", &out[..count]);
                    proptest::prop_assert_eq!(&out[..count], &expected[..]);
                    proptest::prop_assert_eq!(escaped, rest.contains('%'));
                }
                None => proptest::prop_assert!(!valid, "{rest:?} refused"),
            }
        }
    }

    #[test]
    fn every_listed_route_matches_with_its_own_template() {
        for (method, template) in ROUTES {
            let path = sample(template);
            let route = route(method, &path).unwrap_or_else(|e| panic!("{method} {template}: {e:?}"));
            assert_eq!(route.template(), *template);
        }
    }

    #[test]
    fn every_route_is_listed() {
        let id = || Cow::Borrowed("x");
        let mut templates = std::collections::BTreeSet::new();
        // Exhaustive: a new route does not compile until it is named here, and then must be
        // in ROUTES.
        let all = [
            Route::Healthz,
            Route::Readyz,
            Route::Metrics,
            Route::Docs,
            Route::DocsFile { file: id() },
            Route::OpenApi,
            Route::Token,
            Route::Interaction { number: id() },
            Route::CreateCall,
            Route::ListCalls,
            Route::GetCall { call_id: id() },
            Route::CancelCall { call_id: id() },
            Route::CallEvents { call_id: id() },
            Route::CallDeliveries { call_id: id() },
            Route::Status { call_id: id() },
        ];
        for route in all {
            match route {
                Route::Healthz
                | Route::Readyz
                | Route::Metrics
                | Route::Docs
                | Route::DocsFile { .. }
                | Route::OpenApi
                | Route::Token
                | Route::Interaction { .. }
                | Route::CreateCall
                | Route::ListCalls
                | Route::GetCall { .. }
                | Route::CancelCall { .. }
                | Route::CallEvents { .. }
                | Route::CallDeliveries { .. }
                | Route::Status { .. } => {}
            }
            assert!(ROUTES.iter().any(|(_, t)| *t == route.template()), "{route:?} is not in ROUTES");
            templates.insert(route.template());
        }
        for (method, template) in ROUTES {
            assert!(templates.contains(template), "{method} {template} is no route's template");
            assert_eq!(ROUTES.iter().filter(|(m, t)| m == method && t == template).count(), 1, "{method} {template}");
        }
    }

    #[test]
    fn misses() {
        assert_eq!(route(&Method::GET, "/nope"), Err(Miss::NotFound));
        assert_eq!(route(&Method::GET, "/healthz/"), Err(Miss::NotFound));
        assert_eq!(route(&Method::GET, "/api/v1/calls/x/y"), Err(Miss::NotFound));
        assert_eq!(route(&Method::GET, "/api/v1/calls/x/events/more"), Err(Miss::NotFound), "past the longest route");
        assert_eq!(route(&Method::GET, "/api/v1/calls/"), Err(Miss::NotFound));
        assert_eq!(route(&Method::GET, "/api//v1/calls"), Err(Miss::NotFound));
        assert_eq!(route(&Method::PUT, "/api/v1/calls"), Err(Miss::MethodNotAllowed(vec![Method::GET, Method::POST])));
        assert_eq!(
            route(&Method::POST, "/api/v1/calls/abc"),
            Err(Miss::MethodNotAllowed(vec![Method::GET, Method::DELETE]))
        );
        assert_eq!(route(&Method::GET, "/api/v1/token"), Err(Miss::MethodNotAllowed(vec![Method::POST])));
    }

    #[test]
    fn segments_are_percent_decoded() {
        assert_eq!(
            route(&Method::POST, "/api/v1/interaction/%2B15550000001"),
            Ok(Route::Interaction { number: "+15550000001".into() })
        );
        assert_eq!(route(&Method::POST, "/api/v1/interaction/%zz"), Err(Miss::NotFound));
        // Borrowed from the path unless decoded.
        assert!(matches!(
            route(&Method::GET, "/api/v1/status/abc"),
            Ok(Route::Status { call_id: Cow::Borrowed("abc") })
        ));
        assert!(matches!(
            route(&Method::GET, "/api/v1/status/a%62c"),
            Ok(Route::Status { call_id: Cow::Owned(id) }) if id == "abc"
        ));
    }

    #[test]
    fn auth_is_needed_for_the_api_but_the_token_route() {
        assert!(!Route::Token.needs_auth());
        assert!(!Route::Healthz.needs_auth());
        assert!(Route::ListCalls.needs_auth());
        assert!(Route::Interaction { number: "1".into() }.needs_auth());
    }
}
