//! What every part of the running agent shares: its settings and the store, reached from async code.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::AgentError;
use crate::store::{Capacity, Store, StoreError};

/// The agent's settings (from its flags).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Holds `state.db` and `vms/<id>/`.
    pub state_dir: PathBuf,
    /// The `vmm` binary to run.
    pub vmm_bin: PathBuf,
    /// What VMs may use in all.
    pub allocatable: Capacity,
    /// Operator labels reported by `GetHost`.
    pub host_labels: HashMap<String, String>,
    /// How long re-adopting one VM may take at start (connect and `describe`).
    pub adopt_timeout: Duration,
    /// How much of each console log is kept on disk.
    pub console_log_max_bytes: u64,
    /// At start, boot again the VMs that should run but whose vmm is gone.
    pub restore_on_boot: bool,
    /// Where to serve Prometheus metrics (`GET /metrics`); `None`: nowhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The parent cgroup of the VMs' groups (see `cgroups`); `None`: vmms stay in the agent's.
    pub vm_cgroup: Option<String>,
    /// The most CPU all VMs together may use, in cores (the parent group's cap).
    pub vms_cpu_max: Option<f64>,
    /// The bridge of agent-made taps whose NIC names none (`--bridge`).
    pub bridge: Option<String>,
    /// The MTU of agent-made taps whose NIC asks none (`--nic-mtu`); none: the bridge's.
    pub nic_mtu: Option<u32>,
    /// The largest image (all its files together) RegisterImage and UploadImage accept.
    pub image_max_bytes: u64,
    /// The most guests booting at once (0: no limit); see `boot_slots`.
    pub max_concurrent_boots: usize,
    /// How long a booting guest may hold its boot slot without reporting its boot complete.
    pub boot_slot_timeout: Duration,
    /// Run each vmm jailed (`vmm --jail`), under a uid of its own from this range; `None`: not
    /// jailed.
    pub jail: Option<JailUids>,
}

/// The uids (and equal gids) jailed vmms run as: `first` to `first + count - 1`, none of them a
/// host user's; no two VMs of this agent hold the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailUids {
    /// The first uid of the range (never 0).
    pub first: u32,
    /// How many.
    pub count: u32,
}

impl JailUids {
    /// Parses `FIRST:COUNT` (`--jail-uids`).
    pub fn parse(text: &str) -> Result<JailUids, String> {
        let bad = || format!("'{text}': expected FIRST:COUNT, e.g. 900000000:100000");
        let (first, count) = text.split_once(':').ok_or_else(bad)?;
        let first: u32 = first.trim().parse().map_err(|_| bad())?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        if first == 0 || count == 0 {
            return Err(format!("'{text}': the first uid and the count must not be 0"));
        }
        // uid_t's last value (u32::MAX) means "no uid" to the kernel.
        if u64::from(first) + u64::from(count) > u64::from(u32::MAX) {
            return Err(format!("'{text}': the range passes the largest uid"));
        }
        Ok(JailUids { first, count })
    }

    /// The range as uids.
    pub fn range(&self) -> std::ops::Range<u32> {
        self.first..self.first + self.count
    }
}

impl AgentConfig {
    /// The directory of one VM's files.
    pub fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.state_dir.join("vms").join(vm_id)
    }

    /// The control socket of a VM: in its jail's `run/` when vmms are jailed.
    pub fn api_sock(&self, vm_id: &str) -> PathBuf {
        match self.jail {
            Some(_) => self.jail_dir(vm_id).join("run").join("api.sock"),
            None => self.vm_dir(vm_id).join("api.sock"),
        }
    }

    /// The jail (`vmm --jail DIR`) of a VM, when vmms are jailed: it exists while the vmm runs.
    pub fn jail_dir(&self, vm_id: &str) -> PathBuf {
        self.state_dir.join("jails").join(vm_id)
    }

    /// Where snapshots are kept.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.state_dir.join("snapshots")
    }

    /// The directory of one snapshot.
    pub fn snapshot_dir(&self, snapshot_id: &str) -> PathBuf {
        self.snapshots_dir().join(snapshot_id)
    }

    /// Where base images are kept (`<id>/kernel`, `rootfs`, `initrd`).
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    /// The serial console log of a VM.
    pub fn console_log(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join("console.log")
    }
}

/// The store, shared, with each call run on tokio's blocking pool so that SQLite never blocks the
/// async runtime.
#[derive(Clone)]
pub struct StoreHandle(Arc<Mutex<Store>>);

impl StoreHandle {
    /// Wraps an open store.
    pub fn new(store: Store) -> Self {
        StoreHandle(Arc::new(Mutex::new(store)))
    }

    /// Runs `f` with the store on the blocking pool.
    pub async fn call<R, F>(&self, f: F) -> Result<R, AgentError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Store) -> Result<R, StoreError> + Send + 'static,
    {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || {
            // A panic in another call cannot leave SQLite inconsistent (transactions roll back).
            let mut guard = store.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| AgentError::Internal(format!("store task failed: {e}")))?
        .map_err(AgentError::from)
    }
}

/// What this agent presents to other agents when it migrates a VM (its TLS listener's identity)
/// and where it receives migrations.
#[derive(Clone)]
pub struct PeerIdentity {
    /// Certificate chain, PEM (a client certificate to peers: it must name the
    /// `migration-peer` role for them to accept it).
    pub cert_pem: String,
    /// Its key, PEM.
    pub key_pem: String,
    /// The CA peers' certificates chain to (the listener's client CA), PEM.
    pub ca_pem: String,
    /// The address of the TLS listener: incoming migration connections are accepted there too.
    pub listen_ip: std::net::IpAddr,
}

impl PeerIdentity {
    /// This identity for a vmm's side of a migration connection: the source names the
    /// destination it must find in the peer's certificate, the destination names none.
    pub fn migration_tls(&self, server_name: Option<String>) -> vmm_api::migration::MigrationTls {
        vmm_api::migration::MigrationTls {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            ca_pem: self.ca_pem.clone(),
            server_name,
        }
    }
}

impl std::fmt::Debug for PeerIdentity {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerIdentity")
            .field("listen_ip", &self.listen_ip)
            .finish_non_exhaustive()
    }
}

/// The store and the settings, shared by the RPC handlers and the supervisor.
pub struct Context {
    /// Settings.
    pub config: AgentConfig,
    /// State.
    pub store: StoreHandle,
    /// The VMs migrating away from here.
    pub migrations: crate::migrations::Migrations,
    /// This agent's identity toward peers; `None` without a TLS listener (no migrations then).
    pub peer: Option<PeerIdentity>,
    /// The figures kept for Prometheus.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Each vmm's own CPU cgroup, when the host has one to give.
    pub cgroups: Option<crate::cgroups::VmCgroups>,
    /// The start admission limit.
    pub boot_slots: crate::boot_slots::BootSlots,
}

impl Context {
    /// The stored VM `vm_id`, which must be running or paused (FAILED_PRECONDITION naming `verb`,
    /// e.g. "snapshotted", otherwise).
    pub async fn live_vm(&self, vm_id: &str, verb: &str) -> Result<crate::proto::Vm, AgentError> {
        use crate::proto::VmState;
        let id = vm_id.to_string();
        let vm = self
            .store
            .call(move |s| s.get_vm(&id))
            .await?
            .ok_or_else(|| AgentError::VmNotFound(vm_id.to_string()))?;
        if !matches!(vm.state(), VmState::Running | VmState::Paused) {
            return Err(AgentError::WrongState(format!(
                "VM '{vm_id}' is not running or paused and cannot be {verb}"
            )));
        }
        Ok(vm)
    }
}
