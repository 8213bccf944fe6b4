//! `vmm-agent`: the host agent that supervises `vmm` processes and serves the `vmmagent.v1` API over
//! gRPC.
//!
//! - [`service`] and [`host`]: thin RPC handlers; [`error`]: the one place errors become statuses.
//! - [`supervisor`]: one actor per VM (`actor.rs`) owning its `vmm` process; [`control`]: the vmm's
//!   control socket.
//! - [`images`]: base images and VMs' copy-on-write overlays of them; [`image_service`]: their
//!   RPC handlers.
//! - [`operations`]: long-running operations (the internal API and the store); [`ops_service`]:
//!   their RPC handlers.
//! - [`store`]: the SQLite state; [`state`]: what the parts share.
//! - [`metrics`]: what Prometheus scrapes ([`metrics_http`] serves it, [`rpc_metrics`] counts the
//!   RPCs, [`usage`] reads each VM's usage, [`exposition`] writes the text format).
//! - [`server`]: the whole agent put together (used by the `vmm-agent` binary and the tests).
#![deny(unsafe_code)]

mod actor;
pub mod boot_slots;
pub mod cgroups;
pub mod client;
pub mod config_file;
pub mod console;
pub mod control;
pub mod error;
pub mod exposition;
pub mod host;
pub mod image_service;
pub mod images;
pub mod jail_snapshot;
pub mod listen;
pub mod memory;
pub mod metrics;
pub mod metrics_http;
pub mod migration_service;
pub mod migrations;
pub mod nics;
pub mod operations;
pub mod ops_service;
pub mod process;
pub mod requests;
pub mod roles;
pub mod rpc_metrics;
pub mod server;
pub mod service;
pub mod snapshot_service;
pub mod snapshots;
pub mod spec;
pub mod state;
pub mod store;
pub mod supervisor;
pub mod usage;

/// Generated protobuf messages and gRPC services of package `vmmagent.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("vmmagent.v1");

    /// The encoded descriptors of the API, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/vmmagent_descriptor.bin"));
}
