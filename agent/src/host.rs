//! `HostService`: what this host has, what its VMs hold, and facts for placement.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::proto::host_service_server::HostService;
use crate::proto::{GetHostRequest, Host, StateCount, VmState};
use crate::state::Context;
use crate::store::holds_resources;

/// Facts about the host that do not change while the agent runs.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// Host name.
    pub hostname: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// `/dev/kvm` opens read-write.
    pub kvm_available: bool,
    /// The loaded KVM module.
    pub kvm_module: String,
    /// `vmm --version`.
    pub vmm_version: String,
    /// `uname -r`.
    pub kernel_release: String,
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// MemTotal of `/proc/meminfo`, in MiB.
pub fn host_memory_mib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

/// Logical CPUs the agent may use.
pub fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

impl HostFacts {
    /// Looks the facts up (runs `vmm --version`).
    pub fn gather(vmm_bin: &Path) -> HostFacts {
        let kvm_module = ["kvm_pvm", "kvm_intel", "kvm_amd"]
            .into_iter()
            .find(|m| Path::new("/sys/module").join(m).exists())
            .unwrap_or("")
            .to_string();
        let vmm_version = std::process::Command::new(vmm_bin)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        HostFacts {
            hostname: read_trimmed("/proc/sys/kernel/hostname"),
            cpus: host_cpus(),
            memory_mib: host_memory_mib(),
            kvm_available: std::fs::File::options()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
            kvm_module,
            vmm_version,
            kernel_release: read_trimmed("/proc/sys/kernel/osrelease"),
        }
    }
}

/// `HostService` over the store and the host's facts.
pub struct HostApi {
    ctx: Arc<Context>,
    facts: HostFacts,
}

impl HostApi {
    /// Serves `facts` and the VMs of `ctx`.
    pub fn new(ctx: Arc<Context>, facts: HostFacts) -> Self {
        HostApi { ctx, facts }
    }
}

#[tonic::async_trait]
impl HostService for HostApi {
    async fn get_host(&self, _: Request<GetHostRequest>) -> Result<Response<Host>, Status> {
        let vms = self.ctx.store.call(|s| s.list_vms()).await?;
        let mut by_state: BTreeMap<i32, u32> = BTreeMap::new();
        let (mut vcpus, mut memory) = (0u32, 0u64);
        for vm in &vms {
            *by_state.entry(vm.state).or_default() += 1;
            if holds_resources(vm.state()) {
                let spec = vm.spec.clone().unwrap_or_default();
                vcpus += spec.vcpus;
                memory += spec.memory_mib;
            }
        }
        let f = &self.facts;
        let limit = self.ctx.config.allocatable;
        Ok(Response::new(Host {
            hostname: f.hostname.clone(),
            cpus: f.cpus,
            memory_mib: f.memory_mib,
            allocatable_vcpus: u32::try_from(limit.vcpus).unwrap_or(u32::MAX),
            allocatable_memory_mib: limit.memory_mib,
            allocated_vcpus: vcpus,
            allocated_memory_mib: memory,
            vms_by_state: by_state
                .into_iter()
                .filter(|(s, _)| *s != VmState::Unspecified as i32)
                .map(|(state, count)| StateCount { state, count })
                .collect(),
            kvm_available: f.kvm_available,
            kvm_module: f.kvm_module.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            vmm_version: f.vmm_version.clone(),
            kernel_release: f.kernel_release.clone(),
            labels: self.ctx.config.host_labels.clone(),
        }))
    }
}
