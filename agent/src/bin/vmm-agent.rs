//! `vmm-agent`: serves the vmmagent.v1 gRPC API (Unix socket, or TCP with mutual TLS) and
//! supervises this host's VMs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Parser;
use vmm_agent::config_file::FileConfig;
use vmm_agent::error::ErrorChain;
use vmm_agent::host::{host_cpus, host_memory_mib};
use vmm_agent::listen::{parse_listen, tls_files, Listen};
use vmm_agent::state::{AgentConfig, JailUids};
use vmm_agent::store::Capacity;

/// The host agent: runs one vmm process per VM and serves the vmmagent.v1 gRPC API.
///
/// Every setting may also come from a TOML file (--config); flags override it.
#[derive(Parser, Debug)]
#[command(name = "vmm-agent", version)]
struct Args {
    /// A TOML file with any of the settings below (keys as the flags, with _ for -; `listen` a
    /// list; `[labels]` and `[tls] cert/key/client_ca` tables). Unknown keys are errors.
    #[arg(long, value_name = "TOML")]
    config: Option<PathBuf>,
    /// Holds state.db and vms/<id>/ (config, control socket, console log, vmm log)
    /// [default: /var/lib/vmm-agent].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Where to serve gRPC: unix:PATH or tcp://ADDR:PORT (mutual TLS); may be repeated
    /// [default: unix:<state-dir>/agent.sock].
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
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    insecure_tcp: Option<bool>,
    /// The vmm binary [default: `vmm` next to this executable].
    #[arg(long)]
    vmm_bin: Option<PathBuf>,
    /// Host memory kept for everything but VMs, in MiB [default: 1024].
    #[arg(long)]
    reserve_memory_mib: Option<u64>,
    /// Host CPUs kept for everything but VMs [default: 0].
    #[arg(long)]
    reserve_vcpus: Option<u64>,
    /// vCPUs allocatable per host CPU [default: 4].
    #[arg(long)]
    vcpu_overcommit: Option<u64>,
    /// An operator label reported by GetHost (zone, rack, ...), KEY=VALUE; may be repeated. Added
    /// to the file's labels, replacing one with the same key.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// How long re-adopting one VM may take at start, in milliseconds [default: 5000].
    #[arg(long)]
    adopt_timeout_ms: Option<u64>,
    /// Console log bytes kept on disk per VM [default: 4194304].
    #[arg(long)]
    console_log_max_bytes: Option<u64>,
    /// At start, boot again every VM that should run (desired state running or paused) but whose
    /// vmm is gone, e.g. after a host reboot, from its persisted spec and disks.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    restore_on_boot: Option<bool>,
    /// Log level: error, warn, info, debug or trace [default: info].
    #[arg(long)]
    log_level: Option<tracing::Level>,
    /// Serve Prometheus metrics (GET /metrics, plain HTTP) on this TCP address, e.g.
    /// 127.0.0.1:9464 [default: none].
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<String>,
    /// The parent cgroup of the VMs: each vmm runs in a CPU cgroup of its own under it; `none`
    /// leaves the vmms in the agent's cgroup [default: vmm-agent-<hash of the state dir>].
    #[arg(long, value_name = "NAME")]
    vm_cgroup: Option<String>,
    /// The most CPU all VMs together may use, in cores (e.g. 1.5 on a 2-core host leaves half a
    /// core to the agent and the host) [default: no cap].
    #[arg(long, value_name = "CORES")]
    vms_cpu_max: Option<f64>,
    /// The Linux bridge that taps the agent makes (NICs without a tap) join when the NIC names
    /// no bridge [default: none: such NICs must name one].
    #[arg(long, value_name = "NAME")]
    bridge: Option<String>,
    /// The MTU of taps the agent makes when the NIC asks none, 68 to 65535 [default: the
    /// bridge's].
    #[arg(long, value_name = "N")]
    nic_mtu: Option<u32>,
    /// The largest base image (kernel, rootfs and initrd together) that RegisterImage and
    /// UploadImage accept, in bytes [default: 64 GiB].
    #[arg(long, value_name = "BYTES")]
    image_max_bytes: Option<u64>,
    /// The most guests booting at once: further starts wait in line (as STARTING) until a
    /// booting guest reports its boot complete; 0: no limit [default: the host's CPUs].
    #[arg(long, value_name = "N")]
    max_concurrent_boots: Option<usize>,
    /// How long a booting guest may hold its place among --max-concurrent-boots without
    /// reporting its boot complete (a guest that never does must not block others), in seconds
    /// [default: 90].
    #[arg(long, value_name = "SECONDS")]
    boot_slot_timeout_secs: Option<u64>,
    /// Run every vmm the agent boots jailed (`vmm --jail`: its own root with only its kernel,
    /// disks and socket, its own uid, namespaces and cgroup `vmm/<vm id>` with CPU and memory
    /// limits); snapshot restores and incoming migrations still run unjailed. Needs root.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    jail_vms: Option<bool>,
    /// The uids (and gids) of jailed vmms, FIRST:COUNT; none may be a host user's
    /// [default: 900000000:100000].
    #[arg(long, value_name = "FIRST:COUNT")]
    jail_uids: Option<String>,
}

