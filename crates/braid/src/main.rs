//! The `braid` binary: parses the command line and runs the chosen role.

use std::process::ExitCode;

use braid::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Converter(args) => braid::converter::main(args),
        Command::Gateway(args) => braid::gateway::main(args),
        Command::Demo(args) => braid::demo::main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line: "listening on X: Address in use".
            eprintln!("braid: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
