use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = multivaed::cli::Cli::parse();
    match multivaed::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
