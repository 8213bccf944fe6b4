//! The host side of VM NICs, for `vmm-agent` (whose crate forbids `unsafe`):
//!
//! - [`tap`]: creating a non-persistent TAP device (`TUNSETIFF`, the only `unsafe` here): it lives
//!   exactly as long as some process holds its descriptor.
//! - [`netlink`]: a minimal rtnetlink client (`NETLINK_ROUTE`): look a link up by name (index,
//!   MTU, kind, master) and change one (MTU, bridge, up). Hand-written, as only these few messages
//!   are needed; the encoding and decoding are pure functions, tested without a kernel.

pub mod netlink;
pub mod tap;
