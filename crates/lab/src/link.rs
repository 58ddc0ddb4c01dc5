//! veth links between two namespaces and what tests do to them at runtime: shaping (tbf),
//! one-way delay with jitter (a user-space delay line, see [`crate::delay`]), random loss and
//! blackholing (nft), down/up, address removal and address replacement. Everything here can
//! be called while traffic runs.
//!
//! Where these act on a packet leaving an end: nft loss and blackhole first (postrouting),
//! then the delay line, then the tbf queue, then the wire. A delayed packet is therefore
//! shaped after its delay, which for a transfer adds up the same as a queue before a long
//! wire, and it cannot be lost by nft twice.

use std::fs::File;
use std::os::fd::AsRawFd as _;

use ipnet::IpNet;
use netlink_packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{LinkUnspec, LinkVeth};

use crate::delay::{Delay, DelayStats};
use crate::error::{Error, Result};
use crate::netns::Netns;

/// Smallest tbf bucket; the reference lab's `burst 32kb`.
const MIN_BURST_BYTES: u64 = 32 * 1024;

/// Which way packets travel over a [`Link`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From end `a` to end `b` (egress of `a`).
    AtoB,
    /// From end `b` to end `a` (egress of `b`).
    BtoA,
    /// Both ways.
    Both,
}

/// One end of a veth link: an interface inside a namespace.
#[derive(Debug, Clone)]
pub struct LinkEnd {
    ns: Netns,
    ifname: String,
    /// The other end, for what changes there with this one (routes via this end's address).
    peer_ns: Netns,
    peer_if: String,
}

impl LinkEnd {
    /// The namespace this end lives in.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The interface name inside that namespace.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Adds an address (remembered, restored by [`LinkEnd::up`] and
    /// [`LinkEnd::restore_addrs`]).
    pub fn add_addr(&self, addr: IpNet) -> Result<()> {
        self.ns.add_addr(&self.ifname, addr)
    }

    /// The addresses the lab configured here.
    pub fn addrs(&self) -> Vec<IpNet> {
        self.ns.addrs(&self.ifname)
    }

    /// Sets the interface down; the kernel deletes the routes through it.
    pub fn down(&self) -> Result<()> {
        self.ns.link_down(&self.ifname)
    }

    /// Sets the interface up and re-installs its addresses and the lab's routes through it.
    pub fn up(&self) -> Result<()> {
        self.ns.link_up(&self.ifname)?;
        self.ns.restore(&self.ifname)
    }

    /// Removes the configured addresses from the kernel but remembers them (failover by
    /// address removal, the fastest to be noticed by MPTCP).
    pub fn remove_addrs(&self) -> Result<()> {
        for a in self.addrs() {
            self.ns.addr_kernel_del(&self.ifname, a)?;
        }
        Ok(())
    }

    /// Puts back what [`LinkEnd::remove_addrs`] removed, and the routes that went with them.
    pub fn restore_addrs(&self) -> Result<()> {
        self.ns.restore(&self.ifname)
    }

    /// Gives this end a new address in place of `old`, as a DHCP renewal or a PPP reconnect
    /// that changes the address would, and updates what the lab configured around it, so
    /// that [`LinkEnd::up`] and [`LinkEnd::restore_addrs`] later put back `new`:
    ///
    /// - here: `new` is added before `old` is removed (IPv4 secondaries are promoted), so the
    ///   interface never loses all its addresses, which would make the kernel flush its
    ///   routes; the lab's routes with preferred source `old` (any table) get source `new`;
    ///   the lab's rules `from old/32` (`/128`) become `from new/32`;
    /// - at the peer end: the lab's routes via `old` (through the peer's interface or with
    ///   no device) go via `new`.
    ///
    /// Routes and rules added outside the lab, MPTCP endpoints and the addresses kept in
    /// [`crate::Uplink`] or [`crate::Segment`] are left alone: moving an endpoint is the path
    /// manager's job, which tests usually want to watch. `new` should be in a subnet the peer
    /// reaches (normally the same one), or the peer's routes via it cannot be installed.
    /// While the interface is down only the lab's records change; [`LinkEnd::up`] installs
    /// them.
    pub fn replace_addr(&self, old: IpNet, new: IpNet) -> Result<()> {
        self.ns.replace_addr(&self.ifname, old, new)?;
        self.peer_ns
            .replace_gateway(&self.peer_if, old.addr(), new.addr())
    }

