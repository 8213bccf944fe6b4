//! `vmmctl operation ...`: list, show, wait for and cancel long-running operations, and the
//! progress line that every waiting command draws.

use std::io::{IsTerminal, Write};

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use tonic::transport::Channel;
use vmm_agent::proto::operations_service_client::OperationsServiceClient;
use vmm_agent::proto::{
    operation, operation_response, CancelOperationRequest, GetOperationRequest, ListOperationsRequest,
    Operation, OperationKind, WaitOperationRequest,
};

use super::status;

#[derive(Subcommand, Debug)]
pub enum OperationCmd {
    /// List operations, newest first.
    List {
        /// Only operations on this VM.
        #[arg(long, default_value = "")]
        vm: String,
        /// Only this kind: stop-vm, reboot-vm, create-snapshot, restore-snapshot.
        #[arg(long)]
        kind: Option<String>,
        /// Only running (true) or finished (false) ones.
        #[arg(long)]
        running: Option<bool>,
    },
    /// Show one operation.
    Get { name: String },
    /// Wait for an operation to end, drawing its progress; fails if the operation failed.
    Wait { name: String },
    /// Ask an operation to stop early.
    Cancel { name: String },
}

fn kind_name(kind: i32) -> String {
    OperationKind::try_from(kind)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("OPERATION_KIND_")
                .to_lowercase()
                .replace('_', "-")
        })
        .unwrap_or_else(|_| kind.to_string())
}

fn parse_kind(name: &str) -> Result<OperationKind> {
    let wanted = format!("OPERATION_KIND_{}", name.to_uppercase().replace('-', "_"));
    OperationKind::from_str_name(&wanted).ok_or_else(|| anyhow!("unknown operation kind '{name}'"))
}

fn outcome(op: &Operation) -> String {
    match &op.result {
        _ if !op.done => "running".into(),
        Some(operation::Result::Error(e)) => format!("error {}: {}", e.code, e.message),
        Some(operation::Result::Response(_)) => "ok".into(),
        None => "done".into(),
    }
}

fn operation_json(op: &Operation) -> Value {
    let m = op.metadata.clone().unwrap_or_default();
    let p = m.progress.unwrap_or_default();
    json!({
        "name": op.name, "kind": kind_name(m.kind), "vm_id": m.vm_id, "done": op.done,
        "outcome": outcome(op), "done_bytes": p.done_bytes, "total_bytes": p.total_bytes,
        "create_time_ms": m.create_time_ms, "update_time_ms": m.update_time_ms,
        "cancel_requested": m.cancel_requested,
    })
}

/// Prints operations as a table or JSON lines.
pub fn print_operations(ops: &[Operation], as_json: bool) {
    if as_json {
        for op in ops {
            println!("{}", operation_json(op));
        }
        return;
    }
    println!("{:<42} {:<17} {:<20} OUTCOME", "NAME", "KIND", "VM");
    for op in ops {
        let m = op.metadata.clone().unwrap_or_default();
        println!(
            "{:<42} {:<17} {:<20} {}",
            op.name,
            kind_name(m.kind),
            m.vm_id,
            outcome(op)
        );
    }
}

/// Waits for `op` to end, drawing its progress on a terminal; fails with the operation's error.
pub async fn wait(channel: &Channel, op: Operation) -> Result<operation_response::Value> {
    let mut ops = OperationsServiceClient::new(channel.clone());
    let tty = std::io::stderr().is_terminal();
    let mut op = op;
    while !op.done {
        if tty {
            let p = op.metadata.as_ref().and_then(|m| m.progress).unwrap_or_default();
            let percent = (100 * p.done_bytes).checked_div(p.total_bytes).unwrap_or(0);
            let width = 30;
            let filled = (percent as usize * width / 100).min(width);
            let mib = |b: u64| b as f64 / f64::from(1 << 20);
            eprint!(
                "\r{} [{}{}] {percent:>3}% {:.1}/{:.1} MiB ",
                op.name,
                "#".repeat(filled),
                ".".repeat(width - filled),
                mib(p.done_bytes),
                mib(p.total_bytes)
            );
            let _ = std::io::stderr().flush();
        }
        op = ops
            .wait_operation(WaitOperationRequest {
                name: op.name.clone(),
                timeout_ms: 250,
            })
            .await
            .map_err(status)?
            .into_inner();
    }
    if tty {
        eprintln!();
    }
    match op.result {
        Some(operation::Result::Response(r)) => r
            .value
            .ok_or_else(|| anyhow!("{} ended without a result", op.name)),
        Some(operation::Result::Error(e)) => {
            bail!("{}: {} (code {})", op.name, e.message, e.code)
        }
        None => bail!("{} ended without a result", op.name),
    }
}

/// Runs one operation subcommand.
pub async fn run(channel: Channel, cmd: OperationCmd, as_json: bool) -> Result<()> {
    let mut ops = OperationsServiceClient::new(channel.clone());
    match cmd {
        OperationCmd::List { vm, kind, running } => {
            let kind = kind.as_deref().map(parse_kind).transpose()?;
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = ops
                    .list_operations(ListOperationsRequest {
                        vm_id: vm.clone(),
                        kind: kind.map_or(0, |k| k as i32),
                        done: running.map(|r| !r),
                        page_size: 0,
                        page_token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                all.extend(page.operations);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print_operations(&all, as_json);
        }
        OperationCmd::Get { name } => {
            let op = ops
                .get_operation(GetOperationRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            print_operations(&[op], as_json);
        }
        OperationCmd::Wait { name } => {
            let op = ops
                .get_operation(GetOperationRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            let name = op.name.clone();
            wait(&channel, op).await?;
            let done = ops
                .get_operation(GetOperationRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            print_operations(&[done], as_json);
        }
        OperationCmd::Cancel { name } => {
            let op = ops
                .cancel_operation(CancelOperationRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            print_operations(&[op], as_json);
        }
    }
    Ok(())
}
