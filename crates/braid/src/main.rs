//! `braid`: bond several links into one with MPTCP and RFC 8803 Transport Converters.
//!
//! - [`cli`]: the command line (clap), one subcommand per role.
//! - `converter`, `gateway`: the two daemons (see docs/architecture.md).
//! - `demo`: builds a namespaced lab and shows the main job working.

mod cli;
mod config;
mod converter;
mod metrics;
mod relay;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Converter(_) => not_yet("converter", 3),
        cli::Command::Gateway(_) => not_yet("gateway", 4),
        cli::Command::Demo(_) => not_yet("demo", 4),
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
