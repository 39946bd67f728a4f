//! The lab and its tools: a whole vxmesh cluster on one machine in network
//! namespaces, the probes that check it, the benchmarks and the fuzz bodies.
//! Nothing here is needed on a production host; it drives the `vxmesh`
//! library exactly as a host would.

pub mod bench;
pub mod fuzzing;
pub mod lab;
pub mod probe;
