//! `tandem` under another name, for the end-to-end tests to run as a real process.

fn main() -> std::process::ExitCode {
    tandem_server::main_entry()
}
