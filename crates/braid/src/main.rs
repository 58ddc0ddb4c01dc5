//! The `braid` binary: parses the command line and runs the chosen role.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use braid::cli::{Cli, Command};
use braid::daemon;
use clap::Parser;

/// jemalloc returns freed memory to the system (with the purging thread the daemons start),
/// where glibc's allocator keeps the relay's freed buffers resident: 4 against 21 KiB of RSS
/// per idle connection.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // Without its background thread jemalloc purges freed pages only when the process
    // allocates again: an idle daemon would keep them resident.
    #[cfg(feature = "jemalloc")]
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        eprintln!("braid: warning: jemalloc's purging thread did not start: {e}");
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Converter(a) => daemon::main(
            braid::converter::config::Settings::load(a.common.config.as_deref(), a.overlay()),
            a.common.check_config,
        ),
        Command::Gateway(a) => daemon::main(
            braid::gateway::config::Settings::load(a.common.config.as_deref(), a.overlay()),
            a.common.check_config,
        ),
        #[cfg(feature = "demo")]
        Command::Demo(a) => braid::demo::main(a.options()),
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
