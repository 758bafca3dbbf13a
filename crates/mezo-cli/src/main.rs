use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = mezo_cli::Cli::parse();
    match mezo_cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
