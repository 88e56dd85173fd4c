//! The API's OpenAPI 3.1 document and the interactive page at `/docs`.
//!
//! The document is generated (utoipa) from the operations the handlers carry
//! (`#[utoipa::path]` in [`crate::api`] and here) and from the request and response types they
//! really parse and write ([`crate::request`], [`crate::fields`], [`crate::view`],
//! [`crate::problem`]); nothing of it is written by hand. Its paths are the router's
//! [`ROUTES`](crate::router::ROUTES), which a test checks both ways.
//!
//! `/docs` is Swagger UI, vendored from the `swagger-ui-dist` npm package into
//! `ivr-server/assets/swagger-ui/` (see `assets/update-swagger-ui.sh`) and embedded in the
//! binary: the page loads nothing from another host, and its Content-Security-Policy says so.
//! "Authorize" runs the OAuth2 password flow against `/api/v1/token`. Below the UI, a plain
//! table describes each problem kind: a problem's `type` is `/docs#problem-<kind>`.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::OnceLock;

use hyper::body::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;
use serde_json::Value;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{Flow, HttpAuthScheme, HttpBuilder, OAuth2, Password, Scopes, SecurityScheme};
use utoipa::openapi::RefOr;
use utoipa::{Modify, Number, OpenApi, PartialSchema, ToSchema};

use crate::body::{full, Body};
use crate::problem::Problem;

/// What `/docs/{file}` serves: name, content type, bytes.
pub const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "swagger-ui-bundle.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/swagger-ui/swagger-ui-bundle.js"),
    ),
    ("swagger-ui.css", "text/css; charset=utf-8", include_bytes!("../assets/swagger-ui/swagger-ui.css")),
    ("docs.js", "text/javascript; charset=utf-8", include_bytes!("../assets/docs.js")),
];

/// The docs page's policy: its own scripts and styles only (Swagger UI sets inline styles),
/// requests to this server only.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; font-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; \
     frame-ancestors 'none'";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ivr",
        description = "Place one outbound call through Asterisk (ARI) and know what became of it.\n\n\
            Every `/api/v1` route but `/api/v1/token` needs `Authorization: Bearer <token>`: use \
            **Authorize** with a username and password (the OAuth2 password flow), or paste a token. \
            Errors are RFC 9457 `application/problem+json`; their kinds are described below the \
            operations."
    ),
    paths(
        crate::api::healthz,
        crate::api::readyz,
        crate::api::metrics,
        docs,
        docs_file,
        openapi_json,
        crate::api::token,
        crate::api::interaction,
        crate::api::create_call,
        crate::api::list_calls,
        crate::api::get_call,
        crate::api::cancel_call,
        crate::api::call_events,
        crate::api::call_deliveries,
        crate::api::call_status,
    ),
    components(
        schemas(
            crate::problem::ProblemSchema,
            crate::request::CallOptions,
            // Named by the create routes' shared responses (`api::CreateAnswers`), which do not
            // register it themselves.
            crate::view::CreatedView,
            // The parameters' schemas (parameters do not register the schemas they name).
            crate::fields::PhoneText,
            crate::fields::StatusList,
            crate::fields::PageCursor,
            crate::fields::IdempotencyKey,
            AssetName,
        ),
        responses(Problem)
    ),
    modifiers(&Security),
    tags(
        (name = "calls", description = "Place calls and follow them"),
        (name = "auth", description = "Access tokens"),
        (name = "operations", description = "Health, readiness, metrics and these docs"),
    )
)]
struct ApiDoc;

/// The security schemes: a bearer token, or the OAuth2 password flow that gets one.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
        components.add_security_scheme(
            "oauth2",
            SecurityScheme::OAuth2(OAuth2::new([Flow::Password(Password::new("/api/v1/token", Scopes::new()))])),
        );
    }
}

/// The document for a server whose requests may ask for at most `max_attempts` attempts
/// (the one bound that is a setting, MAX_ATTEMPTS).
pub fn document(max_attempts: u32) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    if let Some(components) = doc.components.as_mut() {
        for name in ["CallRequest", "CallOptions"] {
            if let Some(RefOr::T(Schema::Object(body))) = components.schemas.get_mut(name) {
                if let Some(RefOr::T(property)) = body.properties.get_mut("max_attempts") {
                    set_maximum(property, max_attempts);
                }
            }
        }
    }
    doc
}

