use clap::Parser;

/// mimalloc: the training and scoring loops free and allocate [batch × items] buffers every step;
/// glibc hands such blocks back to the OS and page-faults them in again (4.8M faults in one
/// Gowalla epoch, ~25% of its CPU time), mimalloc reuses them (0.1M faults). The price: peak RSS
/// ~150–200 MiB higher at 1M users (tests/it/memory.rs), within the documented bound.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cli;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // written, not `eprintln!`: with stderr gone the exit code still says why it failed
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
