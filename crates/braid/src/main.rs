//! The `braid` binary: parses the command line and runs the chosen role.

use std::process::ExitCode;

use braid::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Converter(args) => braid::converter::main(args),
        Command::Gateway(args) => braid::gateway::main(args),
        Command::Demo(_) => return not_yet("demo", 4),
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

/// Subcommands whose daemon is not built yet say so plainly instead of pretending.
fn not_yet(what: &str, issue: u32) -> ExitCode {
    eprintln!(
        "braid {what}: not yet implemented in this version (planned: issue {issue}); \
         `braid {what} --help` shows the interface it will have"
    );
    ExitCode::from(2)
}
