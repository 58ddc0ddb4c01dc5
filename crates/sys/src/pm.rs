//! The in-kernel MPTCP path manager over generic netlink: `ip mptcp limits` and `ip mptcp
//! endpoint`, without the `ip`.
//!
//! The `mptcp-pm` crate (rust-netlink) only implements the two GET commands, so the request
//! framing for the writing commands is done here, on top of the same `genetlink` transport and
//! reusing `mptcp-pm`'s address attribute type for encoding and decoding endpoints.

use std::fmt;
use std::io;
use std::net::IpAddr;

use futures::StreamExt;
use genetlink::GenetlinkHandle;
use mptcp_pm::MptcpPathManagerAddressAttr as AddrAttr;
use mptcp_pm::MptcpPathManagerAddressAttrFlag as AddrFlag;
use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
    NetlinkMessage, NetlinkPayload, Nla, NlaBuffer, NlasIterator, Parseable, ParseableParametrized,
};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};

// include/uapi/linux/mptcp_pm.h
const CMD_ADD_ADDR: u8 = 1;
const CMD_DEL_ADDR: u8 = 2;
const CMD_GET_ADDR: u8 = 3;
const CMD_FLUSH_ADDRS: u8 = 4;
const CMD_SET_LIMITS: u8 = 5;
const CMD_GET_LIMITS: u8 = 6;
const CMD_SET_FLAGS: u8 = 7;
const ATTR_ADDR: u16 = 1;
const ATTR_RCV_ADD_ADDRS: u16 = 2;
const ATTR_SUBFLOWS: u16 = 3;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// `ip mptcp limits` of the current network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PmLimits {
    /// Extra subflows a connection may have (joins accepted or created).
    pub subflows: u32,
    /// ADD_ADDR announcements a connection may act on.
    pub add_addr_accepted: u32,
}

/// What the kernel does with an endpoint (`ip mptcp endpoint ... signal subflow backup fullmesh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndpointFlags {
    /// Announce the address to peers (ADD_ADDR): the server side of bonding.
    pub signal: bool,
    /// Open a subflow from this address: the client side of bonding.
    pub subflow: bool,
    /// Use only when no non-backup subflow works.
    pub backup: bool,
    /// One subflow from this address to every known peer address.
    pub fullmesh: bool,
}

impl EndpointFlags {
    fn to_attr(self) -> Vec<AddrFlag> {
        let mut v = Vec::new();
        if self.signal {
            v.push(AddrFlag::Signal);
        }
        if self.subflow {
            v.push(AddrFlag::Subflow);
        }
        if self.backup {
            v.push(AddrFlag::Backup);
        }
        if self.fullmesh {
            v.push(AddrFlag::Fullmesh);
        }
        v
    }
}

/// One path manager endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Kernel id; 0 when adding lets the kernel choose.
    pub id: u8,
    pub addr: IpAddr,
    /// Port to announce (signal endpoints only); `None` for "the connection's port".
    pub port: Option<u16>,
    pub flags: EndpointFlags,
    /// Interface the subflows are bound to; `None` for "by routing".
    pub ifindex: Option<u32>,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        if let Some(p) = self.port {
            write!(f, " port {p}")?;
        }
        write!(f, " id {}", self.id)?;
        for (on, name) in [
            (self.flags.signal, "signal"),
            (self.flags.subflow, "subflow"),
            (self.flags.backup, "backup"),
            (self.flags.fullmesh, "fullmesh"),
        ] {
            if on {
                write!(f, " {name}")?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PmAttr {
    /// Nested address attributes (MPTCP_PM_ATTR_ADDR).
    Addr(Vec<AddrAttr>),
    RcvAddAddrs(u32),
    Subflows(u32),
    Other(DefaultNla),
}

impl Nla for PmAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Addr(attrs) => attrs.as_slice().buffer_len(),
            Self::RcvAddAddrs(_) | Self::Subflows(_) => 4,
            Self::Other(a) => a.value_len(),
        }
    }
    fn kind(&self) -> u16 {
        match self {
            Self::Addr(_) => ATTR_ADDR | NLA_F_NESTED,
            Self::RcvAddAddrs(_) => ATTR_RCV_ADD_ADDRS,
            Self::Subflows(_) => ATTR_SUBFLOWS,
            Self::Other(a) => a.kind(),
        }
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::Addr(attrs) => attrs.as_slice().emit(buffer),
            Self::RcvAddAddrs(n) | Self::Subflows(n) => {
                buffer[..4].copy_from_slice(&n.to_ne_bytes())
            }
            Self::Other(a) => a.emit_value(buffer),
        }
    }
}

