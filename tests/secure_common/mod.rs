//! Shared by the secure underlay tests: an AF_PACKET capture that counts
//! what crosses an underlay (WireGuard, VXLAN, ICMP in clear, other IPv4).
#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vxmesh::dataplane::netns::Netns;
use vxmesh::secure::transport::DEFAULT_PORT;

/// What a capture on an underlay device saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub wireguard: usize,
    pub vxlan: usize,
    pub icmp: usize,
    pub other_ip: usize,
}

/// An AF_PACKET capture of every frame on `dev` in `ns`, until stopped.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Seen>,
}

impl Capture {
    /// `dev: None` captures every device of the namespace.
    pub fn start(ns: &Netns, dev: Option<&'static str>) -> Capture {
        let fd = ns
            .run(move || -> anyhow::Result<OwnedFd> {
                let proto = (libc::ETH_P_ALL as u16).to_be();
                // SAFETY: plain socket(2); the descriptor is owned below.
                let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                // SAFETY: fd is a new descriptor nobody else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                let index = match dev {
                    None => 0,
                    Some(dev) => {
                        let name = std::ffi::CString::new(dev).unwrap();
                        // SAFETY: a NUL-terminated name.
                        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
                        assert!(index > 0, "no device {dev}");
                        index
                    }
                };
                // SAFETY: sockaddr_ll is plain data; zero is a valid start.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = index as i32;
                // SAFETY: binds fd to a valid sockaddr_ll of the right size.
                let rc = unsafe {
                    libc::bind(
                        fd.as_raw_fd(),
                        (&sll as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                // SAFETY: SO_RCVTIMEO takes a timeval.
                unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        (&tv as *const libc::timeval).cast(),
                        std::mem::size_of::<libc::timeval>() as u32,
                    )
                };
                Ok(fd)
            })
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Seen::default();
            let mut buf = vec![0u8; 65536];
            // Frames queue on the socket from its bind on; after the stop,
            // read on until the queue is empty (a recv times out), so a
            // late-starting thread still counts everything.
            loop {
                let stopping = flag.load(Ordering::Relaxed);
                // SAFETY: reads into buf, within its length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    classify(&buf[..n as usize], &mut seen);
                } else if stopping {
                    break;
                }
            }
            seen
        });
        Capture { stop, thread }
    }

    pub fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Count an Ethernet frame: IPv4 UDP to or from the WireGuard port, to
/// the VXLAN port, ICMP, or other IPv4.
fn classify(frame: &[u8], seen: &mut Seen) {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    match ip[9] {
        1 => seen.icmp += 1,
        17 if ip.len() >= ihl + 4 => {
            let sport = u16::from_be_bytes([ip[ihl], ip[ihl + 1]]);
            let dport = u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]);
            if dport == 4789 || sport == 4789 {
                seen.vxlan += 1;
            } else if dport == DEFAULT_PORT && sport == DEFAULT_PORT {
                seen.wireguard += 1;
            } else {
                seen.other_ip += 1;
            }
        }
        _ => seen.other_ip += 1,
    }
}