    /// Delays every packet leaving this end by `delay` (one way), in a user-space delay line
    /// that keeps packet order even with jitter. Can be changed while traffic runs (packets
    /// already held keep their release times); [`Delay::NONE`] removes the line.
    ///
    /// Composes with the rest: nft loss and blackhole act before the delay, tbf shaping after
    /// it, and down/up behave as without a delay (held packets are lost while the link is
    /// down, as on a real one). A ping across a link with delay `D` on one end only has an
    /// RTT of `D`; with `D` on both ends, `2 D`.
    ///
    /// ```no_run
    /// # fn main() -> braid_lab::Result<()> {
    /// # let lab = braid_lab::StandardLab::new(Default::default())?;
    /// use std::time::Duration;
    /// use braid_lab::Delay;
    /// let end = &lab.uplinks[0].link.a;
    /// end.set_delay(Duration::from_millis(20))?;
    /// end.set_delay(Delay::ms(20).with_jitter(Duration::from_millis(5)))?;
    /// end.set_delay(Delay::NONE)?;
    /// # Ok(()) }
    /// ```
    pub fn set_delay(&self, delay: impl Into<Delay>) -> Result<()> {
        self.ns.set_delay(&self.ifname, delay.into())
    }

    /// The delay set on this end ([`Delay::NONE`] without one).
    pub fn delay(&self) -> Delay {
        self.ns.delay(&self.ifname)
    }

    /// What this end's delay line has done, if it has one.
    pub fn delay_stats(&self) -> Option<DelayStats> {
        self.ns.delay_stats(&self.ifname)
    }

    /// Limits the rate of packets leaving this end: `tc qdisc replace dev IF root tbf rate R
    /// burst B latency 50ms`, with B = 32 KiB or 4 ms worth of the rate, whichever is larger
    /// (tbf needs a bucket of at least one timer tick at high rates).
    pub fn shape(&self, rate_bps: u64) -> Result<()> {
        if rate_bps == 0 {
            return Err(Error::Config("shaping rate must be > 0".into()));
        }
        let burst = MIN_BURST_BYTES.max(rate_bps / 8 / 250);
        self.ns
            .tc(&[
                "qdisc",
                "replace",
                "dev",
                &self.ifname,
                "root",
                "tbf",
                "rate",
                &format!("{rate_bps}bit"),
                "burst",
                &burst.to_string(),
                "latency",
                "50ms",
            ])
            .map(drop)
    }

