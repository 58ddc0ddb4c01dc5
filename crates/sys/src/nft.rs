//! A small nftables client over netlink (NETLINK_NETFILTER): tables, base chains and rules
//! built from raw expressions, sent as one atomic batch.
//!
//! Written here rather than taken from a crate: `rustables` (the maintained pure-Rust option)
//! has no `exthdr`, `byteorder`, `tproxy`, `socket` or `redir` expressions and cannot set the
//! checksum fields of a payload write, which are exactly what braid's rules need; running the
//! `nft` binary would make a daemon depend on a tool and on parsing its text. The message
//! format is the kernel's stable uapi (`linux/netfilter/nf_tables.h`); `nft --debug=netlink`
//! prints the expression lists these rules are checked against.

use std::io;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;

/// `nfproto` families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Inet = 1,
    Ipv4 = 2,
    Ipv6 = 10,
}

/// Netfilter hooks of the inet families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting = 0,
    Input = 1,
    Forward = 2,
    Output = 3,
    Postrouting = 4,
}

/// Standard chain priorities.
pub mod priority {
    pub const MANGLE: i32 = -150;
    pub const DSTNAT: i32 = -100;
    pub const FILTER: i32 = 0;
}

/// Data registers (the 16-byte legacy numbering, as `nft` prints them).
pub const REG_VERDICT: u32 = 0;
pub const REG_1: u32 = 1;
pub const REG_2: u32 = 2;

/// Payload bases.
pub mod base {
    pub const NETWORK: u32 = 1;
    pub const TRANSPORT: u32 = 2;
}

/// Verdicts.
pub const NF_ACCEPT: u32 = 1;
/// `return`: leave this chain; in a base chain, the chain's policy (accept) applies.
pub const NFT_RETURN: u32 = -5i32 as u32;
/// `jump CHAIN`: evaluate a regular chain, then go on after this rule.
const NFT_JUMP: u32 = -3i32 as u32;

/// `fib` lookups.
pub mod fib {
    /// NFT_FIB_RESULT_ADDRTYPE: the route type (RTN_*) of the looked-up address.
    pub const RESULT_ADDRTYPE: u32 = 3;
    /// NFTA_FIB_F_DADDR: look up the destination address.
    pub const F_DADDR: u32 = 1 << 1;
    /// RTN_LOCAL: the address is one of this host's.
    pub const RTN_LOCAL: u32 = 2;
}

/// Common matches, as expression sequences to concatenate into a rule. All use `REG_1`.
pub mod matches {
    use super::{Expr, Family, REG_1, base, meta};

    /// `reg1 == data`.
    pub fn eq(data: Vec<u8>) -> Expr {
        Expr::CmpEq { sreg: REG_1, data }
    }

    /// `meta nfproto FAMILY` (in an inet table, before address matches or tproxy).
    pub fn nfproto(family: Family) -> Vec<Expr> {
        vec![
            Expr::Meta {
                key: meta::NFPROTO,
                dreg: REG_1,
            },
            eq(vec![family as u8]),
        ]
    }

    /// `meta l4proto tcp`.
    pub fn tcp() -> Vec<Expr> {
        vec![
            Expr::Meta {
                key: meta::L4PROTO,
                dreg: REG_1,
            },
            eq(vec![libc::IPPROTO_TCP as u8]),
        ]
    }

    /// `tcp dport PORT` (after [`tcp`]).
    pub fn tcp_dport(port: u16) -> Vec<Expr> {
        vec![
            Expr::Payload {
                base: base::TRANSPORT,
                offset: 2,
                len: 2,
                dreg: REG_1,
            },
            eq(port.to_be_bytes().to_vec()),
        ]
    }

    /// `tcp flags & (syn|ack) == syn`: a connection's first packet.
    pub fn syn_only() -> Vec<Expr> {
        syn_ack_bits(eq(vec![0x02]))
    }

    /// `tcp flags & (syn|ack) != syn`: any packet but a connection's first.
    pub fn not_syn_only() -> Vec<Expr> {
        syn_ack_bits(Expr::CmpNeq {
            sreg: REG_1,
            data: vec![0x02],
        })
    }

