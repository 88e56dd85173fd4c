//! A complete local demo on a fresh machine: no Asterisk, no database server.
//!
//! ```sh
//! cargo run --example demo
//! ```
//!
//! Starts the built-in fake Asterisk, then the API on the embedded SQLite default
//! (`sqlite://ivr.db` in the working directory, or DATABASE_URL), with a user `demo` /
//! `demo-password`, and prints the curl lines to get a token and place a call. Every other
//! setting can be given as usual (LISTEN_ADDR, METRICS_ENABLED, …); SECRET_KEY defaults to a
//! random key for the demo. Ctrl-C stops it.

use ivr_core::fake::{FakeAsterisk, FakeConfig};
use ivr_server::app::App;
use ivr_server::settings::Settings;
use ivr_server::{logging, shutdown_signal};
use tokio::net::TcpListener;

const USER: &str = "demo";
const PASSWORD: &str = "demo-password";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fake = FakeAsterisk::start_with(FakeConfig::default()).await?;
    let random_key = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let (url, username, password) = (fake.http_url(), fake.username().to_owned(), fake.password().to_owned());
    let settings = Settings::load(&move |name: &str| match name {
        "ARI_HTTP_URL" => Some(url.clone()),
        "ARI_USERNAME" => Some(username.clone()),
        "ARI_PASSWORD" => Some(password.clone()),
        "SECRET_KEY" => std::env::var(name).ok().or_else(|| Some(random_key.clone())),
        "DISABLE_DB" => Some("false".into()),
        _ => std::env::var(name).ok(),
    })?;
    logging::init(&settings.log_format);
    let app = App::build(&settings).await?;
    let users = app.state.users().expect("a database");
    match users.add(USER, PASSWORD).await {
        Ok(()) | Err(ivr_server::users::UserError::Exists(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let listener = TcpListener::bind(settings.listen_addr).await?;
    let base = format!("http://{}", listener.local_addr()?);
    println!(
        "\nivr demo: the API at {base} (docs: {base}/docs), a fake Asterisk at {ari}\n\
         calls are kept in the SQLite database of DATABASE_URL (default: ./ivr.db)\n\n\
         # 1. a token for the demo user\n\
         TOKEN=$(curl -s -X POST {base}/api/v1/token -d username={USER} -d password={PASSWORD} | sed 's/.*\"access_token\":\"\\([^\"]*\\)\".*/\\1/')\n\n\
         # 2. place a call: +15550000001 answers after 2 s and talks about 5 s (…002 busy, …004 no answer, …006 rejects)\n\
         curl -s -X POST {base}/api/v1/calls -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' -d '{{\"phone_number\": \"+15550000001\"}}'\n\n\
         # 3. watch it to its end (Server-Sent Events), or read it\n\
         curl -N {base}/api/v1/calls/CALL_ID/events -H \"Authorization: Bearer $TOKEN\"\n\
         curl -s {base}/api/v1/calls/CALL_ID -H \"Authorization: Bearer $TOKEN\"\n\n\
         Ctrl-C stops the demo.\n",
        ari = fake.http_url(),
    );

    app.run(listener, shutdown_signal()).await?;
    fake.shutdown().await;
    Ok(())
}