/// A path manager request or reply: a command and its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PmMessage {
    cmd: u8,
    attrs: Vec<PmAttr>,
}

impl GenlFamily for PmMessage {
    fn family_name() -> &'static str {
        "mptcp_pm"
    }
    fn version(&self) -> u8 {
        1
    }
    fn command(&self) -> u8 {
        self.cmd
    }
}

impl Emitable for PmMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for PmMessage {
    fn parse_with_param(buffer: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let mut attrs = Vec::new();
        for nla in NlasIterator::new(buffer) {
            let nla = nla?;
            let value = nla.value();
            let u32_value = || -> Result<u32, DecodeError> {
                let b: [u8; 4] = value
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| DecodeError::from("short u32 attribute"))?;
                Ok(u32::from_ne_bytes(b))
            };
            attrs.push(match nla.kind() {
                ATTR_ADDR => {
                    let mut inner = Vec::new();
                    for a in NlasIterator::new(value) {
                        inner.push(AddrAttr::parse(&a?)?);
                    }
                    PmAttr::Addr(inner)
                }
                ATTR_RCV_ADD_ADDRS => PmAttr::RcvAddAddrs(u32_value()?),
                ATTR_SUBFLOWS => PmAttr::Subflows(u32_value()?),
                _ => PmAttr::Other(DefaultNla::parse(&NlaBuffer::new(nla.into_inner()))?),
            });
        }
        Ok(Self {
            cmd: header.cmd,
            attrs,
        })
    }
}

/// A generic netlink connection to the MPTCP path manager of the current network namespace (the
/// one of the thread that created it). Needs a tokio runtime.
pub struct PathManager {
    handle: GenetlinkHandle,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for PathManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PathManager")
    }
}

impl Drop for PathManager {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn nl_error(e: impl fmt::Display) -> io::Error {
    io::Error::other(format!("MPTCP path manager netlink: {e}"))
}

impl PathManager {
    pub fn new() -> io::Result<Self> {
        let (conn, handle, _) = genetlink::new_connection()?;
        let task = tokio::spawn(conn);
        Ok(Self { handle, task })
    }

    /// Sends one request and collects the replies; a kernel error becomes an `io::Error` with
    /// its errno (EEXIST, ENOENT, EINVAL...), so callers can tell "already there" apart.
    async fn request(&mut self, msg: PmMessage, dump: bool) -> io::Result<Vec<PmMessage>> {
        let mut nl = NetlinkMessage::from(GenlMessage::from_payload(msg));
        nl.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { NLM_F_ACK };
        let mut stream = Box::pin(self.handle.request(nl).await.map_err(nl_error)?);
        let mut out = Vec::new();
        while let Some(reply) = stream.next().await {
            let reply = reply.map_err(nl_error)?;
            match reply.payload {
                NetlinkPayload::InnerMessage(genl) => out.push(genl.payload),
                NetlinkPayload::Error(e) => match e.code {
                    None => break,
                    Some(code) => return Err(io::Error::from_raw_os_error(-code.get())),
                },
                NetlinkPayload::Done(_) => break,
                _ => {}
            }
        }
        Ok(out)
    }

    /// `ip mptcp limits show`.
    pub async fn limits(&mut self) -> io::Result<PmLimits> {
        let replies = self
            .request(
                PmMessage {
                    cmd: CMD_GET_LIMITS,
                    attrs: vec![],
                },
                false,
            )
            .await?;
        let mut limits = PmLimits::default();
        for attr in replies.into_iter().flat_map(|m| m.attrs) {
            match attr {
                PmAttr::Subflows(n) => limits.subflows = n,
                PmAttr::RcvAddAddrs(n) => limits.add_addr_accepted = n,
                _ => {}
            }
        }
        Ok(limits)
    }

    /// `ip mptcp limits set subflows N add_addr_accepted M`. The kernel caps both at 8
    /// (MPTCP_PM_ADDR_MAX) and answers EINVAL above.
    pub async fn set_limits(&mut self, limits: PmLimits) -> io::Result<()> {
        self.request(
            PmMessage {
                cmd: CMD_SET_LIMITS,
                attrs: vec![
                    PmAttr::RcvAddAddrs(limits.add_addr_accepted),
                    PmAttr::Subflows(limits.subflows),
                ],
            },
            false,
        )
        .await
        .map(drop)
    }

