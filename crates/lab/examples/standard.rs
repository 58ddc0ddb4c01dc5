//! Builds the standard topology and keeps it until Enter is pressed (or stdin closes), for
//! poking at it with `ip netns exec`. Run as root:
//! `cargo run -p braid-lab --example standard -- [--no-ipv6] [--rates 20000000,30000000]`.

use braid_lab::{StandardConfig, StandardLab};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = StandardConfig::by_hand();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--no-ipv6" => config.ipv6 = false,
            "--rates" => {
                let rates: Vec<u64> = args
                    .next()
                    .ok_or("--rates needs a value")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
                config.uplinks = rates.len();
                config.rates = Some(rates);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let lab = StandardLab::new(config)?;
    for ns in lab.namespaces() {
        println!("{ns}");
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    drop(lab);
    Ok(())
}
