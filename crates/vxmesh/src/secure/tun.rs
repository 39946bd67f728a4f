//! The TUN device of the secure underlay: opened (created if missing) in
//! the calling thread's namespace, optionally persistent so that it and its
//! address and routes outlive the agent process.

use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use super::gso::VNET_HDR_LEN;

/// `_IOW('T', 202, int)`
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 203, int)`
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Written packets go through a NAPI context (so GRO can merge them).
const IFF_NAPI: libc::c_short = 0x0010;
/// Every packet read or written starts with a virtio-net header.
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `_IOW('T', 208, unsigned int)`
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `_IOW('T', 216, int)`
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// The offloads asked for: partial checksums, and TCP bursts inside UDP
/// tunnels (VXLAN) with or without an outer checksum (kernel 6.17+).
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_UDP_TUNNEL_GSO: libc::c_uint = 0x080;
const TUN_F_UDP_TUNNEL_GSO_CSUM: libc::c_uint = 0x100;

/// A failure opening or using the TUN device.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("cannot open /dev/net/tun for {name}: {source} (is the tun module loaded?)")]
    Open {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot attach to TUN device {name}: {source}")]
    Attach {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot make TUN device {name} persistent: {source}")]
    Persist {
        name: String,
        source: std::io::Error,
    },
    #[error("TUN device name {0:?} is longer than 15 bytes")]
    Name(String),
}

/// An open TUN device (layer 3, no packet-information header); with
/// offloads, every packet read or written starts with a virtio-net header
/// of [`VNET_HDR_LEN`] bytes.
#[derive(Debug)]
pub struct Tun {
    file: File,
    name: String,
    offload: bool,
}

/// The header written before every packet on a device with offloads: no
/// segmentation, no checksum left to do (the receiving stack checks it).
const PLAIN_VNET_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tun {
    /// Create `name` or attach to it if it exists; with `persist` it stays
    /// when the last descriptor closes (deleted only by `down`).
    pub fn open(name: &str, persist: bool) -> Result<Tun, TunError> {
        Tun::open_flags(name, persist, false)
    }

    /// [`Self::open`] with segmentation offload: reads hand over whole
    /// VXLAN/TCP bursts (cut by [`super::gso`]). Where the kernel lacks
    /// the tunnel offload, the device is opened without any.
    pub fn open_offloaded(name: &str, persist: bool) -> Result<Tun, TunError> {
        match Tun::open_flags(name, persist, true) {
            Ok(t) => match t.set_offload() {
                Ok(()) => Ok(t),
                Err(e) => {
                    tracing::info!(dev = name, "no segmentation offload on the TUN device: {e}");
                    drop(t);
                    Tun::open_flags(name, persist, false)
                }
            },
            Err(e) => Err(e),
        }
    }

    fn set_offload(&self) -> std::io::Result<()> {
        let fd = self.file.as_raw_fd();
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ as _, &size) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM;
        // SAFETY: TUNSETOFFLOAD takes an integer argument.
        if unsafe { libc::ioctl(fd, TUNSETOFFLOAD as _, flags as libc::c_ulong) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn open_flags(name: &str, persist: bool, offload: bool) -> Result<Tun, TunError> {
        if name.len() >= libc::IFNAMSIZ {
            return Err(TunError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|source| TunError::Open {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI | IFF_NAPI | if offload { IFF_VNET_HDR } else { 0 },
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which
        // `IfReq` lays out (40 bytes), on a descriptor we own.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if rc < 0 {
            return Err(TunError::Attach {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        if persist {
            // SAFETY: TUNSETPERSIST takes an integer argument.
            let rc =
                unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) };
            if rc < 0 {
                return Err(TunError::Persist {
                    name: name.to_string(),
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(Tun {
            file,
            name: name.to_string(),
            offload,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Packets read and written carry a virtio-net header.
    pub fn offloaded(&self) -> bool {
        self.offload
    }

    /// A second handle on the same queue (one thread reads, another writes).
    pub fn try_clone(&self) -> std::io::Result<Tun> {
        Ok(Tun {
            file: self.file.try_clone()?,
            name: self.name.clone(),
            offload: self.offload,
        })
    }

    /// Make reads return at once when no packet waits (for [`Self::try_read`]);
    /// it holds for every handle on the device's queue.
    pub fn set_nonblocking(&self) -> std::io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Read one packet, waiting at most `timeout`; `Ok(None)` on timeout.
    pub fn read_timeout(
        &mut self,
        buf: &mut [u8],
        timeout: Duration,
    ) -> std::io::Result<Option<usize>> {
        if !wait_readable(self.file.as_raw_fd(), timeout)? {
            return Ok(None);
        }
        self.try_read(buf)
    }

    /// Read one packet if one waits (after [`Self::set_nonblocking`]);
    /// `Ok(None)` if none does.
    pub fn try_read(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Write one packet (after a plain header on a device with offloads).
    pub fn write_packet(&mut self, packet: &[u8]) -> std::io::Result<()> {
        if self.offload {
            return self.write_parts(&PLAIN_VNET_HDR, packet, &[]);
        }
        self.file.write(packet).map(|_| ())
    }

    /// Write one packet given as its virtio-net header, then `head` and
    /// `body` (a device with offloads only: a segmentation burst, see
    /// [`super::gro`]).
    pub fn write_parts(
        &mut self,
        vnet: &[u8; VNET_HDR_LEN],
        head: &[u8],
        body: &[u8],
    ) -> std::io::Result<()> {
        let iov = [IoSlice::new(vnet), IoSlice::new(head), IoSlice::new(body)];
        self.file.write_vectored(&iov).map(|_| ())
    }
}

/// Run the device's NAPI context in a kernel thread of its own
/// (`/sys/class/net/NAME/threaded`), in the calling thread's network
/// namespace. Written packets then queue to that thread, which merges them
/// with GRO (VXLAN and the TCP inside it) before the stack sees them,
/// instead of each write carrying one packet through the whole stack.
///
/// The namespace's sysfs is mounted in a private mount namespace of a
/// short-lived thread, so the caller's view of `/sys` is untouched.
pub fn set_threaded_napi(name: &str) -> std::io::Result<()> {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    let name = name.to_string();
    std::thread::Builder::new()
        .name("vxm-napi".into())
        .spawn(move || -> std::io::Result<()> {
            unshare(CloneFlags::CLONE_NEWNS)?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            mount(
                Some("sysfs"),
                "/sys",
                Some("sysfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            )?;
            std::fs::write(format!("/sys/class/net/{name}/threaded"), "1")
        })?
        .join()
        .map_err(|_| std::io::Error::other("the thread setting threaded NAPI panicked"))?
}

fn wait_readable(fd: RawFd, timeout: Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    match rc {
        0 => Ok(false),
        n if n > 0 => Ok(true),
        _ => {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}