    /// Removes the shaping (no-op if there was none).
    pub fn unshape(&self) -> Result<()> {
        match self.ns.tc(&["qdisc", "del", "dev", &self.ifname, "root"]) {
            Ok(_) => Ok(()),
            // tc's ways of saying "there is no root qdisc to delete".
            Err(Error::Command { stderr, .. })
                if stderr.contains("handle of zero") || stderr.contains("No such file") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Drops `pct` percent (0 to 100, hundredths honoured) of the packets leaving this end,
    /// at random (`nft ... numgen random`), as the wire would: they are dropped as they
    /// arrive at the peer, so the sender's TCP sees real loss; 0 removes the loss.
    pub fn set_loss(&self, pct: f64) -> Result<()> {
        if !(0.0..=100.0).contains(&pct) {
            return Err(Error::Config(format!("loss {pct}% is not within 0..=100")));
        }
        self.peer_ns
            .set_wire_drop(&self.peer_if, |e| e.loss_pct = pct)
    }

    /// Drops every packet leaving this end (or stops doing so), on arrival at the peer like
    /// [`LinkEnd::set_loss`]: the sender is told nothing.
    pub fn set_blackhole(&self, on: bool) -> Result<()> {
        self.peer_ns
            .set_wire_drop(&self.peer_if, |e| e.blackhole = on)
    }
}

/// A veth pair between two namespaces. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Link {
    /// The end created first.
    pub a: LinkEnd,
    /// The peer.
    pub b: LinkEnd,
}

impl Link {
    /// Creates a veth pair `a_if` (in `a`) ⇄ `b_if` (in `b`), both up.
    ///
    /// Both ends are created directly inside their namespaces (the peer through its
    /// namespace fd), so names never meet in the host namespace, where parallel tests could
    /// collide. Names are at most 15 bytes.
    pub fn create(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<Link> {
        for n in [a_if, b_if] {
            if n.is_empty() || n.len() > 15 || n.contains(['/', ' ', ':']) {
                return Err(Error::Config(format!("bad interface name {n:?}")));
            }
        }
        let peer_ns = File::open(b.path())
            .map_err(|e| Error::io(format!("open {}", b.path().display()), b.name(), e))?;
        let (a_name, b_name) = (a_if.to_string(), b_if.to_string());
        a.netlink(
            format!("add veth {a_if} peer {b_if} in {}", b.name()),
            move |h| async move {
                let peer = LinkUnspec::new_with_name(&b_name)
                    .setns_by_fd(peer_ns.as_raw_fd())
                    .build();
                let msg = LinkVeth::new(&a_name, &b_name)
                    .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                    .build();
                let r = h.link().add(msg).execute().await;
                drop(peer_ns);
                r
            },
        )?;
        a.link_up(a_if)?;
        b.link_up(b_if)?;
        Ok(Link {
            a: LinkEnd {
                ns: a.clone(),
                ifname: a_if.to_string(),
                peer_ns: b.clone(),
                peer_if: b_if.to_string(),
            },
            b: LinkEnd {
                ns: b.clone(),
                ifname: b_if.to_string(),
                peer_ns: a.clone(),
                peer_if: a_if.to_string(),
            },
        })
    }

    fn ends(&self, dir: Direction) -> Vec<&LinkEnd> {
        match dir {
            Direction::AtoB => vec![&self.a],
            Direction::BtoA => vec![&self.b],
            Direction::Both => vec![&self.a, &self.b],
        }
    }

    /// Shapes both directions to `rate_bps` bit/s (tbf on both ends).
    pub fn shape(&self, rate_bps: u64) -> Result<()> {
        self.shape_dir(Direction::Both, rate_bps)
    }

    /// Shapes one or both directions.
    pub fn shape_dir(&self, dir: Direction, rate_bps: u64) -> Result<()> {
        self.ends(dir)
            .into_iter()
            .try_for_each(|e| e.shape(rate_bps))
    }

    /// Removes shaping in both directions.
    pub fn unshape(&self) -> Result<()> {
        self.a.unshape()?;
        self.b.unshape()
    }

    /// Random loss of `pct` percent in the given direction(s); 0 removes it.
    pub fn set_loss(&self, dir: Direction, pct: f64) -> Result<()> {
        self.ends(dir).into_iter().try_for_each(|e| e.set_loss(pct))
    }

    /// One-way delay in the given direction(s) (see [`LinkEnd::set_delay`]);
    /// [`Delay::NONE`] removes it. `Direction::Both` with `D` makes the RTT `2 D`.
    pub fn set_delay(&self, dir: Direction, delay: impl Into<Delay>) -> Result<()> {
        let delay = delay.into();
        self.ends(dir)
            .into_iter()
            .try_for_each(|e| e.set_delay(delay))
    }

    /// Drops everything in both directions (nft), or stops doing so. The interfaces stay up,
    /// so unlike [`Link::down`] nothing is told: the peers only notice by timeouts.
    pub fn set_blackhole(&self, on: bool) -> Result<()> {
        self.a.set_blackhole(on)?;
        self.b.set_blackhole(on)
    }

    /// Sets end `a` down (end `b` then has no carrier). Routes through `a` are deleted by the
    /// kernel; [`Link::up`] re-installs them.
    pub fn down(&self) -> Result<()> {
        self.a.down()
    }

    /// Sets both ends up and re-installs their addresses and the lab's routes through them.
    pub fn up(&self) -> Result<()> {
        self.a.up()?;
        self.b.up()
    }
}
