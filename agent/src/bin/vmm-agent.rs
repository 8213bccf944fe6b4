//! `vmm-agent`: serves the vmmagent.v1 gRPC API (Unix socket, or TCP with mutual TLS) and
//! supervises this host's VMs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use vmm_agent::host::{host_cpus, host_memory_mib};
use vmm_agent::listen::{parse_listen, tls_files, Listen};
use vmm_agent::state::AgentConfig;
use vmm_agent::store::Capacity;

/// The host agent: runs one vmm process per VM and serves the vmmagent.v1 gRPC API.
#[derive(Parser, Debug)]
#[command(name = "vmm-agent", version)]
struct Args {
    /// Holds state.db and vms/<id>/ (config, control socket, console log, vmm log).
    #[arg(long, default_value = "/var/lib/vmm-agent")]
    state_dir: PathBuf,
    /// Where to serve gRPC: unix:PATH or tcp://ADDR:PORT (mutual TLS); may be repeated
    /// (default: unix:<state-dir>/agent.sock).
    #[arg(long)]
    listen: Vec<String>,
    /// TLS: the agent's certificate chain (PEM), for tcp:// listeners.
    #[arg(long, value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// TLS: the private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// TLS: the CA that client certificates must chain to (PEM). Each client's role comes from a
    /// subject alternative name URI vmmagent-role:viewer|operator|admin in its certificate.
    #[arg(long, value_name = "PEM")]
    tls_client_ca: Option<PathBuf>,
    /// Allow tcp:// listeners without TLS on loopback addresses (development only: every local
    /// process that connects is admin).
    #[arg(long)]
    insecure_tcp: bool,
    /// The vmm binary (default: `vmm` next to this executable).
    #[arg(long)]
    vmm_bin: Option<PathBuf>,
    /// Host memory kept for everything but VMs, in MiB.
    #[arg(long, default_value_t = 1024)]
    reserve_memory_mib: u64,
    /// Host CPUs kept for everything but VMs.
    #[arg(long, default_value_t = 0)]
    reserve_vcpus: u64,
    /// vCPUs allocatable per host CPU.
    #[arg(long, default_value_t = 4)]
    vcpu_overcommit: u64,
    /// An operator label reported by GetHost (zone, rack, ...), KEY=VALUE; may be repeated.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// How long re-adopting one VM may take at start, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    adopt_timeout_ms: u64,
    /// Console log bytes kept on disk per VM.
    #[arg(long, default_value_t = 4 << 20)]
    console_log_max_bytes: u64,
    /// At start, boot again every VM that should run (desired state running or paused) but whose
    /// vmm is gone, e.g. after a host reboot, from its persisted spec and disks.
    #[arg(long)]
    restore_on_boot: bool,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    log_level: tracing::Level,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_max_level(args.log_level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let tls = tls_files(args.tls_cert, args.tls_key, args.tls_client_ca)?;
    let listens = if args.listen.is_empty() {
        vec![Listen::Unix(args.state_dir.join("agent.sock"))]
    } else {
        args.listen
            .iter()
            .map(|l| parse_listen(l, tls.as_ref(), args.insecure_tcp))
            .collect::<Result<Vec<_>, _>>()?
    };
    if tls.is_some() && !listens.iter().any(|l| matches!(l, Listen::Tls { .. })) {
        bail!("--tls-* flags are given but no --listen tcp://ADDR:PORT uses them");
    }
    let vmm_bin = match args.vmm_bin {
        Some(p) => p,
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .with_file_name("vmm"),
    };
    if !vmm_bin.exists() {
        bail!("vmm binary {} does not exist (use --vmm-bin)", vmm_bin.display());
    }
    let mut host_labels = HashMap::new();
    for l in &args.labels {
        let Some((k, v)) = l.split_once('=') else {
            bail!("--label must be KEY=VALUE, got '{l}'");
        };
        host_labels.insert(k.to_string(), v.to_string());
    }
    vmm_agent::spec::check_labels("--label", &host_labels).map_err(|e| anyhow::anyhow!("{e}"))?;
    let allocatable = Capacity {
        vcpus: (u64::from(host_cpus()) * args.vcpu_overcommit).saturating_sub(args.reserve_vcpus),
        memory_mib: host_memory_mib().saturating_sub(args.reserve_memory_mib),
    };
    let config = AgentConfig {
        state_dir: args.state_dir,
        vmm_bin,
        allocatable,
        host_labels,
        adopt_timeout: Duration::from_millis(args.adopt_timeout_ms),
        console_log_max_bytes: args.console_log_max_bytes.max(64 * 1024),
        restore_on_boot: args.restore_on_boot,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot handle SIGTERM")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down; VMs keep running");
        };
        vmm_agent::server::run(config, listens, shutdown)
            .await
            .map_err(|e| anyhow::anyhow!("{}", vmm_agent::error::ErrorChain(&e)))
    })
}
