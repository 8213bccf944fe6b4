//! What the agent exports to Prometheus (`--metrics-listen`, served by [`crate::metrics_http`]):
//! the figures it keeps as it runs ([`Metrics`]: RPCs, create-to-running and boot latencies,
//! scrape errors) and, read at scrape time, the VMs by state, the host's allocation and each VM's
//! usage ([`crate::usage`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prost::Message as _;

use crate::exposition::{Exposition, Histogram, Kind};
use crate::proto::VmState;
use crate::state::Context;
use crate::store::holds_resources;
use crate::usage::{self, UsageError, VmUsage};

/// RPC latency buckets, seconds: most calls answer in milliseconds; starts and stops wait for
/// the vmm or the guest (up to the stop timeout).
const RPC_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Start-to-running buckets, seconds: a vmm reports its vCPUs running within milliseconds to
/// seconds on a loaded host.
const RUNNING_BUCKETS: [f64; 12] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Start-to-boot-complete buckets, seconds: a guest kernel boots in a fraction of a second on
/// hardware KVM and in tens of seconds on nested (kvm_pvm) hosts.
const BOOT_BUCKETS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0,
];

/// The label of a method the agent does not serve: clients choose paths, and each new label value
/// is a new series, so unknown ones share one.
pub const UNKNOWN_METHOD: &str = "unknown";

/// The states a VM can be in, with their label values (every one is exported, also at 0).
const STATES: [(VmState, &str); 6] = [
    (VmState::Starting, "starting"),
    (VmState::Running, "running"),
    (VmState::Paused, "paused"),
    (VmState::Stopping, "stopping"),
    (VmState::Stopped, "stopped"),
    (VmState::Failed, "failed"),
];

/// The figures the agent keeps between scrapes.
#[derive(Debug)]
pub struct Metrics {
    known_methods: HashSet<String>,
    /// Durations by method and status code; their counts are the request counts.
    rpc: Mutex<BTreeMap<(String, &'static str), Histogram>>,
    start_to_running: Mutex<Histogram>,
    start_to_boot_complete: Mutex<Histogram>,
    scrape_errors: Mutex<BTreeMap<&'static str, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a single step; a panic elsewhere cannot leave these half changed.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The methods (`/package.Service/Method`) of the services in encoded descriptor sets.
fn methods_of(descriptor_sets: &[&[u8]]) -> HashSet<String> {
    let mut methods = HashSet::new();
    for set in descriptor_sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = service.name.unwrap_or_default();
                for method in service.method {
                    let name = method.name.unwrap_or_default();
                    methods.insert(if package.is_empty() {
                        format!("/{service_name}/{name}")
                    } else {
                        format!("/{package}.{service_name}/{name}")
                    });
                }
            }
        }
    }
    methods
}

impl Metrics {
    /// Metrics of an agent serving the vmmagent.v1 services, health and reflection.
    pub fn new() -> Self {
        Self::with_methods(methods_of(&[
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        ]))
    }

    /// Metrics that label RPCs of `known_methods` by name and others as [`UNKNOWN_METHOD`].
    pub fn with_methods(known_methods: HashSet<String>) -> Self {
        Metrics {
            known_methods,
            rpc: Mutex::default(),
            start_to_running: Mutex::new(Histogram::new(&RUNNING_BUCKETS)),
            start_to_boot_complete: Mutex::new(Histogram::new(&BOOT_BUCKETS)),
            scrape_errors: Mutex::default(),
        }
    }

    /// The label of the RPC method at `path`.
    pub fn method_label(&self, path: &str) -> String {
        if self.known_methods.contains(path) {
            path.to_string()
        } else {
            UNKNOWN_METHOD.to_string()
        }
    }