    /// Loads the TCP flags' SYN and ACK bits and compares them with `cmp`.
    fn syn_ack_bits(cmp: Expr) -> Vec<Expr> {
        vec![
            Expr::Payload {
                base: base::TRANSPORT,
                offset: 13,
                len: 1,
                dreg: REG_1,
            },
            Expr::Bitwise {
                reg: REG_1,
                mask: vec![0x12],
                xor: vec![0],
            },
            cmp,
        ]
    }

    /// `meta mark set MARK`.
    pub fn set_mark(mark: u32) -> Vec<Expr> {
        vec![
            Expr::Immediate {
                dreg: REG_1,
                data: mark.to_ne_bytes().to_vec(),
            },
            Expr::MetaSet {
                key: meta::MARK,
                sreg: REG_1,
            },
        ]
    }
}

/// One nftables expression, as the kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `meta load KEY => reg`.
    Meta { key: u32, dreg: u32 },
    /// `meta set KEY reg` (e.g. the packet mark).
    MetaSet { key: u32, sreg: u32 },
    /// `payload load LEN @ BASE + OFFSET => reg`.
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// `payload write reg => LEN @ BASE + OFFSET`, fixing the checksum at `csum_offset`.
    PayloadWrite {
        base: u32,
        offset: u32,
        len: u32,
        sreg: u32,
        csum_offset: Option<u32>,
    },
    /// `cmp eq reg DATA`.
    CmpEq { sreg: u32, data: Vec<u8> },
    /// `bitwise reg = (reg & MASK) ^ XOR`.
    Bitwise {
        reg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// `bitwise reg = reg >> BITS` over `len` bytes (host order, after `ntoh`).
    ShiftRight { reg: u32, len: u32, bits: u32 },
    /// `byteorder reg = ntoh|hton(reg, size, len)`.
    ByteOrder {
        reg: u32,
        to_host: bool,
        len: u32,
        size: u32,
    },
    /// `exthdr load tcpopt LEN @ KIND + OFFSET => reg`.
    TcpOption {
        kind: u8,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// `immediate reg DATA`.
    Immediate { dreg: u32, data: Vec<u8> },
    /// A verdict (`accept`, ...).
    Verdict(u32),
    /// `jump CHAIN` to a regular chain of the same table (see [`Batch::add_regular_chain`]).
    Jump(String),
    /// `socket load transparent => reg`.
    SocketTransparent { dreg: u32 },
    /// `tproxy FAMILY to :port-in-reg`.
    Tproxy { family: Family, port_reg: u32 },
    /// `redir to :port-in-reg`.
    Redirect { port_reg: u32 },
    /// `reg != data`.
    CmpNeq { sreg: u32, data: Vec<u8> },
    /// `fib FLAGS RESULT => reg`, e.g. `fib daddr type` (the result is a host-order u32).
    Fib { dreg: u32, result: u32, flags: u32 },
}

/// `meta` keys used by braid.
pub mod meta {
    pub const MARK: u32 = 3;
    pub const L4PROTO: u32 = 16;
    pub const NFPROTO: u32 = 15;
}

/// A netlink attribute writer: length, type, value, padding to 4 bytes.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.0.resize(self.0.len().div_ceil(4) * 4, 0);
        self
    }
    /// nftables sends every u32 attribute in network byte order.
    fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_be_bytes())
    }
    fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.put(kind, &v)
    }
    fn nested(&mut self, kind: u16, inner: Attrs) -> &mut Self {
        self.put(kind | NLA_F_NESTED, &inner.0)
    }
    /// An `immediate` loading a verdict (with the chain a jump goes to) into the verdict
    /// register.
    fn verdict(&mut self, code: u32, chain: Option<&str>) -> &mut Self {
        let mut v = Attrs::default();
        v.u32(1, code); // NFTA_VERDICT_CODE
        if let Some(chain) = chain {
            v.str(2, chain); // NFTA_VERDICT_CHAIN
        }
        let mut d = Attrs::default();
        d.nested(2, v); // NFTA_DATA_VERDICT
        self.u32(1, REG_VERDICT).nested(2, d)
    }
    /// `nft_data` holding a plain value.
    fn data(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let mut d = Attrs::default();
        d.put(1, value); // NFTA_DATA_VALUE
        self.nested(kind, d)
    }
}

