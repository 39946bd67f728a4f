//! Batched WireGuard datagrams on the UDP socket: encrypted packets are
//! written one after another into one buffer and sent as runs with UDP
//! segmentation offload (one `sendmsg` and one trip through the stack per
//! run of equal-sized datagrams to one peer); received datagrams come in
//! coalesced by UDP GRO and are split here. Either offload falls back to
//! one datagram per system call where the kernel refuses it.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, sendmsg, setsockopt,
    sockopt,
};

/// Most datagrams in one send run (the kernel takes up to 64 segments
/// everywhere, 128 on newer kernels).
pub const MAX_SEGMENTS: usize = 64;

/// Most bytes of one send run (one UDP payload with segmentation).
const MAX_RUN_BYTES: usize = 65_000;

/// One datagram in the send buffer: its peer and where it lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub to: SocketAddrV4,
    pub start: usize,
    pub len: usize,
}

/// Datagrams sent with one system call: `count` datagrams of `segment`
/// bytes (the last one may be shorter) lying at `start..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub to: SocketAddrV4,
    pub start: usize,
    pub end: usize,
    pub segment: usize,
    pub count: usize,
}

/// Group datagrams (in buffer order) into runs the kernel can segment:
/// adjacent in the buffer, to one peer, all of the first one's size but
/// the last, which may be shorter; at most [`MAX_SEGMENTS`] and
/// `MAX_RUN_BYTES` per run.
pub fn runs(datagrams: &[Datagram]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for d in datagrams {
        if let Some(r) = out.last_mut() {
            let joins = r.to == d.to
                && r.end == d.start
                && r.end - r.start == r.segment * r.count
                && d.len <= r.segment
                && r.count < MAX_SEGMENTS
                && r.end + d.len - r.start <= MAX_RUN_BYTES;
            if joins {
                r.end += d.len;
                r.count += 1;
                continue;
            }
        }
        out.push(Run {
            to: d.to,
            start: d.start,
            end: d.start + d.len,
            segment: d.len,
            count: 1,
        });
    }
    out
}

/// The WireGuard socket with its offloads.
pub struct Socket {
    socket: UdpSocket,
    /// Segmentation offload still believed to work.
    gso: AtomicBool,
}

impl Socket {
    /// Wrap `socket`, asking for coalesced receives (UDP GRO) where the
    /// kernel has them.
    pub fn new(socket: UdpSocket) -> Socket {
        if let Err(e) = setsockopt(&socket, sockopt::UdpGroSegment, &true) {
            tracing::debug!("UDP GRO not available: {e}");
        }
        Socket {
            socket,
            gso: AtomicBool::new(true),
        }
    }

    /// Send one datagram.
    pub fn send_one(&self, to: SocketAddrV4, d: &[u8]) {
        if let Err(e) = self.socket.send_to(d, to) {
            tracing::debug!(%to, "send: {e}");
        }
    }

    /// Send the datagrams lying in `buf`, run by run.
    pub fn send_batch(&self, buf: &[u8], datagrams: &[Datagram]) {
        for r in runs(datagrams) {
            if r.count > 1 && self.gso.load(Ordering::Relaxed) {
                match self.send_run(buf, &r) {
                    Ok(()) => continue,
                    Err(e) if gso_refused(e) => {
                        tracing::info!(
                            "UDP segmentation offload refused ({e}): one datagram per send from now on"
                        );
                        self.gso.store(false, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::debug!(to = %r.to, "send: {e}");
                        continue;
                    }
                }
            }
            let mut at = r.start;
            while at < r.end {
                let end = (at + r.segment).min(r.end);
                self.send_one(r.to, &buf[at..end]);
                at = end;
            }
        }
    }

    fn send_run(&self, buf: &[u8], r: &Run) -> nix::Result<()> {
        let iov = [IoSlice::new(&buf[r.start..r.end])];
        let segment = r.segment as u16;
        let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
        let to = SockaddrIn::from(r.to);
        sendmsg(
            self.socket.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::empty(),
            Some(&to),
        )
        .map(|_| ())
    }

    /// Receive into `buf`: the sender and the size of the datagrams it
    /// holds (coalesced ones all have that size but the last), or `None`
    /// when the read timed out.
    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<Received>> {
        let mut cmsg = nix::cmsg_space!(i32);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<SockaddrIn>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let len = msg.bytes;
        let mut segment = len;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::UdpGroSegments(s) = c
                    && s > 0
                {
                    segment = s as usize;
                }
            }
        }
        let Some(from) = msg.address else {
            return Ok(None);
        };
        Ok(Some(Received {
            from: SocketAddrV4::new(from.ip(), from.port()),
            len,
            segment: segment.max(1),
        }))
    }
}

/// What one receive brought.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub from: SocketAddrV4,
    pub len: usize,
    pub segment: usize,
}

impl Received {
    /// The datagrams in `buf[..len]`.
    pub fn datagrams<'b>(&self, buf: &'b [u8]) -> impl Iterator<Item = &'b [u8]> {
        buf[..self.len].chunks(self.segment)
    }
}

