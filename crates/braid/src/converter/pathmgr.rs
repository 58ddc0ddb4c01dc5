//! The converter's share of MPTCP path management: the limits that decide whether clients may
//! join extra subflows, the addresses it announces (`signal` endpoints), and the C flag for
//! converters that share one address (with ECMP in front of several converters, joins to the
//! shared address land on the wrong one and fail with `MPJoinNoTokenFound`; announcing a unique
//! address and refusing joins to the initial address fixes that).

use std::net::IpAddr;

use anyhow::Context;
use braid_sys::pm::{Endpoint, EndpointFlags, PathManager, PmLimits};

use super::config::Settings;

const JOIN_INITIAL_SYSCTL: &str = "/proc/sys/net/mptcp/allow_join_initial_addr_port";
const STALE_LOSS_SYSCTL: &str = "/proc/sys/net/mptcp/stale_loss_cnt";

/// What was changed at start and must be undone at exit.
#[derive(Debug, Default)]
pub struct Added {
    endpoint_ids: Vec<(u8, IpAddr)>,
}

/// Sets or checks the limits, adds the signal endpoints and sets the C flag, as configured.
/// Returns what it added so that [`cleanup`] removes exactly that.
pub async fn setup(s: &Settings) -> anyhow::Result<Added> {
    let mut pm = PathManager::new().context("opening the MPTCP path manager (generic netlink)")?;
    let current = pm.limits().await.context("reading the MPTCP limits")?;
    let wanted = PmLimits {
        subflows: s.mptcp_subflows.unwrap_or(current.subflows),
        add_addr_accepted: s
            .mptcp_add_addr_accepted
            .unwrap_or(current.add_addr_accepted),
    };
    if wanted != current {
        pm.set_limits(wanted).await.with_context(|| {
            format!(
                "setting MPTCP limits to subflows {} add_addr_accepted {}",
                wanted.subflows, wanted.add_addr_accepted
            )
        })?;
        tracing::info!(
            subflows = wanted.subflows,
            add_addr_accepted = wanted.add_addr_accepted,
            "set MPTCP path manager limits"
        );
    } else {
        tracing::info!(
            subflows = current.subflows,
            add_addr_accepted = current.add_addr_accepted,
            "MPTCP path manager limits"
        );
    }
    if wanted.subflows == 0 {
        // The limit that matters on the converter: joins beyond it are refused with a RST.
        tracing::warn!(
            "MPTCP limits forbid extra subflows: clients cannot bond links; run \
             `ip mptcp limits set subflows 8 add_addr_accepted 8` or start with \
             --mptcp-subflows 8"
        );
    }

    let mut added = Added::default();
    if !s.signal.is_empty() {
        let existing = pm.endpoints().await.context("listing MPTCP endpoints")?;
        for sig in &s.signal {
            if let Some(e) = existing.iter().find(|e| e.addr == sig.ip()) {
                // An operator's own endpoint is left as it is, and left in place at exit.
                if !e.flags.signal {
                    tracing::warn!(
                        endpoint = %e,
                        "--signal address is already an MPTCP endpoint without the signal \
                         flag; it is not announced (change it with `ip mptcp endpoint change`)"
                    );
                } else {
                    tracing::info!(endpoint = %e, "signal endpoint already present");
                }
                continue;
            }
            let ep = Endpoint {
                id: 0,
                addr: sig.ip(),
                port: (sig.port() != 0).then_some(sig.port()),
                flags: EndpointFlags {
                    signal: true,
                    ..Default::default()
                },
                ifindex: None,
            };
            pm.add_endpoint(&ep)
                .await
                .with_context(|| format!("adding signal endpoint {}", sig.ip()))?;
            added.endpoint_ids.push((0, sig.ip()));
        }
        // The kernel chose the ids; read them back so that exit removes exactly these.
        let now = pm.endpoints().await.context("listing MPTCP endpoints")?;
        for (id, addr) in &mut added.endpoint_ids {
            if let Some(e) = now.iter().find(|e| e.addr == *addr) {
                *id = e.id;
                tracing::info!(endpoint = %e, "announcing address to clients (ADD_ADDR)");
            }
        }
        if wanted.subflows == 0 {
            tracing::warn!(
                "signal addresses are announced but the subflow limit is 0: clients' joins to \
                 them will be refused"
            );
        }
    }
    if let Some(want) = s.stale_loss_cnt {
        set_stale_loss_cnt(want);
    }
    if !s.join_initial_addr {
        set_join_initial(false)?;
        tracing::info!(
            "set net.mptcp.allow_join_initial_addr_port=0: clients join only the announced \
             addresses (the C flag)"
        );
    }
    Ok(added)
}

/// Removes the endpoints [`setup`] added. The C flag, the limits and `stale_loss_cnt` stay: they
/// are namespace settings another converter process may rely on, and they cost nothing when
/// idle.
pub async fn cleanup(added: Added) {
    if added.endpoint_ids.is_empty() {
        return;
    }
    let mut pm = match PathManager::new() {
        Ok(pm) => pm,
        Err(e) => {
            tracing::warn!(error = %e, "could not remove signal endpoints");
            return;
        }
    };
    for (id, addr) in added.endpoint_ids {
        if let Err(e) = pm.delete_endpoint(id).await {
            tracing::warn!(id, %addr, error = %e, "could not remove signal endpoint");
        }
    }
}

/// `net.mptcp.stale_loss_cnt`: after that many MPTCP-level retransmission intervals with data
/// outstanding and no progress, the scheduler ignores a subflow. The converter sends the
/// downloads, so its value decides how long a download stalls when a client's uplink goes
/// silent. Measured (a 4 Mbit/s stream, the uplink of the first subflow blackholed): longest
/// stall median 0.99 s with the kernel's 4, 0.69 s with 2. Not fatal when it cannot be set.
fn set_stale_loss_cnt(want: u32) {
    match std::fs::read_to_string(STALE_LOSS_SYSCTL) {
        Ok(v) if v.trim() == want.to_string() => {}
        Ok(v) => match std::fs::write(STALE_LOSS_SYSCTL, want.to_string()) {
            Ok(()) => tracing::info!(
                was = v.trim(),
                now = want,
                "set net.mptcp.stale_loss_cnt: silent subflows are given up sooner (a namespace \
                 setting, left at exit; --stale-loss-cnt 0 leaves it alone)"
            ),
            Err(e) => tracing::warn!(error = %e, "could not set net.mptcp.stale_loss_cnt"),
        },
        Err(e) => tracing::warn!(error = %e, "could not read net.mptcp.stale_loss_cnt"),
    }
}

fn set_join_initial(allow: bool) -> anyhow::Result<()> {
    std::fs::write(JOIN_INITIAL_SYSCTL, if allow { "1" } else { "0" }).with_context(|| {
        format!(
            "setting {JOIN_INITIAL_SYSCTL} (needs root and Linux >= 6.1; or run \
             `sysctl -w net.mptcp.allow_join_initial_addr_port=0` and drop \
             --no-join-initial-addr)"
        )
    })
}
