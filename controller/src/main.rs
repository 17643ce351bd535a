use std::io::IsTerminal;

use clap::Parser;
use sluice_controller::settings::{Flags, LogFormat, Settings};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        // Colour codes only for a terminal; log files and collectors get plain text.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let started = match Settings::resolve(Flags::parse()) {
        Ok(settings) => {
            init_logging(settings.log_format);
            sluice_controller::serve(settings, sluice_controller::shutdown_signal())
                .await
                .map_err(|e| e.to_string())
        }
        Err(error) => {
            init_logging(LogFormat::Text);
            Err(error.to_string())
        }
    };
    match started {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            std::process::ExitCode::FAILURE
        }
    }
}
