//! `vmmctl snapshot ...`: create, restore, list, show and delete snapshots. Create and restore
//! wait for their operation, showing its byte progress on standard error.

use anyhow::{bail, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use tonic::transport::Channel;
use vmm_agent::proto::snapshot_service_client::SnapshotServiceClient;
use vmm_agent::proto::{
    operation_response, CreateSnapshotRequest, DeleteSnapshotRequest, GetSnapshotRequest,
    ListSnapshotsRequest, NicOverride, Operation, RestoreSnapshotRequest, Snapshot, SnapshotKind,
    SnapshotState,
};

use super::operation::wait;
use super::{parse_kv, print_vm, status};

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Snapshot a running or paused VM (paused meanwhile, then resumed).
    Create {
        vm_id: String,
        snapshot_id: String,
        /// Only the pages written since the VM's previous snapshot (needs a VM with dirty tracking).
        #[arg(long)]
        diff: bool,
        /// Leave the VM paused afterwards.
        #[arg(long)]
        leave_paused: bool,
        /// KEY=VALUE; may be repeated.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Print the operation and return at once.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Run a new VM from a snapshot.
    Restore {
        snapshot_id: String,
        vm_id: String,
        /// id=NIC,tap=TAP: put a NIC on another TAP device; may be repeated.
        #[arg(long = "nic")]
        nics: Vec<String>,
        /// KEY=VALUE (default: the snapshot's VM's labels); may be repeated.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Leave the new VM paused.
        #[arg(long)]
        paused: bool,
        /// Read the snapshot's memory into the page cache in the background.
        #[arg(long)]
        prefault: bool,
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Show one snapshot.
    Get { snapshot_id: String },
    /// List snapshots.
    List {
        /// Only snapshots of this VM.
        #[arg(long, default_value = "")]
        vm: String,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Delete a snapshot and its files.
    Delete {
        snapshot_id: String,
        #[arg(long, default_value = "")]
        request_id: String,
    },
}

fn kind_name(kind: i32) -> &'static str {
    match SnapshotKind::try_from(kind) {
        Ok(SnapshotKind::Diff) => "diff",
        _ => "full",
    }
}

fn state_name(state: i32) -> String {
    SnapshotState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("SNAPSHOT_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| state.to_string())
}

fn snapshot_json(s: &Snapshot) -> Value {
    let spec = s.spec.clone().unwrap_or_default();
    json!({
        "snapshot_id": s.snapshot_id, "vm_id": s.vm_id, "kind": kind_name(s.kind),
        "base_snapshot_id": s.base_snapshot_id, "state": state_name(s.state),
        "state_reason": s.state_reason, "size_bytes": s.size_bytes, "memory_bytes": s.memory_bytes,
        "disk_bytes": s.disk_bytes, "create_time_ms": s.create_time_ms, "duration_ms": s.duration_ms,
        "vmm_version": s.vmm_version, "format_version": s.format_version, "cpu_model": s.cpu_model,
        "labels": s.labels, "vcpus": spec.vcpus, "memory_mib": spec.memory_mib,
    })
}

fn print_snapshots(snapshots: &[Snapshot], as_json: bool) {
    if as_json {
        for s in snapshots {
            println!("{}", snapshot_json(s));
        }
        return;
    }
    println!(
        "{:<24} {:<20} {:<5} {:<8} {:>10} {:>8} BASE",
        "ID", "VM", "KIND", "STATE", "SIZE_MIB", "TOOK_MS"
    );
    for s in snapshots {
        println!(
            "{:<24} {:<20} {:<5} {:<8} {:>10.1} {:>8} {}",
            s.snapshot_id,
            s.vm_id,
            kind_name(s.kind),
            state_name(s.state),
            s.size_bytes as f64 / f64::from(1 << 20),
            s.duration_ms,
            s.base_snapshot_id
        );
    }
}

pub(super) fn parse_nic_override(spec: &str) -> Result<NicOverride> {
    let kv = parse_kv("--nic", &spec.split(',').map(str::to_string).collect::<Vec<_>>())?;
    match (kv.get("id"), kv.get("tap")) {
        (Some(id), Some(tap)) if kv.len() == 2 => Ok(NicOverride {
            id: id.clone(),
            tap: tap.clone(),
        }),
        _ => bail!("--nic {spec}: expected id=NIC,tap=TAP"),
    }
}

fn print_operation(op: &Operation, as_json: bool) {
    super::operation::print_operations(std::slice::from_ref(op), as_json);
}

/// Runs one snapshot subcommand.
pub async fn run(channel: Channel, cmd: SnapshotCmd, as_json: bool) -> Result<()> {
    let mut snapshots = SnapshotServiceClient::new(channel.clone());
    match cmd {
        SnapshotCmd::Create {
            vm_id,
            snapshot_id,
            diff,
            leave_paused,
            labels,
            no_wait,
            request_id,
        } => {
            let kind = if diff {
                SnapshotKind::Diff
            } else {
                SnapshotKind::Full
            };
            let op = snapshots
                .create_snapshot(CreateSnapshotRequest {
                    vm_id,
                    snapshot_id,
                    kind: kind as i32,
                    leave_paused,
                    labels: parse_kv("--label", &labels)?,
                    request_id,
                })
                .await
                .map_err(status)?
                .into_inner();
            if no_wait {
                print_operation(&op, as_json);
                return Ok(());
            }
            match wait(&channel, op).await? {
                operation_response::Value::Snapshot(s) => print_snapshots(&[s], as_json),
                other => bail!("unexpected result {other:?}"),
            }
        }
        SnapshotCmd::Restore {
            snapshot_id,
            vm_id,
            nics,
            labels,
            paused,
            prefault,
            no_wait,
            request_id,
        } => {
            let op = snapshots
                .restore_snapshot(RestoreSnapshotRequest {
                    snapshot_id,
                    vm_id,
                    labels: parse_kv("--label", &labels)?,
                    nics: nics
                        .iter()
                        .map(|n| parse_nic_override(n))
                        .collect::<Result<_>>()?,
                    start_paused: paused,
                    prefault,
                    request_id,
                })
                .await
                .map_err(status)?
                .into_inner();
            if no_wait {
                print_operation(&op, as_json);
                return Ok(());
            }
            match wait(&channel, op).await? {
                operation_response::Value::Vm(vm) => print_vm(&vm, as_json),
                other => bail!("unexpected result {other:?}"),
            }
        }
        SnapshotCmd::Get { snapshot_id } => {
            let s = snapshots
                .get_snapshot(GetSnapshotRequest { snapshot_id })
                .await
                .map_err(status)?
                .into_inner();
            print_snapshots(&[s], as_json);
        }
        SnapshotCmd::List { vm, selector } => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = snapshots
                    .list_snapshots(ListSnapshotsRequest {
                        vm_id: vm.clone(),
                        label_selector: selector.clone(),
                        page_size: 0,
                        page_token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                all.extend(page.snapshots);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print_snapshots(&all, as_json);
        }
        SnapshotCmd::Delete {
            snapshot_id,
            request_id,
        } => {
            snapshots
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id,
                    request_id,
                })
                .await
                .map_err(status)?;
        }
    }
    Ok(())
}
