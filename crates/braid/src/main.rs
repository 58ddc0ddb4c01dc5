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
            Box::new(move || {
                braid::converter::config::Settings::load(a.common.config.as_deref(), a.overlay())
            }),
        ),
        Command::Gateway(a) => daemon::main(
            braid::gateway::config::Settings::load(a.common.config.as_deref(), a.overlay()),
            a.common.check_config,
            Box::new(move || {
                braid::gateway::config::Settings::load(a.common.config.as_deref(), a.overlay())
            }),
        ),
        Command::Status(a) => status(a.json),
        Command::Doctor(d) => return doctor(d),
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

/// `braid doctor`: exit code 0 only when no check failed.
fn doctor(d: braid::cli::DoctorCommand) -> ExitCode {
    use braid::cli::DoctorCommand;
    let r = match d {
        DoctorCommand::Gateway(a) => {
            let mut converters = a.converter.clone();
            let loaded = match &a.config {
                Some(path) => braid::gateway::config::Settings::load(
                    Some(path.as_path()),
                    braid::gateway::config::File::default(),
                )
                .map(|s| converters.extend(s.converters))
                .map_err(anyhow::Error::from),
                None => Ok(()),
            };
            loaded.and_then(|()| braid::doctor::gateway(&converters, a.json))
        }
        DoctorCommand::Converter(a) => braid::doctor::converter(a.port, a.destination, a.json),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("braid: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `braid status`: asks each role's control socket of this network namespace.
fn status(json: bool) -> anyhow::Result<()> {
    let mut found = 0;
    for role in ["gateway", "converter"] {
        let Ok(s) = braid::status::fetch(role) else {
            continue;
        };
        found += 1;
        let text = if json {
            format!("{}\n", serde_json::to_string(&s)?)
        } else {
            braid::status::render(&s)
        };
        // A reader that went away (`braid status | head`) is not an error worth a panic.
        if braid::daemon::print_or_broken_pipe(&text).is_err() {
            return Ok(());
        }
    }
    if found == 0 {
        anyhow::bail!(
            "no braid gateway or converter answers in this network namespace (is one running? \
             in a namespace, run: ip netns exec NAME braid status)"
        );
    }
    Ok(())
}