    /// `ip mptcp endpoint show`.
    pub async fn endpoints(&mut self) -> io::Result<Vec<Endpoint>> {
        let replies = self
            .request(
                PmMessage {
                    cmd: CMD_GET_ADDR,
                    attrs: vec![],
                },
                true,
            )
            .await?;
        let mut out = Vec::new();
        for attr in replies.into_iter().flat_map(|m| m.attrs) {
            if let PmAttr::Addr(attrs) = attr
                && let Some(ep) = endpoint_from_attrs(&attrs)
            {
                out.push(ep);
            }
        }
        Ok(out)
    }

    /// `ip mptcp endpoint add ...`. Fails if the address is already an endpoint (EADDRINUSE
    /// through this call on Linux 6.18, as the tests check), beyond 8 endpoints (ERANGE) or for
    /// an id in use (EBUSY).
    pub async fn add_endpoint(&mut self, ep: &Endpoint) -> io::Result<()> {
        let mut attrs = vec![];
        match ep.addr {
            IpAddr::V4(a) => {
                attrs.push(AddrAttr::Family(AF_INET));
                attrs.push(AddrAttr::Addr4(a));
            }
            IpAddr::V6(a) => {
                attrs.push(AddrAttr::Family(AF_INET6));
                attrs.push(AddrAttr::Addr6(a));
            }
        }
        if ep.id != 0 {
            attrs.push(AddrAttr::Id(ep.id));
        }
        if let Some(p) = ep.port {
            attrs.push(AddrAttr::Port(p));
        }
        attrs.push(AddrAttr::Flags(ep.flags.to_attr()));
        if let Some(i) = ep.ifindex {
            attrs.push(AddrAttr::IfIndex(i as i32));
        }
        self.request(
            PmMessage {
                cmd: CMD_ADD_ADDR,
                attrs: vec![PmAttr::Addr(attrs)],
            },
            false,
        )
        .await
        .map(drop)
    }

    /// `ip mptcp endpoint delete id N`: also closes the subflows using it and, for a signal
    /// endpoint, sends REMOVE_ADDR to peers.
    pub async fn delete_endpoint(&mut self, id: u8) -> io::Result<()> {
        self.request(
            PmMessage {
                cmd: CMD_DEL_ADDR,
                attrs: vec![PmAttr::Addr(vec![AddrAttr::Id(id)])],
            },
            false,
        )
        .await
        .map(drop)
    }

    /// `ip mptcp endpoint change id N [no]backup`: changes the priority of the endpoint and of
    /// every subflow using its address on running connections (the kernel marks them locally
    /// and sends MP_PRIO on each), without closing them.
    pub async fn set_backup(&mut self, id: u8, backup: bool) -> io::Result<()> {
        let flags = EndpointFlags {
            backup,
            ..EndpointFlags::default()
        };
        self.request(
            PmMessage {
                cmd: CMD_SET_FLAGS,
                attrs: vec![PmAttr::Addr(vec![
                    AddrAttr::Id(id),
                    AddrAttr::Flags(flags.to_attr()),
                ])],
            },
            false,
        )
        .await
        .map(drop)
    }

    /// `ip mptcp endpoint flush`.
    pub async fn flush_endpoints(&mut self) -> io::Result<()> {
        self.request(
            PmMessage {
                cmd: CMD_FLUSH_ADDRS,
                attrs: vec![],
            },
            false,
        )
        .await
        .map(drop)
    }
}

fn endpoint_from_attrs(attrs: &[AddrAttr]) -> Option<Endpoint> {
    let mut ep = Endpoint {
        id: 0,
        addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        port: None,
        flags: EndpointFlags::default(),
        ifindex: None,
    };
    let mut have_addr = false;
    for a in attrs {
        match a {
            AddrAttr::Id(id) => ep.id = *id,
            AddrAttr::Addr4(a) => {
                ep.addr = IpAddr::V4(*a);
                have_addr = true;
            }
            AddrAttr::Addr6(a) => {
                ep.addr = IpAddr::V6(*a);
                have_addr = true;
            }
            AddrAttr::Port(p) if *p != 0 => ep.port = Some(*p),
            AddrAttr::IfIndex(i) if *i > 0 => ep.ifindex = Some(*i as u32),
            AddrAttr::Flags(flags) => {
                for f in flags {
                    match f {
                        AddrFlag::Signal => ep.flags.signal = true,
                        AddrFlag::Subflow => ep.flags.subflow = true,
                        AddrFlag::Backup => ep.flags.backup = true,
                        AddrFlag::Fullmesh => ep.flags.fullmesh = true,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    have_addr.then_some(ep)
}

/// Reads the path manager's limits with a short-lived connection.
pub async fn limits() -> io::Result<PmLimits> {
    PathManager::new()?.limits().await
}

#[cfg(test)]
mod tests;
