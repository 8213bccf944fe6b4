//! `vmmctl migrate VM --to tcp://HOST:PORT` and `vmmctl migration watch|cancel VM`: live
//! migration through the source's agent, with its progress drawn on standard error.

use std::io::{IsTerminal, Write};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tonic::transport::Channel;
use vmm_agent::proto::migration_service_client::MigrationServiceClient;
use vmm_agent::proto::operations_service_client::OperationsServiceClient;
use vmm_agent::proto::{
    operation, CancelMigrationRequest, GetOperationRequest, MigrateVmRequest, MigrationPhase,
    MigrationProgress, MigrationTimeoutPolicy, WatchMigrationRequest,
};

use super::operation::print_operations;
use super::snapshot::parse_nic_override;
use super::status;

/// `vmmctl migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    vm_id: String,
    /// The destination agent's TLS listener, tcp://HOST:PORT.
    #[arg(long = "to")]
    destination: String,
    /// Longest pause of the guest at the switch-over (default 300).
    #[arg(long, default_value_t = 0)]
    max_downtime_ms: u64,
    /// Most MiB per second between the VMMs (default: unlimited).
    #[arg(long, default_value_t = 0)]
    bandwidth_mib_s: u64,
    /// How long pre-copy may go on (default 600).
    #[arg(long, default_value_t = 0)]
    timeout_s: u64,
    /// Switch over when the timeout passes instead of giving up.
    #[arg(long)]
    force_on_timeout: bool,
    /// Both hosts see the VM's disks at the same paths (else they are copied).
    #[arg(long)]
    shared_storage: bool,
    /// Never slow the guest down to make the migration converge.
    #[arg(long)]
    no_auto_converge: bool,
    /// id=NIC,tap=TAP: the TAP device a NIC uses at the destination; may be repeated.
    #[arg(long = "nic")]
    nics: Vec<String>,
    /// Print the operation and return at once.
    #[arg(long)]
    no_wait: bool,
    #[arg(long, default_value = "")]
    request_id: String,
}

/// `vmmctl migration ...`.
#[derive(Subcommand, Debug)]
pub enum MigrationCmd {
    /// Follow a VM's migration (its last one, for ten minutes after it ended).
    Watch { vm_id: String },
    /// Cancel a VM's migration: it keeps running here.
    Cancel { vm_id: String },
}

fn phase_name(p: &MigrationProgress) -> &'static str {
    match p.phase() {
        MigrationPhase::Unspecified => "unknown",
        MigrationPhase::Setup => "setup",
        MigrationPhase::PreCopy => "pre-copy",
        MigrationPhase::SwitchOver => "switch-over",
        MigrationPhase::Completed => "completed",
        MigrationPhase::Failed => "failed",
    }
}

fn progress_json(p: &MigrationProgress) -> Value {
    json!({
        "vm_id": p.vm_id,
        "operation": p.operation,
        "destination": p.destination,
        "phase": phase_name(p),
        "iteration": p.iteration,
        "memory_total_bytes": p.memory_total_bytes,
        "memory_transferred_bytes": p.memory_transferred_bytes,
        "memory_remaining_bytes": p.memory_remaining_bytes,
        "dirty_rate_bytes_per_s": p.dirty_rate_bytes_per_s,
        "throughput_bytes_per_s": p.throughput_bytes_per_s,
        "expected_downtime_ms": p.expected_downtime_ms,
        "throttle_percent": p.throttle_percent,
        "disk_total_bytes": p.disk_total_bytes,
        "disk_transferred_bytes": p.disk_transferred_bytes,
        "disk_remaining_bytes": p.disk_remaining_bytes,
        "elapsed_ms": p.elapsed_ms,
        "downtime_ms": p.downtime_ms,
        "error": p.error,
    })
}