    /// Counts one finished RPC (`method` from [`Metrics::method_label`]).
    pub fn observe_rpc(&self, method: String, code: tonic::Code, elapsed: Duration) {
        let mut rpc = lock(&self.rpc);
        rpc.entry((method, code_name(code)))
            .or_insert_with(|| Histogram::new(&RPC_BUCKETS))
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a start (CreateVm, StartVm, RebootVm, a restore at agent start) that got the VM
    /// running, `elapsed` after it began.
    pub fn observe_start_to_running(&self, elapsed: Duration) {
        lock(&self.start_to_running).observe(elapsed.as_secs_f64());
    }

    /// Counts a guest's boot-complete signal, `elapsed` after its start began.
    pub fn observe_start_to_boot_complete(&self, elapsed: Duration) {
        lock(&self.start_to_boot_complete).observe(elapsed.as_secs_f64());
    }

    fn count_scrape_error(&self, reason: &'static str) {
        *lock(&self.scrape_errors).entry(reason).or_default() += 1;
    }

    /// Writes what the agent keeps: RPCs, start latencies, scrape errors.
    pub(crate) fn write_kept(&self, e: &mut Exposition) {
        let rpc = lock(&self.rpc).clone();
        e.family(
            "vmmagent_rpc_requests_total",
            Kind::Counter,
            "gRPC calls finished, by method and status code.",
        );
        for ((method, code), duration) in &rpc {
            let labels = [("method", method.as_str()), ("code", *code)];
            e.sample("vmmagent_rpc_requests_total", &labels, duration.count());
        }
        e.family(
            "vmmagent_rpc_duration_seconds",
            Kind::Histogram,
            "gRPC call duration from the request to the end of the response (of the whole stream for streaming calls), by method and status code.",
        );
        for ((method, code), duration) in &rpc {
            let labels = [("method", method.as_str()), ("code", *code)];
            e.histogram("vmmagent_rpc_duration_seconds", &labels, duration);
        }
        e.family(
            "vmmagent_vm_start_to_running_seconds",
            Kind::Histogram,
            "From a VM's start (CreateVm, StartVm, RebootVm) to its vmm reporting it RUNNING.",
        );
        let running = lock(&self.start_to_running).clone();
        e.histogram("vmmagent_vm_start_to_running_seconds", &[], &running);
        e.family(
            "vmmagent_vm_start_to_boot_complete_seconds",
            Kind::Histogram,
            "From a VM's start (CreateVm, StartVm, RebootVm) to its guest's boot-complete signal.",
        );
        let boot = lock(&self.start_to_boot_complete).clone();
        e.histogram("vmmagent_vm_start_to_boot_complete_seconds", &[], &boot);
        e.family(
            "vmmagent_scrape_errors_total",
            Kind::Counter,
            "VM usage figures left out of a scrape because they could not be read, by reason.",
        );
        let errors = lock(&self.scrape_errors).clone();
        for reason in UsageError::REASONS {
            let n = errors.get(reason).copied().unwrap_or(0);
            e.sample("vmmagent_scrape_errors_total", &[("reason", reason)], n);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The canonical name of a gRPC status code (as in the gRPC specification).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The whole exposition: the VMs by state and the host's allocation (from the store), what
/// [`Metrics`] keeps, and each VM's usage, read now (a VM whose figures cannot be read within
/// the time allowed is left out and counted in `vmmagent_scrape_errors_total`).
pub async fn render(ctx: &Arc<Context>) -> String {
    let vms = match ctx.store.call(|s| s.list_vms()).await {
        Ok(vms) => Some(vms),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot list the VMs");
            ctx.metrics.count_scrape_error("store");
            None
        }
    };
    let (usages, errors) = match &vms {
        Some(vms) => usage::collect(&ctx.config, vms).await,
        None => (Vec::new(), Vec::new()),
    };
    for error in &errors {
        tracing::debug!(error = %error, "metrics: usage left out");
        ctx.metrics.count_scrape_error(error.reason());
    }
    let mut e = Exposition::new();
    e.family(
        "vmmagent_build_info",
        Kind::Gauge,
        "Always 1; the agent's version in a label.",
    );
    e.sample(
        "vmmagent_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1u64,
    );
    if let Some(vms) = &vms {
        write_vms(&mut e, vms, ctx.config.allocatable);
    }
    ctx.metrics.write_kept(&mut e);
    write_boot_slots(&mut e, &ctx.boot_slots);
    write_usage(&mut e, &usages);
    e.finish()
}

/// The start admission limit: guests booting, starts waiting, the limit.
fn write_boot_slots(e: &mut Exposition, slots: &crate::boot_slots::BootSlots) {
    e.family(
        "vmmagent_boots_in_flight",
        Kind::Gauge,
        "Guests booting now (holding a boot slot until their boot-complete signal).",
    );
    e.sample("vmmagent_boots_in_flight", &[], slots.in_flight() as u64);
    e.family(
        "vmmagent_boots_waiting",
        Kind::Gauge,
        "Starts waiting for a boot slot.",
    );
    e.sample("vmmagent_boots_waiting", &[], slots.waiting() as u64);
    e.family(
        "vmmagent_boots_max",
        Kind::Gauge,
        "The most guests booting at once (--max-concurrent-boots; 0: no limit).",
    );
    e.sample("vmmagent_boots_max", &[], slots.limit().unwrap_or(0) as u64);
}

/// VMs by state, and the host's allocatable and allocated vCPUs and memory.
fn write_vms(e: &mut Exposition, vms: &[crate::proto::Vm], allocatable: crate::store::Capacity) {
    let (mut vcpus, mut memory_mib) = (0u64, 0u64);
    let mut by_state: BTreeMap<i32, u64> = BTreeMap::new();
    for vm in vms {
        *by_state.entry(vm.state).or_default() += 1;
        if holds_resources(vm.state()) {
            let spec = vm.spec.clone().unwrap_or_default();
            vcpus += u64::from(spec.vcpus);
            memory_mib += spec.memory_mib;
        }
    }
    e.family("vmmagent_vms", Kind::Gauge, "VMs of this agent, by state.");
    for (state, name) in STATES {
        let n = by_state.get(&(state as i32)).copied().unwrap_or(0);
        e.sample("vmmagent_vms", &[("state", name)], n);
    }
    let host = [
        (
            "vmmagent_host_allocatable_vcpus",
            "vCPUs VMs may hold in all (host CPUs times the overcommit, minus the reserve).",
            allocatable.vcpus,
        ),
        (
            "vmmagent_host_allocated_vcpus",
            "vCPUs held by VMs in every state but STOPPED and FAILED.",
            vcpus,
        ),
        (
            "vmmagent_host_allocatable_memory_bytes",
            "Memory VMs may hold in all (MemTotal minus the reserve).",
            allocatable.memory_mib << 20,
        ),
        (
            "vmmagent_host_allocated_memory_bytes",
            "Guest memory held by VMs in every state but STOPPED and FAILED.",
            memory_mib << 20,
        ),
    ];
    for (name, help, value) in host {
        e.family(name, Kind::Gauge, help);
        e.sample(name, &[], value);
    }
}

/// Each VM's usage: CPU, memory, disk and network.
fn write_usage(e: &mut Exposition, usages: &[VmUsage]) {
    e.family(
        "vmmagent_vm_cpu_seconds_total",
        Kind::Counter,
        "CPU time of the VM's vmm process (user and system, its vCPU threads included); restarts at 0 with each new vmm process.",
    );
    for u in usages {
        e.sample(
            "vmmagent_vm_cpu_seconds_total",
            &[("vm_id", &u.vm_id)],
            u.cpu_seconds,
        );
    }
    e.family(
        "vmmagent_vm_resident_memory_bytes",
        Kind::Gauge,
        "Resident memory of the VM's vmm process, the guest memory it has touched included.",
    );
    for u in usages {
        e.sample(
            "vmmagent_vm_resident_memory_bytes",
            &[("vm_id", &u.vm_id)],
            u.resident_bytes,
        );
    }
    type DriveField = fn(&vmm_api::control::DriveMetrics) -> u64;
    let drive_counters: [(&str, &str, DriveField); 4] = [
        (
            "vmmagent_vm_disk_read_bytes_total",
            "Bytes the guest read from the drive.",
            |d| d.read_bytes,
        ),
        (
            "vmmagent_vm_disk_written_bytes_total",
            "Bytes the guest wrote to the drive.",
            |d| d.write_bytes,
        ),
        (
            "vmmagent_vm_disk_reads_completed_total",
            "Read requests of the guest completed.",
            |d| d.reads,
        ),
        (
            "vmmagent_vm_disk_writes_completed_total",
            "Write requests of the guest completed.",
            |d| d.writes,
        ),
    ];
    for (name, help, field) in drive_counters {
        e.family(name, Kind::Counter, help);
        for u in usages {
            for d in u.devices.iter().flat_map(|m| &m.drives) {
                e.sample(name, &[("vm_id", &u.vm_id), ("drive", &d.id)], field(d));
            }
        }
    }
    type NetField = fn(&vmm_api::control::NetMetrics) -> u64;
    let net_counters: [(&str, &str, NetField); 5] = [
        (
            "vmmagent_vm_network_receive_bytes_total",
            "Bytes delivered to the guest by the NIC.",
            |n| n.rx_bytes,
        ),
        (
            "vmmagent_vm_network_transmit_bytes_total",
            "Bytes the guest sent through the NIC.",
            |n| n.tx_bytes,
        ),
        (
            "vmmagent_vm_network_receive_packets_total",
            "Frames delivered to the guest by the NIC.",
            |n| n.rx_frames,
        ),
        (
            "vmmagent_vm_network_transmit_packets_total",
            "Frames the guest sent through the NIC.",
            |n| n.tx_frames,
        ),
        (
            "vmmagent_vm_network_dropped_total",
            "Frames the NIC dropped either way.",
            |n| n.dropped,
        ),
    ];
    for (name, help, field) in net_counters {
        e.family(name, Kind::Counter, help);
        for u in usages {
            for n in u.devices.iter().flat_map(|m| &m.nets) {
                e.sample(name, &[("vm_id", &u.vm_id), ("nic", &n.id)], field(n));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_api::control::{DriveMetrics, NetMetrics, VmMetrics};

    #[test]
    fn methods_come_from_the_descriptor_sets() {
        let m = Metrics::new();
        assert_eq!(
            m.method_label("/vmmagent.v1.VmService/CreateVm"),
            "/vmmagent.v1.VmService/CreateVm"
        );
        assert_eq!(
            m.method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(
            m.method_label("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        );
        assert_eq!(m.method_label("/vmmagent.v1.VmService/Nope"), UNKNOWN_METHOD);
        assert_eq!(m.method_label("garbage\n\"x"), UNKNOWN_METHOD);
    }

    #[test]
    fn kept_figures_are_written() {
        let m = Metrics::with_methods(HashSet::from(["/a.S/M".to_string()]));
        m.observe_rpc(
            m.method_label("/a.S/M"),
            tonic::Code::Ok,
            Duration::from_millis(3),
        );
        m.observe_rpc(
            m.method_label("/a.S/M"),
            tonic::Code::Ok,
            Duration::from_millis(30),
        );
        m.observe_rpc(m.method_label("/x"), tonic::Code::Unimplemented, Duration::ZERO);
        m.observe_start_to_running(Duration::from_millis(40));
        m.count_scrape_error("timeout");
        let mut e = Exposition::new();
        m.write_kept(&mut e);
        let text = e.finish();
        for line in [
            "vmmagent_rpc_requests_total{method=\"/a.S/M\",code=\"OK\"} 2",
            "vmmagent_rpc_requests_total{method=\"unknown\",code=\"UNIMPLEMENTED\"} 1",
            "vmmagent_rpc_duration_seconds_bucket{method=\"/a.S/M\",code=\"OK\",le=\"0.005\"} 1",
            "vmmagent_rpc_duration_seconds_bucket{method=\"/a.S/M\",code=\"OK\",le=\"+Inf\"} 2",
            "vmmagent_rpc_duration_seconds_count{method=\"/a.S/M\",code=\"OK\"} 2",
            "vmmagent_vm_start_to_running_seconds_bucket{le=\"0.05\"} 1",
            "vmmagent_vm_start_to_running_seconds_count 1",
            "vmmagent_vm_start_to_boot_complete_seconds_count 0",
            "vmmagent_scrape_errors_total{reason=\"timeout\"} 1",
            "vmmagent_scrape_errors_total{reason=\"process\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn every_state_is_written_and_allocation_counts_holding_vms() {
        let vm = |state: VmState, vcpus, memory_mib| crate::proto::Vm {
            state: state as i32,
            spec: Some(crate::proto::VmSpec {
                vcpus,
                memory_mib,
                ..Default::default()
            }),
            ..Default::default()
        };
        let vms = [
            vm(VmState::Running, 2, 256),
            vm(VmState::Running, 1, 128),
            vm(VmState::Stopped, 4, 1024),
        ];
        let mut e = Exposition::new();
        let allocatable = crate::store::Capacity {
            vcpus: 8,
            memory_mib: 4096,
        };
        write_vms(&mut e, &vms, allocatable);
        let text = e.finish();
        for line in [
            "vmmagent_vms{state=\"running\"} 2",
            "vmmagent_vms{state=\"stopped\"} 1",
            "vmmagent_vms{state=\"paused\"} 0",
            "vmmagent_vms{state=\"failed\"} 0",
            "vmmagent_host_allocated_vcpus 3",
            "vmmagent_host_allocatable_vcpus 8",
            "vmmagent_host_allocated_memory_bytes 402653184",
            "vmmagent_host_allocatable_memory_bytes 4294967296",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert_eq!(text.matches("vmmagent_vms{").count(), STATES.len());
    }

    #[test]
    fn usage_is_written_per_vm_and_device() {
        let devices = VmMetrics {
            guest_boot_ms: None,
            vmm_rss_kib: 0,
            vcpu_exits: BTreeMap::new(),
            drives: vec![DriveMetrics {
                id: "disk0".into(),
                reads: 3,
                writes: 1,
                flushes: 0,
                discards: 0,
                read_bytes: 12288,
                write_bytes: 512,
                invalid_requests: 0,
                io_errors: 0,
                throttled: 0,
                interrupts: 0,
            }],
            nets: vec![NetMetrics {
                id: "eth0".into(),
                rx_frames: 2,
                rx_bytes: 100,
                rx_coalesced: 0,
                tx_frames: 1,
                tx_bytes: 60,
                dropped: 0,
                rx_no_buffers: 0,
                throttled: 0,
                interrupts: 0,
            }],
            balloon: None,
        };
        let usages = [
            VmUsage {
                vm_id: "web\"1".into(),
                cpu_seconds: 1.5,
                resident_bytes: 4096,
                devices: Some(devices),
            },
            VmUsage {
                vm_id: "quiet".into(),
                cpu_seconds: 0.25,
                resident_bytes: 8192,
                devices: None,
            },
        ];
        let mut e = Exposition::new();
        write_usage(&mut e, &usages);
        let text = e.finish();
        for line in [
            "vmmagent_vm_cpu_seconds_total{vm_id=\"web\\\"1\"} 1.5",
            "vmmagent_vm_cpu_seconds_total{vm_id=\"quiet\"} 0.25",
            "vmmagent_vm_resident_memory_bytes{vm_id=\"quiet\"} 8192",
            "vmmagent_vm_disk_read_bytes_total{vm_id=\"web\\\"1\",drive=\"disk0\"} 12288",
            "vmmagent_vm_disk_written_bytes_total{vm_id=\"web\\\"1\",drive=\"disk0\"} 512",
            "vmmagent_vm_network_receive_bytes_total{vm_id=\"web\\\"1\",nic=\"eth0\"} 100",
            "vmmagent_vm_network_transmit_bytes_total{vm_id=\"web\\\"1\",nic=\"eth0\"} 60",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // A VM without device figures still has its CPU and memory, and no device series.
        assert!(!text.contains("vm_id=\"quiet\",drive"));
    }
}