/// The document for a server with `settings`: MAX_ATTEMPTS's bound, and the status-callback
/// fields as its callback policy allows them: left out when callbacks are off (no
/// WEBHOOK_SECRET), else `status_callback`'s pattern names the allowed hosts, so a URL the
/// document allows is one the server takes.
pub fn document_for(settings: &ivr_core::ManagerSettings) -> utoipa::openapi::OpenApi {
    let mut doc = document(settings.max_attempts);
    let policy = &settings.callbacks;
    if let Some(components) = doc.components.as_mut() {
        if policy.enabled {
            if let Some(RefOr::T(Schema::Object(url))) = components.schemas.get_mut("CallbackUrl") {
                url.pattern = Some(callback_pattern(policy));
                url.description = Some(format!(
                    "An absolute http:// URL on {} (https is not supported: the server has no TLS client).",
                    allowed_hosts(policy)
                ));
            }
        } else {
            for name in ["CallRequest", "CallOptions"] {
                if let Some(RefOr::T(Schema::Object(body))) = components.schemas.get_mut(name) {
                    body.properties.shift_remove("status_callback");
                    body.properties.shift_remove("status_callback_events");
                }
            }
            components.schemas.remove("CallbackUrl");
        }
    }
    doc
}

/// [`document_for`] as served.
pub fn document_json_for(settings: &ivr_core::ManagerSettings) -> String {
    document_for(settings).to_json().unwrap_or_else(|_| "{}".into())
}

fn allowed_hosts(policy: &ivr_core::webhook::CallbackPolicy) -> String {
    let names: Vec<String> = policy
        .allowed_authorities()
        .into_iter()
        .map(|(host, port)| match port {
            Some(port) => format!("{host}:{port}"),
            None => host,
        })
        .collect();
    if names.is_empty() {
        "no host (WEBHOOK_ALLOWED_HOSTS is empty)".into()
    } else {
        format!("one of these hosts: {}", names.join(", "))
    }
}

/// The pattern of an allowed callback URL (public for the property tests).
pub fn callback_url_pattern(policy: &ivr_core::webhook::CallbackPolicy) -> String {
    callback_pattern(policy)
}

/// `^http://(one of the allowed authorities)` then an optional path, query or fragment.
fn callback_pattern(policy: &ivr_core::webhook::CallbackPolicy) -> String {
    let literal = |text: &str| -> String {
        text.chars().flat_map(|c| if ".[]".contains(c) { vec!['\\', c] } else { vec![c] }).collect()
    };
    const PORT: &str = "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})";
    let mut authorities: Vec<String> = policy
        .allowed_authorities()
        .into_iter()
        .map(|(host, port)| match port {
            None => format!("{}(:{PORT})?", literal(&host)),
            Some(80) => format!("{}(:80)?", literal(&host)),
            Some(port) => format!("{}:{port}", literal(&host)),
        })
        .collect();
    if authorities.is_empty() {
        // Nothing is allowed: a pattern no string matches.
        authorities.push("(?!)".into());
    }
    format!(r"^http://({})([/?#][^\u0000-\u0020\u007f-\u009f]*)?$", authorities.join("|"))
}

/// Sets `maximum` wherever the schema (or a branch of its `oneOf`) has a `minimum`.
fn set_maximum(schema: &mut Schema, max: u32) {
    match schema {
        Schema::Object(object) if object.minimum.is_some() => object.maximum = Some(Number::UInt(max as usize)),
        Schema::OneOf(one_of) => {
            for branch in &mut one_of.items {
                if let RefOr::T(branch) = branch {
                    set_maximum(branch, max);
                }
            }
        }
        _ => {}
    }
}

/// The document as served, in the order of the route table.
pub fn document_json(max_attempts: u32) -> String {
    document(max_attempts).to_json().unwrap_or_else(|_| "{}".into())
}

/// The document with the default settings, for tests and tools.
pub fn spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| {
        serde_json::from_str(&document_json(ivr_core::ManagerSettings::default().max_attempts)).unwrap_or(Value::Null)
    })
}

/// The OpenAPI 3.1 document (this one).
#[utoipa::path(get, path = "/openapi.json", tag = "operations", operation_id = "openapi",
    responses(
        (status = 200, description = "OpenAPI 3.1", body = Object, content_type = "application/json"),
        (status = 404, response = Problem),
    ))]
pub(crate) fn openapi_json(json: Bytes) -> Response<Body> {
    answer("application/json", json)
}

/// This API as an interactive page (Swagger UI), unless DOCS_ENABLED=false.
#[utoipa::path(get, path = "/docs", tag = "operations", operation_id = "docs",
    responses(
        (status = 200, description = "HTML", body = String, content_type = "text/html"),
        (status = 404, response = Problem),
    ))]
pub(crate) fn docs() -> Response<Body> {
    let mut response = answer("text/html; charset=utf-8", docs_html());
    response.headers_mut().insert("content-security-policy", HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    response
}

/// A file of the docs page (Swagger UI's script and stylesheet, the page's own script).
#[utoipa::path(get, path = "/docs/{file}", tag = "operations", operation_id = "docsFile",
    params(("file" = AssetName, Path, description = "One of the page's files")),
    responses(
        (status = 200, description = "The file", content(
            (String = "text/javascript"),
            (String = "text/css"),
        )),
        (status = 404, response = Problem),
    ))]
