//! The lab's connectivity probes: a continuous echo stream that counts every
//! lost reply, a TCP bulk transfer checked end to end with SHA-256, and the
//! concurrent all-pairs matrix of `vxmesh lab check`. Single echoes and the
//! raw socket come from [`vxmesh::icmp`].
//!
//! Every socket is created on a thread that has entered the probing namespace
//! (see [`Netns::run`]). A socket stays in the namespace it was created in, so it
//! is then used from any thread. No external tool (ping, iperf) is run.

mod hello;
mod pairs;
mod stream;
mod transfer;

pub use hello::{Responder, hello_line, tcp_hello};
pub use pairs::{PairJob, PairResult, probe_pairs};
pub use stream::{ContinuousProbe, ProbeStream, StreamStats, continuous};
pub use transfer::{SendReport, TransferReport, tcp_send, tcp_transfer};
pub use vxmesh::icmp::{DEFAULT_PAYLOAD, EchoOutcome, Refusal, icmp_echo, icmp_payload_for_ip_len};
