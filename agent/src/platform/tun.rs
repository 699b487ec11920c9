//! The TUN device, opened with offload so that the kernel hands over TCP super-packets (split
//! by tun-rs into MTU-sized packets in one read) and accepts coalesced ones on write.
//!
//! The interface's MTU may change under the agent (`ip link set mtu`, as wg-quick does after
//! starting it): [`Tun::refresh_mtu`] reads it again, and the packet loops size their buffers
//! from [`Tun::mtu`].

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use tun_rs::{AsyncDevice, DeviceBuilder, GROTable};

use crate::dataplane::TunBatch;

pub use tun_rs::{IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// Headroom before every packet written, for the offload header.
pub const HEADROOM: usize = VIRTIO_NET_HDR_LEN;

/// Why the TUN device could not be created, in the user's terms.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// `/dev/net/tun` is missing.
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded? in a container, pass --device /dev/net/tun)")]
    NoTunDevice(io::Error),
    /// Not allowed to create interfaces.
    #[error("not allowed to create interface {0}: run as root or with CAP_NET_ADMIN")]
    NoPrivilege(String),
    /// Anything else.
    #[error("cannot create TUN interface {name}: {source}")]
    Other {
        /// The interface name.
        name: String,
        /// The system's error.
        source: io::Error,
    },
}

/// An open TUN device.
pub struct Tun {
    dev: AsyncDevice,
    offload: bool,
    /// The interface's MTU as last read.
    mtu: AtomicU16,
}

impl Tun {
    /// Creates interface `name` with offload when the kernel has it. The caller checks first
    /// that no interface of that name exists.
    ///
    /// # Errors
    /// [`TunError`] naming the cause.
    pub fn create(name: &str, mtu: u16) -> Result<Self, TunError> {
        if let Err(e) = std::fs::metadata("/dev/net/tun") {
            return Err(TunError::NoTunDevice(e));
        }
        let build = |offload: bool| {
            DeviceBuilder::new()
                .name(name)
                .mtu(mtu)
                .offload(offload)
                .build_async()
        };
        let dev = match build(true) {
            Ok(d) => d,
            Err(e)
                if e.kind() == io::ErrorKind::PermissionDenied
                    || e.raw_os_error() == Some(libc::EPERM) =>
            {
                return Err(TunError::NoPrivilege(name.to_string()))
            }
            // Kernels without offload on TUN: fall back to one packet per read.
            Err(_) => build(false).map_err(|source| TunError::Other {
                name: name.to_string(),
                source,
            })?,
        };
        let offload = dev.tcp_gso();
        Ok(Tun {
            dev,
            offload,
            mtu: AtomicU16::new(mtu),
        })
    }

    /// The interface's MTU as last read (at creation, then by [`refresh_mtu`](Self::refresh_mtu)).
    pub fn mtu(&self) -> u16 {
        self.mtu.load(Ordering::Relaxed)
    }

    /// Reads the interface's MTU from the kernel and keeps it for [`mtu`](Self::mtu); returns
    /// it with the one kept before.
    ///
    /// # Errors
    /// The operating system's (`ENODEV` once the interface is deleted).
    pub fn refresh_mtu(&self) -> io::Result<(u16, u16)> {
        let now = self.dev.mtu()?;
        Ok((self.mtu.swap(now, Ordering::Relaxed), now))
    }

    /// Whether TCP segmentation offload is on.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Reads one batch: up to `bufs.len()` packets (one super-packet split up, with offload).
    pub async fn recv(
        &self,
        original: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> io::Result<usize> {
        self.dev.recv_multiple(original, bufs, sizes, 0).await
    }

    /// Writes the batch, coalescing TCP and UDP flows where it can.
    pub async fn send(&self, gro: &mut GROTable, batch: &mut TunBatch) -> io::Result<usize> {
        let headroom = batch.headroom();
        self.dev
            .send_multiple(gro, batch.buffers_mut(), headroom)
            .await
    }
}
