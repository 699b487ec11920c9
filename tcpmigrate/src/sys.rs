//! The kernel's TCP repair interface (`TCP_REPAIR` and friends, Linux 3.5+; the window since
//! 4.8): the only `unsafe` code of the crate, each call a plain `setsockopt`, `getsockopt`,
//! `ioctl`, `recv`, `send`, `bind` or `connect` on a descriptor the caller owns, with buffers
//! sized by the types here.
#![allow(unsafe_code)]

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

// From include/uapi/linux/tcp.h and sockios.h (kernel ABI, stable).
pub const TCP_REPAIR: libc::c_int = 19;
pub const TCP_REPAIR_QUEUE: libc::c_int = 20;
pub const TCP_QUEUE_SEQ: libc::c_int = 21;
pub const TCP_REPAIR_OPTIONS: libc::c_int = 22;
pub const TCP_TIMESTAMP: libc::c_int = 24;
pub const TCP_REPAIR_WINDOW: libc::c_int = 29;
pub const TCP_REPAIR_ON: libc::c_int = 1;
pub const TCP_REPAIR_OFF: libc::c_int = 0;
pub const TCP_RECV_QUEUE: libc::c_int = 1;
pub const TCP_SEND_QUEUE: libc::c_int = 2;
pub const TCPOPT_MSS: u32 = 2;
pub const TCPOPT_WINDOW: u32 = 3;
pub const TCPOPT_SACK_PERM: u32 = 4;
pub const TCPOPT_TIMESTAMP: u32 = 8;
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
pub const TCPI_OPT_SACK: u8 = 2;
pub const TCPI_OPT_WSCALE: u8 = 4;
const SIOCINQ: libc::c_ulong = 0x541B;
const SIOCOUTQ: libc::c_ulong = 0x5411;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;
pub const TCP_ESTABLISHED: u8 = 1;

/// `struct tcp_repair_window`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct RepairWindow {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

/// `struct tcp_repair_opt`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct RepairOpt {
    pub code: u32,
    pub val: u32,
}

/// The first bytes of `struct tcp_info`: state, options and window scales.
#[derive(Debug, Clone, Copy)]
pub struct InfoHead {
    pub state: u8,
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn check_len(r: libc::ssize_t) -> io::Result<usize> {
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// Data the kernel reads or writes as plain bytes through `setsockopt`/`getsockopt`.
///
/// # Safety
/// Implemented only for integers and `repr(C)` structs of integers without padding, for which
/// every bit pattern is a valid value.
pub unsafe trait Plain: Copy + Default {}

// SAFETY: integers, and repr(C) structs of u32 fields (no padding), and a byte array.
unsafe impl Plain for libc::c_int {}
// SAFETY: as above.
unsafe impl Plain for u32 {}
// SAFETY: as above.
unsafe impl Plain for RepairWindow {}
// SAFETY: as above.
unsafe impl Plain for RepairOpt {}
// SAFETY: as above.
unsafe impl Plain for [u8; 8] {}

/// `setsockopt(fd, level, opt, values)`, the values' bytes as the option.
fn set<T: Plain>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    values: &[T],
) -> io::Result<()> {
    // SAFETY: `values` is readable for its size in bytes, which is the length given.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            values.as_ptr().cast(),
            std::mem::size_of_val(values) as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `getsockopt(fd, level, opt)` into a `T` (the kernel writes at most its size).
fn get<T: Plain>(fd: BorrowedFd<'_>, level: libc::c_int, opt: libc::c_int) -> io::Result<T> {
    let mut val = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `val` and `len` live for the call, `val` is writable for `len` bytes, and any
    // bytes the kernel writes make a valid `T` (`Plain`).
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&raw mut val).cast(),
            &raw mut len,
        )
    })?;
    Ok(val)
}

pub fn set_int(fd: BorrowedFd<'_>, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    set(fd, libc::IPPROTO_TCP, opt, &[val])
}

pub fn set_sol_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    set(fd, level, opt, &[val])
}

pub fn get_u32(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<u32> {
    get(fd, libc::IPPROTO_TCP, opt)
}

pub fn set_u32(fd: BorrowedFd<'_>, opt: libc::c_int, val: u32) -> io::Result<()> {
    set(fd, libc::IPPROTO_TCP, opt, &[val])
}

pub fn get_window(fd: BorrowedFd<'_>) -> io::Result<RepairWindow> {
    get(fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW)
}

pub fn set_window(fd: BorrowedFd<'_>, w: &RepairWindow) -> io::Result<()> {
    set(
        fd,
        libc::IPPROTO_TCP,
        TCP_REPAIR_WINDOW,
        std::slice::from_ref(w),
    )
}

pub fn set_options(fd: BorrowedFd<'_>, opts: &[RepairOpt]) -> io::Result<()> {
    set(fd, libc::IPPROTO_TCP, TCP_REPAIR_OPTIONS, opts)
}

pub fn info_head(fd: BorrowedFd<'_>) -> io::Result<InfoHead> {
    // struct tcp_info starts: u8 state, ca_state, retransmits, probes, backoff, options,
    // snd_wscale:4 | rcv_wscale:4, ...; 8 bytes are enough, the kernel writes at most that.
    let head: [u8; 8] = get(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    Ok(InfoHead {
        state: head[0],
        options: head[5],
        snd_wscale: head[6] & 0x0f,
        rcv_wscale: head[6] >> 4,
    })
}

fn ioctl_int(fd: BorrowedFd<'_>, req: libc::c_ulong) -> io::Result<usize> {
    let mut val: libc::c_int = 0;
    // SAFETY: these requests write one int.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as _, &raw mut val) })?;
    usize::try_from(val).map_err(|_| io::Error::other("negative queue length"))
}

/// Bytes in the receive queue not yet read by the application.
pub fn inq(fd: BorrowedFd<'_>) -> io::Result<usize> {
    ioctl_int(fd, SIOCINQ)
}

/// Bytes in the send queue: sent and not acknowledged, plus not sent.
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<usize> {
    ioctl_int(fd, SIOCOUTQ)
}

/// Bytes in the send queue not sent yet.
pub fn outq_not_sent(fd: BorrowedFd<'_>) -> io::Result<usize> {
    ioctl_int(fd, SIOCOUTQNSD)
}

/// Copies the queue selected with `TCP_REPAIR_QUEUE` (repair mode: the send queue too).
pub fn peek_queue(fd: BorrowedFd<'_>, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Ok(buf);
    }
    // SAFETY: `buf` has `len` writable bytes.
    let n = check_len(unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            len,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// Writes `data` (into the queue selected in repair mode; the ordinary send queue otherwise).
pub fn send_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: `data` is readable for its length.
        let n = check_len(unsafe {
            libc::send(
                fd.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL,
            )
        })?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "queue took nothing",
            ));
        }
        data = &data[n..];
    }
    Ok(())
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data for which all zeroes is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

pub fn bind(fd: BorrowedFd<'_>, addr: SocketAddr) -> io::Result<()> {
    let (sa, len) = sockaddr(addr);
    // SAFETY: `sa` holds a valid address of `len` bytes.
    check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), len) }).map(drop)
}

pub fn connect(fd: BorrowedFd<'_>, addr: SocketAddr) -> io::Result<()> {
    let (sa, len) = sockaddr(addr);
    // SAFETY: `sa` holds a valid address of `len` bytes.
    check(unsafe { libc::connect(fd.as_raw_fd(), (&raw const sa).cast(), len) }).map(drop)
}

/// A new blocking TCP socket for `v6` or IPv4, close-on-exec.
pub fn tcp_socket(v6: bool) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2).
    let fd = check(unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}
