//! Raw frame I/O that std, socket2 and nix do not wrap safely: a TAP device that hands over
//! whole offloaded frames (virtio-net header, GSO), a send-only packet socket bound to one
//! interface that takes such frames back, and real-time scheduling for the thread that moves
//! them. The test lab's user-space delay line is built on these; the daemons do not use them.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;

use socket2::{Domain, Socket, Type};

use crate::sockopt::SO_SNDBUFFORCE;

/// Length of the `struct virtio_net_hdr` in front of every frame, on both sides: the TAP's
/// default header size and what `PACKET_VNET_HDR` expects.
pub const VNET_HDR_LEN: usize = 10;

/// `PACKET_VNET_HDR` from `<linux/if_packet.h>` (not exported by the libc crate).
const PACKET_VNET_HDR: libc::c_int = 15;

/// Offloads the TAP accepts: checksum offload and TCP segmentation, so the 64 KiB GSO
/// packets a veth carries cross user space whole instead of being cut to MTU size first.
const TAP_OFFLOADS: libc::c_uint =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
/// UDP segmentation too, where the kernel knows it (6.2 and later).
const TAP_OFFLOADS_USO: libc::c_uint = TAP_OFFLOADS | libc::TUN_F_USO4 | libc::TUN_F_USO6;

/// `struct ifreq` as TUNSETIFF reads it: the name, the flags, and the rest of the 40-byte union.
#[repr(C)]
struct TunIfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates TAP device `name` in the calling thread's network namespace and returns its
/// non-blocking file. The device lives as long as the file stays open: closing it (or the
/// process dying) removes the device.
pub fn open_tap(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad TAP name {name:?}"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = TunIfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` has its layout and size
    // (16-byte name, flags, padding to 40 bytes) and outlives the call; the fd is open.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    set_offload(&file, TAP_OFFLOADS_USO).or_else(|_| set_offload(&file, TAP_OFFLOADS))?;
    Ok(file)
}

fn set_offload(tap: &File, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    let r = unsafe {
        libc::ioctl(
            tap.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A raw packet socket in the calling thread's namespace that sends frames, each preceded by a
/// virtio-net header, out of interface `ifindex` through its qdisc (so tbf shaping applies),
/// with `SO_MARK` = `mark` and a send buffer of `sndbuf` bytes. Protocol 0: it receives
/// nothing, so the kernel never copies traffic to it. Non-blocking.
pub fn packet_sender(ifindex: u32, mark: u32, sndbuf: usize) -> io::Result<Socket> {
    let s = Socket::new(Domain::PACKET, Type::RAW, None)?;
    s.set_mark(mark)?;
    s.set_nonblocking(true)?;
    setsockopt_int(&s, libc::SOL_PACKET, PACKET_VNET_HDR, 1)?;
    let sndbuf = libc::c_int::try_from(sndbuf).unwrap_or(libc::c_int::MAX);
    setsockopt_int(&s, libc::SOL_SOCKET, SO_SNDBUFFORCE, sndbuf)?;
    let ifindex = libc::c_int::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex out of range"))?;
    let addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as libc::c_ushort,
        sll_protocol: 0,
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    // SAFETY: `addr` is a complete `sockaddr_ll` that lives across the call, and the length
    // passed is its size; the fd is an open AF_PACKET socket.
    let r = unsafe {
        libc::bind(
            s.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s)
}

fn setsockopt_int(
    s: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is one `c_int` that lives across the call, and the length
    // passed is its size; the fd is an open socket.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&raw const value).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Moves the calling thread to `SCHED_FIFO` at the lowest real-time priority, so that it runs
/// as soon as it wakes even when the test's own threads keep every core busy. The kernel's
/// real-time throttling (95% of each second by default) still bounds what it can take.
pub fn set_realtime() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: `param` is a valid `sched_param` that lives across the call; pid 0 is the
    // calling thread.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
