//! `vmmctl`: the operator CLI of vmm-agent. Human tables by default, `--json` for scripts.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use tonic::transport::Channel;
use vmm_agent::client::ClientTls;
use vmm_agent::proto::host_service_client::HostServiceClient;
use vmm_agent::proto::vm_service_client::VmServiceClient;
use vmm_agent::proto::{
    CreateVmRequest, DeleteVmRequest, Disk, GetConsoleRequest, GetHostRequest, GetVmRequest, Host,
    ListVmsRequest, NicSpec, PauseVmRequest, RebootVmRequest, ResumeVmRequest, StartVmRequest, StopVmRequest,
    Vm, VmSpec, VmState, WatchEventType, WatchVmsRequest,
};

mod image;
mod memory;
mod migration;
mod operation;
mod snapshot;

/// Operator CLI for vmm-agent.
#[derive(Parser, Debug)]
#[command(name = "vmmctl", version)]
struct Args {
    /// The agent: unix:PATH or tcp://HOST:PORT.
    #[arg(
        long,
        env = "VMMCTL_ENDPOINT",
        default_value = "unix:/var/lib/vmm-agent/agent.sock"
    )]
    endpoint: String,
    /// For tcp:// endpoints: the CA that the agent's certificate must chain to (PEM). Without it,
    /// a tcp:// endpoint is plain TCP (an agent run with --insecure-tcp).
    #[arg(long, env = "VMMCTL_TLS_CA", value_name = "PEM")]
    tls_ca: Option<std::path::PathBuf>,
    /// For tcp:// endpoints: our client certificate (PEM), which names our role.
    #[arg(long, env = "VMMCTL_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "VMMCTL_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create and start a VM.
    Create {
        vm_id: String,
        /// Guest kernel (absolute path on the agent's host); not with --image.
        #[arg(long, default_value = "")]
        kernel: String,
        /// Boot from this base image (its kernel, initrd, and a copy-on-write overlay of its
        /// rootfs as the root disk).
        #[arg(long, default_value = "")]
        image: String,
        #[arg(long, default_value = "")]
        initrd: String,
        #[arg(long, default_value = "")]
        cmdline: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, default_value_t = 128)]
        memory_mib: u64,
        /// path=IMAGE[,ro][,root], or image=ID[,ro] (a copy-on-write overlay of that base
        /// image's rootfs); may be repeated.
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// KEY=VALUE; may be repeated.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// tap=TAP[,id=ID][,mac=MAC] (an existing TAP device), or
        /// bridge=BRIDGE[,id=ID][,mac=MAC][,mtu=N] (a tap the agent makes on that bridge; `bridge`
        /// alone: on the agent's --bridge); may be repeated.
        #[arg(long = "nic")]
        nics: Vec<String>,
        /// Track written pages, for diff snapshots.
        #[arg(long)]
        track_dirty_pages: bool,
        #[command(flatten)]
        memory: memory::MemoryOptions,
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Show one VM.
    Get { vm_id: String },
    /// List VMs.
    List {
        /// Label selector: k=v,k!=v,k,!k.
        #[arg(long, default_value = "")]
        selector: String,
        /// Only these states (running, paused, stopped, ...); may be repeated.
        #[arg(long = "state")]
        states: Vec<String>,
        #[arg(long, default_value_t = 0)]
        page_size: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Start a stopped VM.
    Start {
        vm_id: String,
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Stop a VM (guest shutdown, then hard after the timeout).
    Stop {
        vm_id: String,
        #[arg(long, default_value_t = 0)]
        timeout_ms: u64,
        /// Stop at once.
        #[arg(long)]
        force: bool,
        /// Return at once with the operation (StopVmAsync).
        #[arg(long = "async")]
        no_wait: bool,
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Pause a running VM.
    Pause {
        vm_id: String,
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Resume a paused VM.
    Resume {
        vm_id: String,
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Stop and start a VM.
    Reboot {
        vm_id: String,
        #[arg(long, default_value_t = 0)]
        timeout_ms: u64,
        /// Return at once with the operation (RebootVmAsync).
        #[arg(long = "async")]
        no_wait: bool,
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Set a VM's memory target (its balloon holds the rest).
    Update(memory::UpdateArgs),
    /// Show a running VM's balloon: target, actual size, guest statistics, counters.
    Balloon { vm_id: String },
    /// Stop a VM hard and forget it.
    Delete {
        vm_id: String,
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Stream the VM list and its changes.
    Watch {
        #[arg(long, default_value_t = 0)]
        from_revision: u64,
    },
    /// Print the serial console.
    Console {
        vm_id: String,
        /// Bytes before the end to start at.
        #[arg(long, default_value_t = 0)]
        tail: u64,
        /// Keep printing as output comes.
        #[arg(long)]
        follow: bool,
        /// With --follow: exit 0 once this text has been printed.
        #[arg(long)]
        until: Option<String>,
        /// Give up (exit 1) after this many seconds.
        #[arg(long)]
        timeout_s: Option<u64>,
    },
    /// Show the host: capacity, allocation, VMs by state, versions.
    Host,
    /// Long-running operations: list, get, wait, cancel.
    #[command(subcommand)]
    Operation(operation::OperationCmd),
    /// Base images: register, upload, get, list, delete.
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Snapshots: create, restore, get, list, delete.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCmd),
    /// Live-migrate a VM to another host's agent, drawing its progress.
    Migrate(migration::MigrateArgs),
    /// A VM's live migration: watch, cancel.
    #[command(subcommand)]
    Migration(migration::MigrationCmd),
}

fn state_name(state: i32) -> String {
    VmState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("VM_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| state.to_string())
}

fn parse_state(name: &str) -> Result<i32> {
    VmState::from_str_name(&format!("VM_STATE_{}", name.to_ascii_uppercase()))
        .map(|s| s as i32)
        .ok_or_else(|| anyhow!("unknown state '{name}'"))
}

fn parse_kv(what: &str, items: &[String]) -> Result<HashMap<String, String>> {
    items
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("{what} must be KEY=VALUE, got '{l}'"))
        })
        .collect()
}

fn parse_disk(spec: &str) -> Result<Disk> {
    let mut disk = Disk::default();
    for item in spec.split(',') {
        match item.split_once('=') {
            Some(("path", p)) => disk.path = p.to_string(),
            Some(("image", i)) => disk.image_id = i.to_string(),
            None if item == "ro" => disk.read_only = true,
            None if item == "root" => disk.root = true,
            _ => bail!("--disk takes path=IMAGE[,ro][,root] or image=ID[,ro], got '{spec}'"),
        }
    }
    Ok(disk)
}

/// `--nic`; the id defaults to `eth<index>`, as the guest names it.
fn parse_nic(spec: &str, index: usize) -> Result<NicSpec> {
    let mut nic = NicSpec {
        id: format!("eth{index}"),
        ..Default::default()
    };
    for item in spec.split(',') {
        match item.split_once('=') {
            Some(("tap", t)) => nic.tap = t.to_string(),
            Some(("id", i)) => nic.id = i.to_string(),
            Some(("mac", m)) => nic.mac = m.to_string(),
            Some(("bridge", b)) => nic.bridge = b.to_string(),
            Some(("mtu", m)) => {
                nic.mtu = m
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--nic {spec}: mtu '{m}' is not a number"))?
            }
            // A tap the agent makes, on its --bridge.
            None if item == "bridge" => {}
            _ => bail!(
                "--nic takes tap=TAP[,id=ID][,mac=MAC] or bridge[=BRIDGE][,id=ID][,mac=MAC][,mtu=N], got '{spec}'"
            ),
        }
    }
    Ok(nic)
}

fn vm_json(vm: &Vm) -> Value {
    let spec = vm.spec.clone().unwrap_or_default();
    json!({
        "vm_id": vm.vm_id,
        "state": state_name(vm.state),
        "state_reason": vm.state_reason,
        "pid": vm.pid,
        "exit_code": vm.exit_code,
        "boot_ms": vm.boot_ms,
        "create_time_ms": vm.create_time_ms,
        "update_time_ms": vm.update_time_ms,
        "revision": vm.revision,
        "restored_from": vm.restored_from,
        "jail_uid": vm.jail_uid,
        "nic_taps": vm.nic_taps.iter().map(|t| json!({"nic_id": t.nic_id, "tap": t.tap, "bridge": t.bridge, "mtu": t.mtu})).collect::<Vec<_>>(),
        "spec": {
            "vcpus": spec.vcpus,
            "memory_mib": spec.memory_mib,
            "image_id": spec.image_id,
            "kernel": spec.kernel,
            "initrd": spec.initrd,
            "cmdline": spec.cmdline,
            "disks": spec.disks.iter().map(|d| json!({"path": d.path, "read_only": d.read_only, "root": d.root, "image_id": d.image_id})).collect::<Vec<_>>(),
            "labels": spec.labels,
            "nics": spec.nics.iter().map(|n| json!({"id": n.id, "tap": n.tap, "mac": n.mac, "bridge": n.bridge, "mtu": n.mtu})).collect::<Vec<_>>(),
            "memory": memory::spec_json(&spec),
        },
    })
}

fn host_json(h: &Host) -> Value {
    let by_state: HashMap<String, u32> = h
        .vms_by_state
        .iter()
        .map(|c| (state_name(c.state), c.count))
        .collect();
    json!({
        "hostname": h.hostname, "cpus": h.cpus, "memory_mib": h.memory_mib,
        "allocatable_vcpus": h.allocatable_vcpus, "allocatable_memory_mib": h.allocatable_memory_mib,
        "allocated_vcpus": h.allocated_vcpus, "allocated_memory_mib": h.allocated_memory_mib,
        "vms_by_state": by_state, "kvm_available": h.kvm_available, "kvm_module": h.kvm_module,
        "agent_version": h.agent_version, "vmm_version": h.vmm_version,
        "kernel_release": h.kernel_release, "labels": h.labels,
    })
}

fn labels_text(labels: &HashMap<String, String>) -> String {
    let mut items: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    items.sort();
    items.join(",")
}

fn print_table(vms: &[Vm]) {
    println!(
        "{:<24} {:<9} {:>7} {:>9} {:>5} {:>8} {:<24} REASON",
        "ID", "STATE", "PID", "JAIL_UID", "VCPUS", "MEM_MIB", "LABELS"
    );
    // 0 is "none" for both: no process, not jailed.
    let or_dash = |n: u32| if n == 0 { "-".to_string() } else { n.to_string() };
    for vm in vms {
        let spec = vm.spec.clone().unwrap_or_default();
        println!(
            "{:<24} {:<9} {:>7} {:>9} {:>5} {:>8} {:<24} {}",
            vm.vm_id,
            state_name(vm.state),
            or_dash(vm.pid),
            or_dash(vm.jail_uid),
            spec.vcpus,
            spec.memory_mib,
            labels_text(&spec.labels),
            vm.state_reason
        );
    }
}

fn print_vm(vm: &Vm, as_json: bool) {
    if as_json {
        println!("{}", vm_json(vm));
    } else {
        print_table(std::slice::from_ref(vm));
    }
}

/// Turns a status into a short error that keeps the code visible.
fn status(e: tonic::Status) -> anyhow::Error {
    anyhow!("{:?}: {}", e.code(), e.message())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmmctl: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmmctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let identity = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
        _ => None,
    };
    let tls = match &args.tls_ca {
        Some(ca) => Some(ClientTls {
            ca: read(ca)?,
            identity,
        }),
        None if identity.is_some() => bail!("--tls-cert needs --tls-ca"),
        None => None,
    };
    let channel: Channel = vmm_agent::client::connect(&args.endpoint, tls)
        .await
        .map_err(|e| anyhow!("{}", vmm_agent::error::ErrorChain(&e)))
        .with_context(|| format!("agent at {}", args.endpoint))?;
    let mut vms = VmServiceClient::new(channel.clone());
    let j = args.json;
    match args.command {
        Cmd::Create {
            vm_id,
            kernel,
            image,
            initrd,
            cmdline,
            vcpus,
            memory_mib,
            disks,
            labels,
            nics,
            track_dirty_pages,
            memory,
            request_id,
        } => {
            let mut spec = VmSpec {
                vcpus,
                memory_mib,
                kernel,
                cmdline,
                initrd,
                disks: disks.iter().map(|d| parse_disk(d)).collect::<Result<_>>()?,
                labels: parse_kv("--label", &labels)?,
                nics: nics
                    .iter()
                    .enumerate()
                    .map(|(i, n)| parse_nic(n, i))
                    .collect::<Result<_>>()?,
                track_dirty_pages,
                image_id: image,
                ..Default::default()
            };
            memory.apply(&mut spec)?;
            let vm = vms
                .create_vm(CreateVmRequest {
                    vm_id,
                    spec: Some(spec),
                    request_id,
                })
                .await
                .map_err(status)?;
            print_vm(vm.get_ref(), j);
        }
        Cmd::Get { vm_id } => {
            let vm = vms.get_vm(GetVmRequest { vm_id }).await.map_err(status)?;
            print_vm(vm.get_ref(), j);
        }
        Cmd::List {
            selector,
            states,
            page_size,
            page_token,
        } => {
            let states = states.iter().map(|s| parse_state(s)).collect::<Result<_>>()?;
            let page = vms
                .list_vms(ListVmsRequest {
                    label_selector: selector,
                    states,
                    page_size,
                    page_token,
                })
                .await
                .map_err(status)?
                .into_inner();
            if j {
                let list: Vec<Value> = page.vms.iter().map(vm_json).collect();
                println!(
                    "{}",
                    json!({"vms": list, "next_page_token": page.next_page_token})
                );
            } else {
                print_table(&page.vms);
                if !page.next_page_token.is_empty() {
                    println!("(more: --page-token {})", page.next_page_token);
                }
            }
        }
        Cmd::Start { vm_id, request_id } => {
            let vm = vms
                .start_vm(StartVmRequest { vm_id, request_id })
                .await
                .map_err(status)?;
            print_vm(vm.get_ref(), j);
        }
        Cmd::Stop {
            vm_id,
            timeout_ms,
            force,
            no_wait,
            request_id,
        } => {
            let request = StopVmRequest {
                vm_id,
                request_id,
                timeout_ms,
                force,
            };
            if no_wait {
                let op = vms.stop_vm_async(request).await.map_err(status)?;
                operation::print_operations(std::slice::from_ref(op.get_ref()), j);
                return Ok(());
            }
            let vm = vms.stop_vm(request).await.map_err(status)?;
            print_vm(vm.get_ref(), j);
        }
        Cmd::Pause { vm_id, request_id } => {
            let vm = vms
                .pause_vm(PauseVmRequest { vm_id, request_id })
                .await
                .map_err(status)?;
            print_vm(vm.get_ref(), j);
        }
        Cmd::Resume { vm_id, request_id } => {
            let vm = vms
                .resume_vm(ResumeVmRequest { vm_id, request_id })
                .await
                .map_err(status)?;
            print_vm(vm.get_ref(), j);
        }
        Cmd::Reboot {
            vm_id,
            timeout_ms,
            no_wait,
            request_id,
        } => {
            let request = RebootVmRequest {
                vm_id,
                request_id,
                timeout_ms,
            };
            if no_wait {
                let op = vms.reboot_vm_async(request).await.map_err(status)?;
                operation::print_operations(std::slice::from_ref(op.get_ref()), j);
                return Ok(());
            }
            let vm = vms.reboot_vm(request).await.map_err(status)?;
            print_vm(vm.get_ref(), j);
        }
        Cmd::Delete { vm_id, request_id } => {
            vms.delete_vm(DeleteVmRequest {
                vm_id: vm_id.clone(),
                request_id,
            })
            .await
            .map_err(status)?;
            if j {
                println!("{}", json!({"deleted": vm_id}));
            } else {
                println!("deleted {vm_id}");
            }
        }
        Cmd::Watch { from_revision } => {
            let mut stream = vms
                .watch_vms(WatchVmsRequest { from_revision })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(event) = stream.message().await.map_err(status)? {
                let kind = WatchEventType::try_from(event.r#type)
                    .map(|t| {
                        t.as_str_name()
                            .trim_start_matches("WATCH_EVENT_TYPE_")
                            .to_ascii_lowercase()
                    })
                    .unwrap_or_default();
                if j {
                    let vm = event.vm.as_ref().map(vm_json);
                    println!("{}", json!({"revision": event.revision, "type": kind, "vm": vm}));
                } else {
                    match &event.vm {
                        Some(vm) => println!(
                            "{:>6} {:<8} {:<24} {:<9} {}",
                            event.revision,
                            kind,
                            vm.vm_id,
                            state_name(vm.state),
                            vm.state_reason
                        ),
                        None => println!("{:>6} {kind}", event.revision),
                    }
                }
            }
        }
        Cmd::Console {
            vm_id,
            tail,
            follow,
            until,
            timeout_s,
        } => {
            let read = async {
                let mut stream = vms
                    .get_console(GetConsoleRequest {
                        vm_id,
                        tail_bytes: tail,
                        follow: follow || until.is_some(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                let mut seen = Vec::new();
                let mut out = std::io::stdout();
                while let Some(chunk) = stream.message().await.map_err(status)? {
                    out.write_all(&chunk.data)?;
                    out.flush()?;
                    if let Some(text) = &until {
                        seen.extend_from_slice(&chunk.data);
                        if seen.windows(text.len()).any(|w| w == text.as_bytes()) {
                            return Ok(());
                        }
                        // Keep only what a match could still start in.
                        let keep = seen.len().saturating_sub(text.len());
                        seen.drain(..keep);
                    }
                }
                match until {
                    Some(text) => bail!("the console ended without '{text}'"),
                    None => Ok(()),
                }
            };
            match timeout_s {
                Some(s) => tokio::time::timeout(Duration::from_secs(s), read)
                    .await
                    .map_err(|_| anyhow!("timed out after {s} s"))??,
                None => read.await?,
            }
        }
        Cmd::Update(args) => memory::update(channel, args, j).await?,
        Cmd::Balloon { vm_id } => memory::balloon(channel, vm_id, j).await?,
        Cmd::Snapshot(cmd) => snapshot::run(channel, cmd, j).await?,
        Cmd::Image(cmd) => image::run(channel, cmd, j).await?,
        Cmd::Migrate(args) => migration::migrate(channel, args, j).await?,
        Cmd::Migration(cmd) => migration::run(channel, cmd, j).await?,
        Cmd::Operation(cmd) => operation::run(channel, cmd, j).await?,
        Cmd::Host => {
            let host = HostServiceClient::new(channel)
                .get_host(GetHostRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if j {
                println!("{}", host_json(&host));
            } else {
                let v = host_json(&host);
                if let Value::Object(map) = v {
                    for (k, v) in map {
                        println!("{k:<24} {v}");
                    }
                }
            }
        }
    }
    Ok(())
}
