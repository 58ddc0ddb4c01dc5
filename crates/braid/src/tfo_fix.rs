//! Workaround for a kernel bug (6.18, no upstream fix known; docs/architecture.md, "Kernel
//! workarounds"): for a passive TCP Fast Open MPTCP socket, the MPTCP-level send window is
//! derived from the client's SYN window *shifted by the client's window scale*, though a SYN's
//! window is never scaled. The converter then overruns the client's real window and downloads
//! stall for seconds on connections with two subflows.
//!
//! The fix: in the converter's network namespace, divide the window field of incoming
//! MP_CAPABLE SYNs to the converter's ports by 2^wscale, so that the kernel's wrong shift
//! restores the real value. One rule per possible scale (1..=14), in a table of braid's own
//! named after the port: installed at start (a stale table from a crash is replaced), removed on
//! exit. Every packet that enters the host passes the prerouting chain, so the chain holds one
//! rule (a SYN to the port?) that jumps to the fourteen: any other packet costs the converter's
//! host one rule, not fourteen (nft_do_chain was 3 % of the relay's CPU profile with the
//! fourteen in the base chain, and with two listening ports twice that).

use std::io;

use braid_sys::nft::{self, BaseChain, Batch, Expr, Family, Hook, REG_1, base, matches, priority};

/// nftables table that holds the rule for `port`.
pub fn table_name(port: u16) -> String {
    format!("braid_tfo_{port}")
}

/// The installed rules; dropping this removes them.
#[derive(Debug)]
pub struct TfoWindowFix {
    tables: Vec<String>,
}

/// Installs the rule for every port (duplicates are ignored).
pub fn install(ports: &[u16]) -> io::Result<TfoWindowFix> {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    let mut fix = TfoWindowFix { tables: Vec::new() };
    for port in ports {
        let table = table_name(port);
        if nft::delete_table_if_exists(Family::Inet, &table)? {
            tracing::info!(%table, "removed a stale TFO window rule left by an earlier run");
        }
        let mut batch = Batch::new(Family::Inet);
        let chain = BaseChain {
            name: "syn_window".into(),
            kind: "filter",
            hook: Hook::Prerouting,
            priority: priority::MANGLE,
        };
        batch
            .add_table(&table)
            .add_chain(&table, &chain)
            .add_regular_chain(&table, BY_SCALE)
            .add_rule(&table, &chain.name, &syn_to(port));
        for scale in 1..=14u8 {
            batch.add_rule(&table, BY_SCALE, &rule(scale));
        }
        batch.commit()?;
        tracing::info!(%table, port, "installed the TFO SYN-window rule (kernel bug workaround)");
        fix.tables.push(table);
    }
    Ok(fix)
}

impl Drop for TfoWindowFix {
    fn drop(&mut self) {
        for table in &self.tables {
            if let Err(e) = nft::delete_table_if_exists(Family::Inet, table) {
                tracing::warn!(%table, error = %e, "could not remove the TFO window rule");
            }
        }
    }
}

/// The regular chain with one rule per window scale.
const BY_SCALE: &str = "by_scale";

/// `tcp flags & (syn|ack) == syn tcp dport PORT jump by_scale`: the flags first, since nearly
/// every packet fails there.
fn syn_to(port: u16) -> Vec<Expr> {
    [
        matches::tcp(),
        matches::syn_only(),
        matches::tcp_dport(port),
        vec![Expr::Jump(BY_SCALE.into())],
    ]
    .concat()
}

/// (in `by_scale`) `tcp option mptcp subtype 0 tcp option window count SCALE
///  tcp window set tcp window >> SCALE`. It starts with `meta l4proto tcp` again, which only
/// SYNs pay: without it `nft list` cannot name the field and prints `@th,112,16`.
fn rule(scale: u8) -> Vec<Expr> {
    [
        matches::tcp(),
        vec![
            // MPTCP option (kind 30), subtype MP_CAPABLE (high nibble of its third byte is 0).
            Expr::TcpOption {
                kind: 30,
                offset: 2,
                len: 1,
                dreg: REG_1,
            },
            Expr::Bitwise {
                reg: REG_1,
                mask: vec![0xf0],
                xor: vec![0],
            },
            matches::eq(vec![0]),
            // Window scale option (kind 3): its shift count.
            Expr::TcpOption {
                kind: 3,
                offset: 2,
                len: 1,
                dreg: REG_1,
            },
            matches::eq(vec![scale]),
            // window = window >> scale, with the TCP checksum (offset 16) updated.
            Expr::Payload {
                base: base::TRANSPORT,
                offset: 14,
                len: 2,
                dreg: REG_1,
            },
            Expr::ByteOrder {
                reg: REG_1,
                to_host: true,
                len: 2,
                size: 2,
            },
            Expr::ShiftRight {
                reg: REG_1,
                len: 2,
                bits: u32::from(scale),
            },
            Expr::ByteOrder {
                reg: REG_1,
                to_host: false,
                len: 2,
                size: 2,
            },
            Expr::PayloadWrite {
                base: base::TRANSPORT,
                offset: 14,
                len: 2,
                sreg: REG_1,
                csum_offset: Some(16),
            },
        ],
    ]
    .concat()
}
