//! The `tandem-loadtest` binary: parses the command line, runs the scenario on a
//! multi-threaded runtime, prints the report (a table, or one JSON object with `--json`).
//! Exits 0 on a completed run, also with loss or errors (they are in the report); 1 when
//! the run could not be set up; 2 on bad options.

use clap::Parser;
use std::process::ExitCode;
use tandem_loadtest::{Cli, LoadError};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.common.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tandem-loadtest: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tandem_loadtest::run(cli)) {
        Ok(report) => {
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
            ExitCode::SUCCESS
        }
        Err(e @ LoadError::Options(_)) => {
            eprintln!("tandem-loadtest: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("tandem-loadtest: {e}");
            ExitCode::FAILURE
        }
    }
}
