//! The converter's share of MPTCP path management: the limits that decide whether clients may
//! join extra subflows, the addresses it announces (`signal` endpoints), and the C flag for
//! converters that share one address (with ECMP in front of several converters, joins to the
//! shared address land on the wrong one and fail with `MPJoinNoTokenFound`; announcing a unique
//! address and refusing joins to the initial address fixes that).

use anyhow::Context;
use braid_sys::pm::{Endpoint, EndpointFlags, PathManager, PmLimits};

use super::config::Settings;
use crate::ledger::{Change, JOIN_INITIAL, STALE_LOSS_CNT, Session};

/// Sets or checks the limits, adds the signal endpoints and sets the C flag, as configured,
/// recording each change in the namespace's ledger: the last braid process relying on one
/// undoes it at exit ([`crate::ledger::release`]), or the next start after a crash.
pub async fn setup(s: &Settings) -> anyhow::Result<()> {
    let mut pm = PathManager::new().context("opening the MPTCP path manager (generic netlink)")?;
    let current = pm.limits().await.context("reading the MPTCP limits")?;
    let wanted = PmLimits {
        subflows: s.mptcp_subflows.unwrap_or(current.subflows),
        add_addr_accepted: s
            .mptcp_add_addr_accepted
            .unwrap_or(current.add_addr_accepted),
    };
    if wanted.subflows == 0 {
        // The limit that matters on the converter: joins beyond it are refused with a RST.
        tracing::warn!(
            "MPTCP limits forbid extra subflows: clients cannot bond links; run \
             `ip mptcp limits set subflows 8 add_addr_accepted 8` or start with \
             --mptcp-subflows 8"
        );
    }
    let mut ledger = match Session::open(&s.state_dir).await {
        Ok(l) => l,
        // Nothing asked for but the stale_loss_cnt tuning, which is never fatal.
        Err(e)
            if s.mptcp_subflows.is_none()
                && s.mptcp_add_addr_accepted.is_none()
                && s.signal.is_empty()
                && s.join_initial_addr =>
        {
            if s.stale_loss_cnt.is_some() {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "net.mptcp.stale_loss_cnt left as it is: the ledger cannot record it"
                );
            }
            return Ok(());
        }
        Err(e) => {
            return Err(e.context("the MPTCP options change the namespace and need the ledger"));
        }
    };
    match ledger.limits(wanted).await.with_context(|| {
        format!(
            "setting MPTCP limits to subflows {} add_addr_accepted {}",
            wanted.subflows, wanted.add_addr_accepted
        )
    })? {
        Change::Set { from, .. } => tracing::info!(
            subflows = wanted.subflows,
            add_addr_accepted = wanted.add_addr_accepted,
            was = from,
            "set MPTCP path manager limits (restored at exit)"
        ),
        Change::Unchanged => tracing::info!(
            subflows = current.subflows,
            add_addr_accepted = current.add_addr_accepted,
            "MPTCP path manager limits"
        ),
    }
    if !s.signal.is_empty() {
        let existing = pm.endpoints().await.context("listing MPTCP endpoints")?;
        let mut added = Vec::new();
        for sig in &s.signal {
            if let Some(e) = existing.iter().find(|e| e.addr == sig.ip()) {
                if ledger.owns_endpoint(e.id, e.addr) {
                    // Another converter here announces it too: shared, removed by the last.
                    ledger.hold_endpoint(e.id, e.addr);
                    tracing::info!(endpoint = %e, "signal endpoint already braid's");
                } else if !e.flags.signal {
                    // An operator's own endpoint is left as it is, and left in place at exit.
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
            let result = pm.add_endpoint(&ep).await;
            // The kernel chose the id; read it back so that exit removes exactly this one,
            // and record it before anything else can fail.
            let now = pm.endpoints().await.context("listing MPTCP endpoints")?;
            if let Some(e) = now.iter().find(|e| e.addr == sig.ip()) {
                ledger.hold_endpoint(e.id, e.addr);
                added.push(e.clone());
            }
            result.with_context(|| format!("adding signal endpoint {}", sig.ip()))?;
        }
        for e in &added {
            tracing::info!(endpoint = %e, "announcing address to clients (ADD_ADDR)");
        }
        if wanted.subflows == 0 {
            tracing::warn!(
                "signal addresses are announced but the subflow limit is 0: clients' joins to \
                 them will be refused"
            );
        }
    }
    // `net.mptcp.stale_loss_cnt`: after that many MPTCP-level retransmission intervals with
    // data outstanding and no progress, the scheduler ignores a subflow. The converter sends
    // the downloads, so its value decides how long a download stalls when a client's uplink
    // goes silent. Measured (a 4 Mbit/s stream, the uplink of the first subflow blackholed):
    // longest stall median 0.99 s with the kernel's 4, 0.69 s with 2.
    if let Some(want) = s.stale_loss_cnt {
        match ledger.sysctl(STALE_LOSS_CNT, |_| Ok(want.to_string())) {
            Ok(Change::Set { from, to }) => tracing::info!(
                was = from,
                now = to,
                "set net.mptcp.stale_loss_cnt: silent subflows are given up sooner (restored at \
                 exit; --stale-loss-cnt 0 leaves it alone)"
            ),
            Ok(Change::Unchanged) => {}
            // Not fatal: a tuning.
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "could not set net.mptcp.stale_loss_cnt"
            ),
        }
    }
    if !s.join_initial_addr {
        ledger.sysctl(JOIN_INITIAL, |_| Ok("0".into())).context(
            "setting net.mptcp.allow_join_initial_addr_port (needs root and Linux >= 6.1; \
                 or run `sysctl -w net.mptcp.allow_join_initial_addr_port=0` and drop \
                 --no-join-initial-addr)",
        )?;
        tracing::info!(
            "set net.mptcp.allow_join_initial_addr_port=0: clients join only the announced \
             addresses (the C flag; restored at exit)"
        );
    }
    Ok(())
}
