use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = tailnode::args::Args::parse();
    tailnode::install_crypto_provider();
    match tailnode::app::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
