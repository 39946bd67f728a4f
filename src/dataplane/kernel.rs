//! Netlink layer.