fn draw(p: &MigrationProgress) {
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let sent = p.memory_transferred_bytes + p.disk_transferred_bytes;
    let total = p.memory_total_bytes + p.disk_total_bytes;
    let left = p.memory_remaining_bytes + p.disk_remaining_bytes;
    let percent = (100 * sent).checked_div(total).unwrap_or(0).min(100);
    let width = 30;
    let filled = percent as usize * width / 100;
    eprint!(
        "\r{} {:<11} round {:>2} [{}{}] {:.1}/{:.1} MiB, {:.1} MiB left, {:.0} MiB/s, ~{} ms down ",
        p.vm_id,
        phase_name(p),
        p.iteration,
        "#".repeat(filled),
        ".".repeat(width - filled),
        mib(sent),
        mib(total),
        mib(left),
        mib(p.throughput_bytes_per_s),
        p.expected_downtime_ms,
    );
    let _ = std::io::stderr().flush();
}

/// Follows the VM's migration to its end; fails if it failed (with the operation's error).
async fn follow(channel: &Channel, vm_id: String, as_json: bool) -> Result<()> {
    let mut stream = MigrationServiceClient::new(channel.clone())
        .watch_migration(WatchMigrationRequest { vm_id })
        .await
        .map_err(status)?
        .into_inner();
    let tty = std::io::stderr().is_terminal();
    let mut last = None;
    while let Some(p) = stream.message().await.map_err(status)? {
        if tty {
            draw(&p);
        }
        last = Some(p);
    }
    if tty {
        eprintln!();
    }
    let Some(last) = last else {
        bail!("the agent ended the watch without progress");
    };
    if last.phase() == MigrationPhase::Completed {
        if as_json {
            println!("{}", progress_json(&last));
        } else {
            println!(
                "{} migrated to {} in {} ms ({} rounds, {:.1} MiB of memory and {:.1} MiB of disk sent), downtime {} ms",
                last.vm_id,
                last.destination,
                last.elapsed_ms,
                last.iteration,
                last.memory_transferred_bytes as f64 / f64::from(1 << 20),
                last.disk_transferred_bytes as f64 / f64::from(1 << 20),
                last.downtime_ms.unwrap_or_default()
            );
        }
        return Ok(());
    }
    // The operation has the error's code.
    let op = OperationsServiceClient::new(channel.clone())
        .get_operation(GetOperationRequest {
            name: last.operation.clone(),
        })
        .await
        .map(|r| r.into_inner());
    match op.ok().and_then(|op| op.result) {
        Some(operation::Result::Error(e)) => bail!("{}: {} (code {})", last.operation, e.message, e.code),
        _ => bail!("{} did not migrate: {}", last.vm_id, last.error),
    }
}

/// Runs `vmmctl migrate`.
pub async fn migrate(channel: Channel, args: MigrateArgs, as_json: bool) -> Result<()> {
    let request = MigrateVmRequest {
        vm_id: args.vm_id.clone(),
        destination: args.destination,
        max_downtime_ms: args.max_downtime_ms,
        bandwidth_bytes_per_s: args.bandwidth_mib_s.saturating_mul(1 << 20),
        timeout_ms: args.timeout_s.saturating_mul(1000),
        on_timeout: if args.force_on_timeout {
            MigrationTimeoutPolicy::Force as i32
        } else {
            MigrationTimeoutPolicy::Cancel as i32
        },
        shared_storage: args.shared_storage,
        nics: args
            .nics
            .iter()
            .map(|n| parse_nic_override(n))
            .collect::<Result<_>>()?,
        request_id: args.request_id,
        disable_auto_converge: args.no_auto_converge,
    };
    let op = MigrationServiceClient::new(channel.clone())
        .migrate_vm(request)
        .await
        .map_err(status)?
        .into_inner();
    if args.no_wait {
        print_operations(std::slice::from_ref(&op), as_json);
        return Ok(());
    }
    follow(&channel, args.vm_id, as_json).await
}

/// Runs one `vmmctl migration` subcommand.
pub async fn run(channel: Channel, cmd: MigrationCmd, as_json: bool) -> Result<()> {
    match cmd {
        MigrationCmd::Watch { vm_id } => follow(&channel, vm_id, as_json).await,
        MigrationCmd::Cancel { vm_id } => {
            let op = MigrationServiceClient::new(channel)
                .cancel_migration(CancelMigrationRequest { vm_id })
                .await
                .map_err(status)?
                .into_inner();
            print_operations(std::slice::from_ref(&op), as_json);
            Ok(())
        }
    }
}
