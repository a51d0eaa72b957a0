//! The `tandem-loadtest` binary: parses the command line and runs it (`tandem load` runs
//! the same).

use clap::Parser;
use std::process::ExitCode;
use tandem_loadtest::Cli;

fn main() -> ExitCode {
    tandem_loadtest::main_with(Cli::parse(), "tandem-loadtest")
}
