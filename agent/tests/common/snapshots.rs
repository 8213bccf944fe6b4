//! Snapshots and restores through the agent's operations, for the tests that take them.

use anyhow::{bail, Context, Result};
use tonic::transport::Channel;
use vmm_agent::proto::operations_service_client::OperationsServiceClient;
use vmm_agent::proto::snapshot_service_client::SnapshotServiceClient;
use vmm_agent::proto::{
    operation, operation_response, CreateSnapshotRequest, NicOverride, Operation, OperationKind,
    RestoreSnapshotRequest, Snapshot, SnapshotKind, Vm, WaitOperationRequest,
};

/// Waits (up to 5 minutes) until `op` is done.
pub async fn wait_done(channel: &Channel, op: Operation) -> Result<Operation> {
    let mut ops = OperationsServiceClient::new(channel.clone());
    let op = ops
        .wait_operation(WaitOperationRequest {
            name: op.name,
            timeout_ms: 300_000,
        })
        .await?
        .into_inner();
    if !op.done {
        bail!("not done after the wait: {op:?}");
    }
    Ok(op)
}

/// The response of a successful operation.
pub fn response(op: &Operation) -> Result<&operation_response::Value> {
    match &op.result {
        Some(operation::Result::Response(r)) => r.value.as_ref().context("no value"),
        other => bail!("{} failed: {other:?}", op.name),
    }
}

/// A snapshot of `vm_id` labelled tier=gold.
pub fn create(vm_id: &str, snapshot_id: &str, kind: SnapshotKind) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        vm_id: vm_id.into(),
        snapshot_id: snapshot_id.into(),
        kind: kind as i32,
        labels: [("tier".to_string(), "gold".to_string())].into(),
        ..Default::default()
    }
}

/// A restore of `snapshot_id` as `vm_id` with eth0 on `tap`.
pub fn restore(snapshot_id: &str, vm_id: &str, tap: &str) -> RestoreSnapshotRequest {
    RestoreSnapshotRequest {
        snapshot_id: snapshot_id.into(),
        vm_id: vm_id.into(),
        nics: vec![NicOverride {
            id: "eth0".into(),
            tap: tap.into(),
        }],
        ..Default::default()
    }
}

/// Takes the snapshot `request` asks for and waits until it is ready.
pub async fn snapshot_of(
    snaps: &mut SnapshotServiceClient<Channel>,
    channel: &Channel,
    request: CreateSnapshotRequest,
) -> Result<Snapshot> {
    let op = snaps.create_snapshot(request).await?.into_inner();
    assert_eq!(
        op.metadata.as_ref().map(|m| m.kind),
        Some(OperationKind::CreateSnapshot as i32)
    );
    let op = wait_done(channel, op).await?;
    let progress = op.metadata.as_ref().and_then(|m| m.progress).unwrap_or_default();
    assert!(
        progress.total_bytes > 0 && progress.done_bytes == progress.total_bytes,
        "{progress:?}"
    );
    match response(&op)? {
        operation_response::Value::Snapshot(s) => Ok(s.clone()),
        other => bail!("a snapshot operation answered {other:?}"),
    }
}

/// Restores as `request` asks and waits for the new VM.
pub async fn restored(
    snaps: &mut SnapshotServiceClient<Channel>,
    channel: &Channel,
    request: RestoreSnapshotRequest,
) -> Result<Vm> {
    let op = snaps.restore_snapshot(request).await?.into_inner();
    let op = wait_done(channel, op).await?;
    match response(&op)? {
        operation_response::Value::Vm(vm) => Ok(vm.clone()),
        other => bail!("a restore operation answered {other:?}"),
    }
}
