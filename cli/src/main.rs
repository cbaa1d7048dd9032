//! `clustermesh`: enable, connect and inspect clusters of the mesh.
//!
//! Errors end the process with one line on stderr saying what is wrong and what to do,
//! and a non-zero exit status.

use std::process::ExitCode;

use clap::Parser;
use clustermesh_cli::cli::flags::{Cli, LogFormat};
use clustermesh_cli::cli::{self};

fn main() -> ExitCode {
    let args = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // kube-client logs each failed request at error level; the CLI reports the same
        // failure itself as one line, so kube-client stays quiet unless RUST_LOG asks.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,kube_client=off"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
