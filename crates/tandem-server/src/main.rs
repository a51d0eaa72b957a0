//! The `tandem` command: `tandem serve` runs the sync service, `tandem token` mints a token.

fn main() -> std::process::ExitCode {
    tandem_server::main_entry()
}
