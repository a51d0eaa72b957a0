//! The `tandem` command: `tandem serve` runs the sync service, `tandem token` mints a token,
//! `tandem check` checks the SQLite database for damage.

/// mimalloc rather than the system allocator: a profile of a node under write load spent a
/// fifth of its CPU in glibc's malloc and free (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tandem_server::main_entry()
}