/// The address of `--metrics-listen HOST:PORT` (a host name is looked up; its first address is
/// used).
fn metrics_address(text: &str) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    text.to_socket_addrs()
        .map_err(|e| anyhow!("--metrics-listen '{text}': {e} (expected HOST:PORT)"))?
        .next()
        .ok_or_else(|| anyhow!("--metrics-listen '{text}': the host has no address"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let file = match &args.config {
        Some(path) => FileConfig::load(path).map_err(|e| anyhow!("--config {}", ErrorChain(&e)))?,
        None => FileConfig::default(),
    };
    let log_level = match (args.log_level, &file.log_level) {
        (Some(l), _) => l,
        (None, Some(l)) => l
            .parse()
            .map_err(|_| anyhow!("log_level in --config: '{l}' is not error, warn, info, debug or trace"))?,
        (None, None) => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_max_level(log_level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let state_dir = args
        .state_dir
        .or(file.state_dir)
        .unwrap_or_else(|| PathBuf::from("/var/lib/vmm-agent"));
    let file_tls = file.tls.unwrap_or_default();
    let tls = tls_files(
        args.tls_cert.or(file_tls.cert),
        args.tls_key.or(file_tls.key),
        args.tls_client_ca.or(file_tls.client_ca),
    )?;
    let insecure_tcp = args.insecure_tcp.or(file.insecure_tcp).unwrap_or(false);
    let listen = if args.listen.is_empty() {
        file.listen.unwrap_or_default()
    } else {
        args.listen
    };
    let listens = if listen.is_empty() {
        vec![Listen::Unix(state_dir.join("agent.sock"))]
    } else {
        listen
            .iter()
            .map(|l| parse_listen(l, tls.as_ref(), insecure_tcp))
            .collect::<Result<Vec<_>, _>>()?
    };
    if tls.is_some() && !listens.iter().any(|l| matches!(l, Listen::Tls { .. })) {
        bail!("--tls-* flags are given but no --listen tcp://ADDR:PORT uses them");
    }
    let vmm_bin = match args.vmm_bin.or(file.vmm_bin) {
        Some(p) => p,
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .with_file_name("vmm"),
    };
    if !vmm_bin.exists() {
        bail!("vmm binary {} does not exist (use --vmm-bin)", vmm_bin.display());
    }
    let mut host_labels = file.labels.unwrap_or_default();
    for l in &args.labels {
        let Some((k, v)) = l.split_once('=') else {
            bail!("--label must be KEY=VALUE, got '{l}'");
        };
        host_labels.insert(k.to_string(), v.to_string());
    }
    vmm_agent::spec::check_labels("--label", &host_labels).map_err(|e| anyhow!("{e}"))?;
    let vcpu_overcommit = args.vcpu_overcommit.or(file.vcpu_overcommit).unwrap_or(4);
    let reserve_vcpus = args.reserve_vcpus.or(file.reserve_vcpus).unwrap_or(0);
    let reserve_memory_mib = args
        .reserve_memory_mib
        .or(file.reserve_memory_mib)
        .unwrap_or(1024);
    let allocatable = Capacity {
        vcpus: (u64::from(host_cpus()) * vcpu_overcommit).saturating_sub(reserve_vcpus),
        memory_mib: host_memory_mib().saturating_sub(reserve_memory_mib),
    };
    let metrics_listen = match args.metrics_listen.or(file.metrics_listen) {
        Some(text) => Some(metrics_address(&text)?),
        None => None,
    };
    let vm_cgroup = match args.vm_cgroup.or(file.vm_cgroup) {
        Some(n) if n == "none" => None,
        Some(n) => {
            let ok = (1..=64).contains(&n.len())
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                && !n.starts_with('.');
            if !ok {
                bail!("--vm-cgroup '{n}' must be 1-64 of A-Z a-z 0-9 - _ . (not starting with .), or none");
            }
            Some(n)
        }
        None => Some(vmm_agent::cgroups::default_name(&state_dir)),
    };
    let vms_cpu_max = args.vms_cpu_max.or(file.vms_cpu_max);
    if vms_cpu_max.is_some() && vm_cgroup.is_none() {
        bail!("--vms-cpu-max needs the VMs' cgroup (not --vm-cgroup none)");
    }
    let bridge = args.bridge.or(file.bridge);
    if let Some(b) = &bridge {
        if !hostnet::tap::is_valid_name(b) {
            bail!("--bridge '{b}': not an interface name (1-15 printable characters, no '/' or ':')");
        }
    }
    let jail = match args.jail_vms.or(file.jail_vms).unwrap_or(false) {
        true => {
            let text = args.jail_uids.or(file.jail_uids);
            let uids = JailUids::parse(text.as_deref().unwrap_or("900000000:100000"))
                .map_err(|e| anyhow!("--jail-uids {e}"))?;
            if vms_cpu_max.is_some() {
                // A jailed vmm moves itself into `vmm/<id>`, outside the agent's parent group.
                bail!("--jail-vms cannot be combined with --vms-cpu-max (each jailed vmm has its own CPU limit)");
            }
            Some(uids)
        }
        false => None,
    };
    let nic_mtu = args.nic_mtu.or(file.nic_mtu);
    if let Some(mtu) = nic_mtu {
        if !vmm_agent::nics::MTU_RANGE.contains(&mtu) {
            bail!("--nic-mtu {mtu}: must be 68 to 65535");
        }
    }
    let config = AgentConfig {
        state_dir,
        vmm_bin,
        allocatable,
        host_labels,
        adopt_timeout: Duration::from_millis(args.adopt_timeout_ms.or(file.adopt_timeout_ms).unwrap_or(5000)),
        console_log_max_bytes: args
            .console_log_max_bytes
            .or(file.console_log_max_bytes)
            .unwrap_or(4 << 20)
            .max(64 * 1024),
        restore_on_boot: args.restore_on_boot.or(file.restore_on_boot).unwrap_or(false),
        metrics_listen,
        vm_cgroup,
        vms_cpu_max,
        bridge,
        nic_mtu,
        image_max_bytes: args
            .image_max_bytes
            .or(file.image_max_bytes)
            .unwrap_or(vmm_agent::images::DEFAULT_MAX_IMAGE_BYTES),
        max_concurrent_boots: args
            .max_concurrent_boots
            .or(file.max_concurrent_boots)
            .unwrap_or(host_cpus() as usize),
        boot_slot_timeout: Duration::from_secs(
            args.boot_slot_timeout_secs
                .or(file.boot_slot_timeout_secs)
                .unwrap_or(90)
                .max(1),
        ),
        jail,
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
            .map_err(|e| anyhow!("{}", ErrorChain(&e)))
    })
}
