//! A Rust program placing one call with ivr-core alone, printing its status as it changes.
//!
//! `cargo run --example embed -- +15550000001`
//!
//! Without ARI settings it starts the built-in fake Asterisk, whose default callees mirror the
//! recorded dialplan (+15550000001 answers after 2 s; …002 is busy; …004 never answers; …006
//! rejects). With `ARI_HTTP_URL`, `ARI_USERNAME`, `ARI_PASSWORD` and `ARI_APP` set, it calls
//! through that Asterisk instead (dial string from `ARI_ENDPOINT_TEMPLATE`, default
//! `PJSIP/{number}@trunk`).

use std::sync::Arc;
use std::time::Duration;

use ivr_core::ari::{AriClient, AriConfig};
use ivr_core::fake::FakeAsterisk;
use ivr_core::{CallManager, CallRequest, ManagerSettings, MemoryCallStore, PhoneNumber};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let number = std::env::args().nth(1).unwrap_or_else(|| "+15550000001".to_owned());
    let number = PhoneNumber::parse(&number).map_err(|e| format!("{number:?}: {e}"))?;

    // A real Asterisk when configured, else the fake one in this process.
    let mut _fake = None;
    let (ari, template) = match std::env::var("ARI_HTTP_URL") {
        Ok(url) => {
            let var = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
            let template = std::env::var("ARI_ENDPOINT_TEMPLATE").unwrap_or_else(|_| "PJSIP/{number}@trunk".into());
            (AriConfig::new(url, var("ARI_USERNAME")?, var("ARI_PASSWORD")?, var("ARI_APP")?), template)
        }
        Err(_) => {
            let fake = FakeAsterisk::start().await?;
            println!("no ARI_HTTP_URL: using the built-in fake Asterisk at {}", fake.http_url());
            let config = AriConfig::new(fake.http_url(), fake.username(), fake.password(), fake.app());
            _fake = Some(fake);
            (config, "Local/{number}@sim".to_owned())
        }
    };

    let settings = ManagerSettings { endpoint_template: template, ..ManagerSettings::default() };
    let registry = prometheus::Registry::new();
    let manager = CallManager::new(AriClient::new(ari)?, Arc::new(MemoryCallStore::new()), settings, &registry)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let engine = tokio::spawn({
        let manager = manager.clone();
        async move { manager.run(async { stopped.await.unwrap_or(()) }).await }
    });
    while !manager.is_connected() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let call = manager.originate(CallRequest::to(number)).await?.call;
    println!("placed call {} to {}", call.call_id, call.spec.phone_number);
    let mut updates = manager.watch(call.call_id).await?;
    let mut shown = 0;
    while let Some(call) = tokio::time::timeout(Duration::from_secs(120), updates.next()).await? {
        for step in &call.history[shown..] {
            println!("{}  {:<9}  {}", step.at, step.status, step.cause);
        }
        shown = call.history.len();
        if call.is_completed() {
            let reason = call.failure_reason.map(|r| format!(" ({r})")).unwrap_or_default();
            let talked = call.duration().map(|d| format!(", talked {d:.1}s")).unwrap_or_default();
            println!("=> {}{reason}{talked}", call.status);
        }
    }

    let _ = stop.send(());
    engine.await??;
    Ok(())
}