pub(crate) fn docs_file(file: &str) -> Result<Response<Body>, Problem> {
    let (_, content_type, bytes) = ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or_else(|| Problem::not_found(format!("no docs file {file:?}")))?;
    let mut response = answer(content_type, Bytes::from_static(bytes));
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    Ok(response)
}

/// The names of [`ASSETS`], as a schema.
pub struct AssetName;

impl PartialSchema for AssetName {
    fn schema() -> RefOr<Schema> {
        let names: Vec<&str> = ASSETS.iter().map(|(name, _, _)| *name).collect();
        ObjectBuilder::new().schema_type(Type::String).enum_values(Some(names)).into()
    }
}

impl ToSchema for AssetName {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("DocsFile")
    }
}

fn answer(content_type: &'static str, bytes: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(bytes));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    response
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The `/docs` page: Swagger UI's mount point and files, then the problem kinds.
pub fn docs_html() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| {
        let mut page = String::from(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>ivr API</title>\n<link rel=\"icon\" href=\"data:,\">\
             <link rel=\"stylesheet\" href=\"/docs/swagger-ui.css\">\n\
             <style>#problems{padding-bottom:3rem}#problems table{border-collapse:collapse;width:100%}\
             #problems th,#problems td{padding:.4rem .8rem;text-align:left;vertical-align:top;\
             border-bottom:1px solid #e8e8e8}#problems td:nth-child(2){white-space:nowrap}</style>\n\
             </head><body>\n\
             <div id=\"swagger-ui\"></div>\n\
             <section id=\"problems\" class=\"swagger-ui\"><div class=\"wrapper\">\
             <h2>Problems</h2>\n<p>Errors are <code>application/problem+json</code> (RFC 9457) with \
             <code>type</code>, <code>title</code>, <code>status</code> and <code>detail</code>; \
             <code>type</code> is the link to the kind below.</p>\n\
             <table class=\"problems\"><thead><tr><th>type</th><th>status</th><th>when</th></tr></thead><tbody>\n",
        );
        for (slug, title, status, when) in crate::problem::KINDS {
            let _ = writeln!(
                page,
                "<tr id=\"problem-{slug}\"><td><code>/docs#problem-{slug}</code><br>{title}</td><td>{status}</td><td>{when}</td></tr>",
                title = escape(title),
                when = escape(when),
            );
        }
        page.push_str(
            "</tbody></table></div></section>\n\
             <script src=\"/docs/swagger-ui-bundle.js\"></script>\n<script src=\"/docs/docs.js\"></script>\n\
             </body></html>\n",
        );
        page
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::router::{self, ROUTES};

    #[test]
    fn the_callback_fields_follow_the_policy() {
        let body = |doc: &utoipa::openapi::OpenApi| serde_json::to_value(doc).unwrap()["components"]["schemas"].clone();
        let off = body(&document_for(&ivr_core::ManagerSettings::default()));
        assert!(off["CallRequest"]["properties"].get("status_callback").is_none());
        assert!(off["CallRequest"]["properties"].get("status_callback_events").is_none());
        assert!(off["CallRequest"]["properties"].get("phone_number").is_some());
        assert!(off.get("CallbackUrl").is_none());
        let callbacks = ivr_core::webhook::CallbackPolicy {
            enabled: true,
            default_url: Some("http://crm.example/ivr".into()),
            allowed_hosts: vec!["hooks.example".into(), "10.0.0.5:8080".into()],
        };
        let on = body(&document_for(&ivr_core::ManagerSettings { callbacks, ..Default::default() }));
        assert!(on["CallRequest"]["properties"].get("status_callback").is_some());
        let pattern = on["CallbackUrl"]["pattern"].as_str().unwrap();
        assert!(pattern.starts_with(r"^http://(hooks\.example(:"), "{pattern}");
        assert!(pattern.contains(r"|10\.0\.0\.5:8080|crm\.example(:80)?)"), "{pattern}");
    }

    #[test]
    fn the_documented_operations_are_the_routes() {
        let spec = spec();
        assert_eq!(spec["openapi"], "3.1.0");
        let mut documented = BTreeSet::new();
        for (path, item) in spec["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let routed: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), (*p).to_owned())).collect();
        assert_eq!(documented, routed);
        // And in the same order as the table.
        let doc = document(3);
        let order: Vec<&str> = doc.paths.paths.keys().map(String::as_str).collect();
        let mut table: Vec<&str> = ROUTES.iter().map(|(_, p)| *p).collect();
        table.dedup();
        assert_eq!(order, table);
    }

    #[test]
    fn every_ref_resolves_and_every_auth_route_says_so() {
        let spec = spec();
        let text = serde_json::to_string(spec).unwrap();
        for reference in text.split("\"$ref\":\"#/").skip(1) {
            let pointer = reference.split('"').next().unwrap();
            assert!(spec.pointer(&format!("/{pointer}")).is_some(), "dangling $ref {pointer}");
        }
        for (method, path) in ROUTES {
            let sample = path.replace("{number}", "123").replace("{call_id}", "x").replace("{file}", "docs.js");
            let route = router::route(method, &sample).unwrap();
            let op = &spec["paths"][path][method.as_str().to_lowercase()];
            assert_eq!(op["security"].is_array(), route.needs_auth(), "{method} {path}");
            if route.needs_auth() {
                assert!(op["responses"]["401"].is_object(), "{method} {path} documents 401");
            }
        }
        let oauth = &spec["components"]["securitySchemes"]["oauth2"]["flows"]["password"];
        assert_eq!(oauth["tokenUrl"], "/api/v1/token");
    }

    #[test]
    fn the_schemas_state_the_rules() {
        let spec: Value = serde_json::from_str(&document_json(7)).unwrap();
        let body = &spec["components"]["schemas"]["CallRequest"];
        assert_eq!(body["additionalProperties"], false);
        assert_eq!(body["required"], serde_json::json!(["phone_number"]));
        for field in ["context", "extension", "caller_id", "audio"] {
            let text = serde_json::to_string(&body["properties"][field]).unwrap();
            assert!(text.contains("null"), "{field} is nullable: {text}");
        }
        for name in ["Context", "Extension", "CallerId", "Audio"] {
            assert_eq!(spec["components"]["schemas"][name]["minLength"], 1, "{name}");
        }
        assert!(serde_json::to_string(&body["properties"]["max_attempts"]).unwrap().contains("\"maximum\":7"));
        let options = &spec["components"]["schemas"]["CallOptions"];
        assert!(options["properties"]["phone_number"].is_null() && options["properties"]["audio"].is_object());
        let form = &spec["components"]["schemas"]["TokenForm"];
        assert_eq!(form["additionalProperties"], false);
        assert!(!serde_json::to_string(form).unwrap().contains("null"), "a form has no nulls: {form}");
        let list = &spec["paths"]["/api/v1/calls"]["get"]["parameters"];
        let phone = list.as_array().unwrap().iter().find(|p| p["name"] == "phone_number").unwrap();
        assert!(serde_json::to_string(phone).unwrap().contains("PhoneText"), "{phone}");
        assert_eq!(spec["components"]["schemas"]["PhoneText"]["pattern"], "^\\+?[0-9]{3,15}$");
    }

    #[test]
    fn an_event_of_the_stream_is_what_the_document_says() {
        let call = ivr_core::Call::new(
            ivr_core::CallId::new(),
            ivr_core::store::conformance::new_call("+15550000001"),
            ivr_core::call::now(),
        );
        let bytes = crate::sse::event(&call);
        let text = std::str::from_utf8(&bytes).unwrap();
        let fields: std::collections::BTreeMap<&str, &str> =
            text.lines().filter_map(|line| line.split_once(": ")).collect();
        let spec = spec();
        let op = &spec["paths"]["/api/v1/calls/{call_id}/events"]["get"];
        let schema = &op["responses"]["200"]["content"]["text/event-stream"]["schema"];
        assert_eq!(schema["$ref"], "#/components/schemas/CallEvent");
        let event = &spec["components"]["schemas"]["CallEvent"];
        let documented: BTreeSet<&str> = event["properties"].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(documented, fields.keys().copied().collect());
        assert_eq!(fields["event"], "status");
        assert!(fields["id"].bytes().all(|b| b.is_ascii_digit()));
        let data: Value = serde_json::from_str(fields["data"]).unwrap();
        let call_schema = spec["components"]["schemas"]["Call"]["properties"].as_object().unwrap();
        let served: BTreeSet<&str> = data.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(served, call_schema.keys().map(String::as_str).collect());
    }

    #[test]
    fn the_page_is_swagger_ui_with_every_problem_kind() {
        let page = docs_html();
        for (name, _, _) in ASSETS {
            assert!(page.contains(&format!("/docs/{name}")) || *name == "LICENSE", "{name}");
        }
        for (slug, _, _, _) in crate::problem::KINDS {
            assert!(page.contains(&format!("id=\"problem-{slug}\"")), "{slug}");
        }
        assert!(!page.contains("http://") && !page.contains("https://"), "nothing from another host");
        let init = std::str::from_utf8(ASSETS.iter().find(|a| a.0 == "docs.js").unwrap().2).unwrap();
        assert!(init.contains("/openapi.json"));
    }
}