/// Errors meaning the kernel or the route cannot segment UDP.
fn gso_refused(e: nix::errno::Errno) -> bool {
    use nix::errno::Errno;
    matches!(
        e,
        Errno::EIO | Errno::EINVAL | Errno::ENOPROTOOPT | Errno::EOPNOTSUPP
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(n: u8) -> SocketAddrV4 {
        SocketAddrV4::new(std::net::Ipv4Addr::new(10, 0, 0, n), 51820)
    }

    fn lay(sizes: &[(u8, usize)]) -> Vec<Datagram> {
        let mut at = 0;
        sizes
            .iter()
            .map(|&(n, len)| {
                let d = Datagram {
                    to: to(n),
                    start: at,
                    len,
                };
                at += len;
                d
            })
            .collect()
    }

    #[test]
    fn equal_datagrams_to_one_peer_make_one_run_with_a_short_tail() {
        let r = runs(&lay(&[(1, 1400), (1, 1400), (1, 1400), (1, 600)]));
        assert_eq!(
            r,
            vec![Run {
                to: to(1),
                start: 0,
                end: 4800,
                segment: 1400,
                count: 4
            }]
        );
    }

    #[test]
    fn a_short_datagram_ends_its_run_and_another_peer_starts_one() {
        let r = runs(&lay(&[
            (1, 1400),
            (1, 600),
            (1, 1400),
            (2, 1400),
            (2, 1400),
            (1, 1400),
        ]));
        let shape: Vec<(u8, usize, usize)> = r
            .iter()
            .map(|r| (r.to.ip().octets()[3], r.segment, r.count))
            .collect();
        assert_eq!(
            shape,
            vec![(1, 1400, 2), (1, 1400, 1), (2, 1400, 2), (1, 1400, 1)]
        );
        // A larger datagram after a smaller first one cannot join.
        let r = runs(&lay(&[(1, 100), (1, 1400)]));
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn runs_stop_at_the_segment_and_byte_limits() {
        let many: Vec<(u8, usize)> = vec![(1, 100); MAX_SEGMENTS + 1];
        let r = runs(&lay(&many));
        assert_eq!(
            r.iter().map(|r| r.count).collect::<Vec<_>>(),
            vec![MAX_SEGMENTS, 1]
        );
        let big: Vec<(u8, usize)> = vec![(1, 1500); 50];
        let r = runs(&lay(&big));
        assert!(r.iter().all(|r| r.end - r.start <= MAX_RUN_BYTES));
        assert_eq!(r.iter().map(|r| r.count).sum::<usize>(), 50);
        assert_eq!(r[0].count, MAX_RUN_BYTES / 1500);
    }

    #[test]
    fn datagrams_not_adjacent_in_the_buffer_do_not_join() {
        let mut d = lay(&[(1, 1400), (1, 1400)]);
        d[1].start += 10;
        assert_eq!(runs(&d).len(), 2);
    }

    #[test]
    fn a_coalesced_receive_splits_by_its_segment_size() {
        let buf = vec![7u8; 3000];
        let r = Received {
            from: to(1),
            len: 2900,
            segment: 1200,
        };
        let sizes: Vec<usize> = r.datagrams(&buf).map(<[u8]>::len).collect();
        assert_eq!(sizes, vec![1200, 1200, 500]);
    }

    /// Real sockets on the loopback of a namespace of its own: a run sent
    /// with segmentation arrives as its datagrams, coalesced or not.
    #[test]
    fn a_segmented_run_arrives_as_its_datagrams() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            crate::dataplane::sysctl::set_loopback_up().expect("loopback up");
            segmented_run_in_this_namespace();
        })
        .join()
        .expect("the namespace's thread");
    }

    fn segmented_run_in_this_namespace() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let std::net::SocketAddr::V4(dst) = rx.local_addr().unwrap() else {
            unreachable!()
        };
        let rx = Socket::new(rx);
        let tx = Socket::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let mut buf = Vec::new();
        let mut ds = Vec::new();
        for (i, len) in [1000usize, 1000, 1000, 300].into_iter().enumerate() {
            ds.push(Datagram {
                to: dst,
                start: buf.len(),
                len,
            });
            buf.extend(std::iter::repeat_n(i as u8, len));
        }
        tx.send_batch(&buf, &ds);
        assert!(
            tx.gso.load(Ordering::Relaxed),
            "loopback takes segmented sends"
        );
        let mut got = Vec::new();
        let mut rbuf = vec![0u8; 65535];
        while got.len() < 4 {
            let r = rx.recv(&mut rbuf).unwrap().expect("datagrams within 2 s");
            for d in r.datagrams(&rbuf) {
                got.push(d.to_vec());
            }
        }
        let want: Vec<Vec<u8>> = ds
            .iter()
            .map(|d| buf[d.start..d.start + d.len].to_vec())
            .collect();
        assert_eq!(got, want);
    }
}