impl Expr {
    fn encode(&self) -> Attrs {
        let mut a = Attrs::default();
        let name = match self {
            Expr::Meta { key, dreg } => {
                a.u32(2, *key).u32(1, *dreg);
                "meta"
            }
            Expr::MetaSet { key, sreg } => {
                a.u32(2, *key).u32(3, *sreg);
                "meta"
            }
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                a.u32(1, *dreg).u32(2, *base).u32(3, *offset).u32(4, *len);
                "payload"
            }
            Expr::PayloadWrite {
                base,
                offset,
                len,
                sreg,
                csum_offset,
            } => {
                a.u32(5, *sreg).u32(2, *base).u32(3, *offset).u32(4, *len);
                if let Some(off) = csum_offset {
                    // NFT_PAYLOAD_CSUM_INET over the transport checksum.
                    a.u32(6, 1).u32(7, *off).u32(8, 0);
                }
                "payload"
            }
            Expr::CmpEq { sreg, data } => {
                a.u32(1, *sreg).u32(2, 0).data(3, data);
                "cmp"
            }
            Expr::Bitwise { reg, mask, xor } => {
                a.u32(1, *reg).u32(2, *reg).u32(3, mask.len() as u32);
                a.data(4, mask).data(5, xor);
                "bitwise"
            }
            Expr::ShiftRight { reg, len, bits } => {
                // NFT_BITWISE_RSHIFT; the shift amount is a host-order u32 in an nft_data.
                a.u32(1, *reg).u32(2, *reg).u32(3, *len).u32(6, 2);
                a.data(7, &bits.to_ne_bytes());
                "bitwise"
            }
            Expr::ByteOrder {
                reg,
                to_host,
                len,
                size,
            } => {
                a.u32(1, *reg)
                    .u32(2, *reg)
                    .u32(3, if *to_host { 0 } else { 1 });
                a.u32(4, *len).u32(5, *size);
                "byteorder"
            }
            Expr::TcpOption {
                kind,
                offset,
                len,
                dreg,
            } => {
                // NFT_EXTHDR_OP_TCPOPT = 1.
                a.u32(1, *dreg)
                    .put(2, &[*kind])
                    .u32(3, *offset)
                    .u32(4, *len)
                    .u32(6, 1);
                "exthdr"
            }
            Expr::Immediate { dreg, data } => {
                a.u32(1, *dreg).data(2, data);
                "immediate"
            }
            Expr::Verdict(code) => {
                a.verdict(*code, None);
                "immediate"
            }
            Expr::Jump(chain) => {
                a.verdict(NFT_JUMP, Some(chain));
                "immediate"
            }
            Expr::SocketTransparent { dreg } => {
                a.u32(1, 0).u32(2, *dreg); // NFT_SOCKET_TRANSPARENT
                "socket"
            }
            Expr::Tproxy { family, port_reg } => {
                a.u32(1, *family as u32).u32(3, *port_reg);
                "tproxy"
            }
            Expr::Redirect { port_reg } => {
                a.u32(1, *port_reg).u32(2, *port_reg);
                "redir"
            }
            Expr::CmpNeq { sreg, data } => {
                a.u32(1, *sreg).u32(2, 1).data(3, data); // NFT_CMP_NEQ
                "cmp"
            }
            Expr::Fib {
                dreg,
                result,
                flags,
            } => {
                a.u32(1, *dreg).u32(2, *result).u32(3, *flags);
                "fib"
            }
        };
        let mut e = Attrs::default();
        e.str(1, name).nested(2, a); // NFTA_EXPR_NAME, NFTA_EXPR_DATA
        e
    }
}

/// A base chain: attached to a hook at a priority.
#[derive(Debug, Clone)]
pub struct BaseChain {
    pub name: String,
    /// "filter", "nat" or "route".
    pub kind: &'static str,
    pub hook: Hook,
    pub priority: i32,
}

/// One transaction: every message applies, or none does.
#[derive(Debug)]
pub struct Batch {
    family: Family,
    msgs: Vec<(u16, u16, Vec<u8>)>,
}

impl Batch {
    pub fn new(family: Family) -> Batch {
        Batch {
            family,
            msgs: Vec::new(),
        }
    }

    pub fn add_table(&mut self, table: &str) -> &mut Self {
        let mut a = Attrs::default();
        a.str(1, table).u32(2, 0);
        self.msgs.push((NFT_MSG_NEWTABLE, NLM_F_CREATE, a.0));
        self
    }

