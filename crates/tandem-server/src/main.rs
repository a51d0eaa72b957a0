//! The `tandem` command: `tandem serve` runs the sync service, `tandem token` mints a token,
//! `tandem check` checks the SQLite database for damage.

fn main() -> std::process::ExitCode {
    tandem_server::main_entry()
}
