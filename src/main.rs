use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match boxoffice::cli::Cli::parse().run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boxoffice: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
