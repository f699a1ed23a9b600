//! `s4db`: the command line. Parsing and exit codes only; the work is in `s4db::cli`.

use clap::Parser;
use s4db::cli::{run, Cli, Outcome};
use s4db::Error;
use std::process::ExitCode;

fn main() -> ExitCode {
    s4db::buffer_pool::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("S4DB_LOG")
                // Our warnings only: the SDK's own (e.g. about a missing config
                // file) would break the one-line error contract.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("s4db=warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("s4db: error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::NotFound) => ExitCode::from(1),
        // A reader that went away (`s4db keys db | head`) is not an error.
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("s4db: error: {e}");
            ExitCode::from(2)
        }
    }
}
