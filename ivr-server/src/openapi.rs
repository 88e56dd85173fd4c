//! The API's OpenAPI 3.1 document (`/openapi.json`, the committed `ivr-server/openapi.json`)
//! and the HTML page at `/docs` made from it: no script, no CDN, nothing from the network.
//!
//! Tests check the document against the router's table ([`crate::router::ROUTES`]) and the
//! call views' fields.

use std::fmt::Write as _;
use std::sync::OnceLock;

use serde_json::Value;

/// The document, as served.
pub const SPEC: &str = include_str!("../openapi.json");

/// The document, parsed.
pub fn spec() -> &'static Value {
    static PARSED: OnceLock<Value> = OnceLock::new();
    PARSED.get_or_init(|| serde_json::from_str(SPEC).unwrap_or(Value::Null))
}

/// The `/docs` page.
pub fn docs_html() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| render(spec()))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn render(spec: &Value) -> String {
    let str_of = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
    let info = &spec["info"];
    let mut page = String::new();
    let _ = write!(
        page,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title} API</title>\n\
         <style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.4}}\
         code,pre{{background:#f4f4f4;padding:.1rem .3rem}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}}\
         .m{{font-weight:bold;font-family:monospace}}</style></head><body>\n\
         <h1>{title} API <small>{version}</small></h1>\n<p>{description}</p>\n\
         <p>The machine-readable document: <a href=\"/openapi.json\">/openapi.json</a> (OpenAPI 3.1).</p>\n\
         <h2>Operations</h2>\n<table><tr><th>method</th><th>path</th><th>auth</th><th>what</th><th>answers</th></tr>\n",
        title = escape(&str_of(info, "title")),
        version = escape(&str_of(info, "version")),
        description = escape(&str_of(info, "description")),
    );
    if let Some(paths) = spec["paths"].as_object() {
        for (path, item) in paths {
            let Some(operations) = item.as_object() else { continue };
            for (method, op) in operations {
                let auth = if op.get("security").is_some() { "Bearer" } else { "–" };
                let mut what = escape(&str_of(op, "summary"));
                let description = str_of(op, "description");
                if !description.is_empty() {
                    let _ = write!(what, "<br><small>{}</small>", escape(&description));
                }
                let statuses: Vec<&str> =
                    op["responses"].as_object().map(|r| r.keys().map(String::as_str).collect()).unwrap_or_default();
                let _ = writeln!(
                    page,
                    "<tr id=\"{id}\"><td class=\"m\">{method}</td><td><code>{path}</code></td><td>{auth}</td><td>{what}</td><td>{statuses}</td></tr>",
                    id = escape(&str_of(op, "operationId")),
                    method = method.to_uppercase(),
                    path = escape(path),
                    statuses = statuses.join(", "),
                );
            }
        }
    }
    page.push_str("</table>\n<h2>Problems</h2>\n<p>Errors are <code>application/problem+json</code> (RFC 9457) with <code>type</code>, <code>title</code>, <code>status</code> and <code>detail</code>.</p>\n<table><tr><th>type</th><th>status</th><th>when</th></tr>\n");
    for (slug, title, status, when) in crate::problem::KINDS {
        let _ = writeln!(
            page,
            "<tr id=\"problem-{slug}\"><td><code>/docs#problem-{slug}</code><br>{title}</td><td>{status}</td><td>{when}</td></tr>",
            title = escape(title),
            when = escape(when),
        );
    }
    page.push_str("</table>\n<h2>Schemas</h2>\n");
    if let Some(schemas) = spec["components"]["schemas"].as_object() {
        for (name, schema) in schemas {
            let pretty = serde_json::to_string_pretty(schema).unwrap_or_default();
            let _ = writeln!(page, "<h3 id=\"schema-{name}\">{name}</h3>\n<pre>{}</pre>", escape(&pretty));
        }
    }
    page.push_str("</body></html>\n");
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_parses_and_the_page_lists_every_operation() {
        assert_eq!(spec()["openapi"], "3.1.0");
        let page = docs_html();
        for (method, path) in crate::router::ROUTES {
            assert!(page.contains(&format!("<code>{}</code>", escape(path))), "{method} {path}");
        }
        assert!(page.contains("problem-not-found"));
        assert!(!page.contains("<script"));
    }
}
