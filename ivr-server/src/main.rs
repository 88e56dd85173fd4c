//! `ivr-server`: settings, stores, manager, listener, then [`ivr_server::serve`] until
//! SIGTERM/SIGINT. Everything else lives in the library.

use std::process::ExitCode;

use ivr_server::app::{App, StartError};
use ivr_server::cli::{self, Command, USAGE};
use ivr_server::settings::Settings;
use ivr_server::{follow_calls, logging, serve, shutdown_signal};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[tokio::main]
async fn main() -> ExitCode {
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

    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal_stop.send_replace(true);
    });
    let manager = app.manager.clone();
    let drain = settings.call_drain;
    let manager_stopped = stopped.clone();
    let follow = tokio::spawn(async move {
        if let Err(e) = follow_calls(manager, until_stopped(manager_stopped), drain).await {
            tracing::error!(error = %e, "the ARI event loop stopped; shutting down");
            stop.send_replace(true);
        }
    });
    serve(listener, app.state.clone(), until_stopped(stopped)).await.map_err(StartError::Listen)?;
    let _ = follow.await;
    app.stores.close().await;
    tracing::info!("stopped");
    Ok(())
}