    pub fn delete_table(&mut self, table: &str) -> &mut Self {
        let mut a = Attrs::default();
        a.str(1, table);
        self.msgs.push((NFT_MSG_DELTABLE, 0, a.0));
        self
    }

    pub fn add_chain(&mut self, table: &str, chain: &BaseChain) -> &mut Self {
        let mut hook = Attrs::default();
        hook.u32(1, chain.hook as u32).u32(2, chain.priority as u32);
        let mut a = Attrs::default();
        a.str(1, table).str(3, &chain.name).nested(4, hook);
        a.u32(5, NF_ACCEPT).str(7, chain.kind);
        self.msgs.push((NFT_MSG_NEWCHAIN, NLM_F_CREATE, a.0));
        self
    }

    /// A regular chain: attached to no hook, entered only by a `jump` ([`Expr::Jump`]). Rules
    /// that only some packets need go there, behind one cheap match in the base chain, so
    /// that every other packet costs one rule instead of all of them.
    pub fn add_regular_chain(&mut self, table: &str, chain: &str) -> &mut Self {
        let mut a = Attrs::default();
        a.str(1, table).str(3, chain);
        self.msgs.push((NFT_MSG_NEWCHAIN, NLM_F_CREATE, a.0));
        self
    }

    pub fn add_rule(&mut self, table: &str, chain: &str, exprs: &[Expr]) -> &mut Self {
        let mut list = Attrs::default();
        for e in exprs {
            list.nested(1, e.encode()); // NFTA_LIST_ELEM
        }
        let mut a = Attrs::default();
        a.str(1, table).str(2, chain).nested(4, list);
        self.msgs
            .push((NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, a.0));
        self
    }

    /// Sends the batch and waits for the kernel's verdict on every message.
    pub fn commit(&self) -> io::Result<()> {
        let sock = open()?;
        let mut buf = Vec::new();
        let mut seq = 1u32;
        push_msg(
            &mut buf,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        for (msg, flags, attrs) in &self.msgs {
            seq += 1;
            let ty = (NFNL_SUBSYS_NFTABLES << 8) | msg;
            push_msg(
                &mut buf,
                ty,
                NLM_F_REQUEST | NLM_F_ACK | flags,
                seq,
                self.family as u8,
                0,
                attrs,
            );
        }
        seq += 1;
        push_msg(
            &mut buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        sock.send(&buf, 0)?;
        wait_acks(&sock, self.msgs.len())
    }
}

/// Whether a table of that name exists in this network namespace.
pub fn table_exists(family: Family, table: &str) -> io::Result<bool> {
    let sock = open()?;
    let mut a = Attrs::default();
    a.str(1, table);
    let mut buf = Vec::new();
    let ty = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE;
    push_msg(
        &mut buf,
        ty,
        NLM_F_REQUEST | NLM_F_ACK,
        1,
        family as u8,
        0,
        &a.0,
    );
    sock.send(&buf, 0)?;
    match wait_acks(&sock, 1) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes a table if it exists; `Ok(true)` if there was one.
pub fn delete_table_if_exists(family: Family, table: &str) -> io::Result<bool> {
    match Batch::new(family).delete_table(table).commit() {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

fn open() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    Ok(sock)
}

fn push_msg(
    buf: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) {
    let len = 16 + 4 + attrs.len();
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0, resource id (big-endian).
    buf.push(family);
    buf.push(0);
    buf.extend_from_slice(&res_id.to_be_bytes());
    buf.extend_from_slice(attrs);
}

/// Reads netlink replies until `expected` acknowledgements arrived or one reports an error.
fn wait_acks(sock: &Socket, expected: usize) -> io::Result<()> {
    let mut acks = 0;
    let mut buf = vec![0u8; 65536];
    while acks < expected {
        let n = sock.recv(&mut &mut buf[..], 0)?;
        let mut off = 0;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
            let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            if len < 16 || off + len > n {
                return Err(io::Error::other("truncated netlink reply"));
            }
            match ty {
                NLMSG_ERROR => {
                    let code =
                        i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap_or_default());
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    acks += 1;
                }
                NLMSG_DONE => acks += 1,
                // A GET answers with the object, then the ACK.
                _ => {}
            }
            off += len.div_ceil(4) * 4;
        }
    }
    Ok(())
}
