//! `vmm-agent`: the per-host agent that supervises `vmm` processes and serves the control plane over gRPC.
//!
//! Empty until the agent issue lands; the crate exists so the workspace layout is fixed from the start.
#![forbid(unsafe_code)]
