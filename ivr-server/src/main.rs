//! `ivr-server`: settings, stores, manager, listener, then [`App::run`](ivr_server::app::App::run) until
//! SIGTERM/SIGINT. Everything else lives in the library.

use std::process::ExitCode;

use ivr_server::app::{App, StartError};
use ivr_server::cli::{self, Command, USAGE};
use ivr_server::settings::{self, Settings};
use ivr_server::{logging, shutdown_signal};
use tokio::net::TcpListener;

// glibc's allocator took about a third of the CPU of a create under load, most of it merging
// free lists between threads (perf, under examples/api_load); mimalloc keeps them per thread.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // The runtime is built here rather than by #[tokio::main] so that WORKER_THREADS sizes it.
    let workers = match settings::worker_threads(&settings::Env) {
        Ok(workers) => workers,
        Err(e) => {
            eprintln!("ivr-server: {e}");
            return ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = workers {
        runtime.worker_threads(n);
    }
    match runtime.build() {
        Ok(runtime) => runtime.block_on(command()),
        Err(e) => {
            eprintln!("ivr-server: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn command() -> ExitCode {
    let command = match cli::parse(std::env::args().skip(1)) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("ivr-server: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match command {
        Command::Serve => run().await.map_err(|e| e.to_string()),
        Command::Help => {
            println!("{USAGE}");
            Ok(())
        }
        other => cli::run(other).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ivr-server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), StartError> {
    let settings = Settings::from_env().map_err(StartError::Settings)?;
    logging::init(&settings.log_format);
    let app = App::build(&settings).await?;
    let listener = TcpListener::bind(settings.listen_addr).await.map_err(StartError::Listen)?;
    app.run(listener, shutdown_signal()).await.map_err(StartError::Listen)
}
