//! The deployment files (`deploy/`) query only metrics the server serves: every `ivr_*` name in
//! the alert rules and the Grafana dashboard is read from a live `/metrics` after a few calls.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use ivr_core::fake::{FakeAsterisk, FakeConfig};
use serde_json::json;

const QUERYING_FILES: [&str; 2] = ["prometheus/alerts.yml", "grafana/dashboards/ivr.json"];

/// Every `ivr_…` metric name in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("ivr_") {
        let start = i + found;
        let preceded_by_word = start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start
            + text[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(text.len() - start);
        if !preceded_by_word {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// The sample names `/metrics` serves: each family, and a histogram's `_bucket`, `_sum`, `_count`.
fn served(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            names.insert(name.to_owned());
            if kind == "histogram" || kind == "summary" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

#[test]
fn names_are_read_from_queries() {
    let found = names_in(r#"sum(rate(ivr_calls_failed_total{reason!="x"}[5m])) / max(ivr_active_calls) + not_ivr_x"#);
    assert_eq!(found, BTreeSet::from(["ivr_active_calls".to_owned(), "ivr_calls_failed_total".to_owned()]));
    let served = served("# HELP h x\n# TYPE ivr_h histogram\nivr_h_bucket{le=\"1\"} 0\n# TYPE ivr_g gauge\n");
    assert!(served.contains("ivr_h_count") && served.contains("ivr_g") && !served.contains("ivr_g_count"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_query_is_served() {
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    let mut queried = BTreeSet::new();
    for file in QUERYING_FILES {
        let text = std::fs::read_to_string(format!("{deploy}/{file}")).unwrap_or_else(|e| panic!("{file}: {e}"));
        let names = names_in(&text);
        assert!(!names.is_empty(), "{file} queries no ivr metric");
        queried.extend(names);
    }

    let fake =
        within("fake asterisk", FakeAsterisk::start_with(FakeConfig { time_scale: 0.05, ..FakeConfig::default() }))
            .await
            .expect("fake asterisk");
    let ari = Ari::At { http_url: fake.http_url(), username: fake.username().into(), password: fake.password().into() };
    let server =
        TestServer::start(&[("METRICS_ENABLED", "true"), ("MAX_CALLS_PER_SECOND", "0")], Db::Disabled, ari).await;
    let token = server.mint("deploy-test");
    // One answered and one busy call, so the labelled families have children to show.
    let mut ids = Vec::new();
    for number in ["+15550000005", "+15550000002"] {
        let (status, _, body) = send(
            client().post(server.url("/api/v1/calls")).bearer_auth(&token).json(&json!({ "phone_number": number })),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["call_id"].as_str().expect("call_id").to_owned());
    }
    within("both calls to end", async {
        for id in &ids {
            loop {
                let (_, _, call) =
                    send(client().get(server.url(&format!("/api/v1/calls/{id}"))).bearer_auth(&token)).await;
                if call["is_completed"] == true {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
    .await;
    let response = within("metrics", client().get(server.url("/metrics")).send()).await.expect("metrics");
    assert_eq!(response.status(), 200);
    let exposition = within("metrics body", response.text()).await.expect("metrics text");
    let served = served(&exposition);
    let missing: Vec<_> = queried.difference(&served).collect();
    assert!(missing.is_empty(), "deploy/ queries metrics /metrics does not serve: {missing:?}\n{exposition}");
    server.shutdown().await;
    fake.shutdown().await;
}
