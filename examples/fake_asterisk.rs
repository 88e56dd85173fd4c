//! A fake Asterisk on its own, for trying ivr (or any ARI client) without a real Asterisk.
//!
//! ```text
//! cargo run --example fake_asterisk -- [--port 8088] [--time-scale 1.0]
//! ```
//!
//! It prints its settings as shell assignments (`eval "$(cargo run -q --example fake_asterisk)"`
//! would work, but the process keeps running, so usually copy them into another terminal) and
//! runs until Ctrl-C. Without `--port` it picks a free port. The numbers it knows are those of
//! `ivr_core::fake::CalleePlan::default_for`: +15550000001 answers, …002 is busy, …004 never
//! answers, and so on. On Ctrl-C (SIGINT) it prints what it saw on stderr, one
//! `fake_asterisk: stats key=value …` line (originates, channel lookups and listings, peak
//! HTTP sessions, refused sessions), which `scripts/load.sh` reads.

// The allocator ivr-server runs on: under load the fake shares the machine with the server
// it serves, and glibc's malloc was a sixth of the fake's CPU (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write as _;
use std::process::ExitCode;

use ivr_core::fake::{FakeAsterisk, FakeConfig};

const USAGE: &str = "usage: fake_asterisk [--port PORT] [--time-scale FACTOR]";

/// Port and time scale from the command line.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<(u16, f64)>, String> {
    let (mut port, mut scale) = (0u16, 1.0f64);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_string(), Some(value.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| inline.clone().or_else(|| args.next()).ok_or(format!("{flag} needs {what}"));
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--port" => {
                let v = value("a port number")?;
                port = v.parse().map_err(|_| format!("--port: '{v}' is not a port number (0-65535)"))?;
            }
            "--time-scale" => {
                let v = value("a factor")?;
                scale = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .ok_or(format!("--time-scale: '{v}' is not a number greater than 0"))?;
            }
            _ => return Err(format!("unknown argument '{arg}' ({USAGE})")),
        }
    }
    Ok(Some((port, scale)))
}

#[tokio::main]
async fn main() -> ExitCode {
    let (port, time_scale) = match parse_args(std::env::args().skip(1)) {
        Ok(Some(settings)) => settings,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("fake_asterisk: {e}");
            return ExitCode::from(2);
        }
    };
    let fake = match FakeAsterisk::start_with(FakeConfig { port, time_scale, ..FakeConfig::default() }).await {
        Ok(fake) => fake,
        Err(e) => {
            eprintln!("fake_asterisk: cannot listen on 127.0.0.1:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("ARI_HTTP_URL={}", fake.http_url());
    println!("ARI_USERNAME={}", fake.username());
    println!("ARI_PASSWORD={}", fake.password());
    println!("ARI_APP={}", fake.app());
    println!("# fake Asterisk running (time scale {time_scale}); press Ctrl-C to stop");
    let _ = std::io::stdout().flush();

    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("fake_asterisk: cannot wait for Ctrl-C ({e}); stopping");
    }
    let s = fake.stats();
    eprintln!(
        "fake_asterisk: stats originates={} channel_gets={} channel_lists={} peak_sessions={} refused_sessions={} write_timeouts={} events_written={}",
        s.originates, s.channel_gets, s.channel_lists, s.peak_sessions, s.refused_sessions, s.write_timeouts, s.events_written
    );
    fake.shutdown().await;
    eprintln!("fake_asterisk: stopped");
    ExitCode::SUCCESS
}
