//! The operations API against a real SQLite file: lifecycle of a handle, waiting, cancelling,
//! listing with filters and pages, and recovery after a "crash" (a store reopened while an
//! operation was running).

use super::*;
use crate::proto::OperationError;
use crate::store::Store;
use harness::TempDir;
use tonic::Code;

fn open(dir: &TempDir) -> Arc<Operations> {
    let store = Store::open(&dir.path().join("state.db")).unwrap();
    Operations::new(StoreHandle::new(store))
}

fn error_of(op: &Operation) -> Option<&OperationError> {
    match &op.result {
        Some(operation::Result::Error(e)) => Some(e),
        _ => None,
    }
}

#[tokio::test]
async fn a_handle_reports_progress_and_finishes() {
    let dir = TempDir::new("agent-ops").unwrap();
    let ops = open(&dir);
    let mut handle = ops.start(OperationKind::StopVm, "vm1").await.unwrap();
    let name = handle.name().to_string();
    check_name("name", &name).unwrap();
    let op = ops.get(&name).await.unwrap();
    assert!(!op.done);
    let meta = op.metadata.clone().unwrap();
    assert_eq!((meta.kind(), meta.vm_id.as_str()), (OperationKind::StopVm, "vm1"));
    handle.progress(10, 100).await;
    let progress = ops.get(&name).await.unwrap().metadata.unwrap().progress.unwrap();
    assert_eq!((progress.done_bytes, progress.total_bytes), (10, 100));
    // A wait that times out returns the operation as it is.
    let waited = ops.wait(&name, Duration::from_millis(1)).await.unwrap();
    assert!(!waited.done);
    let waiter = {
        let ops = ops.clone();
        let name = name.clone();
        tokio::spawn(async move { ops.wait(&name, Duration::from_secs(600)).await })
    };
    handle
        .finish_vm(Vm {
            vm_id: "vm1".into(),
            ..Default::default()
        })
        .await;
    let done = waiter.await.unwrap().unwrap();
    assert!(done.done);
    assert!(matches!(
        done.result,
        Some(operation::Result::Response(OperationResponse {
            value: Some(operation_response::Value::Vm(_))
        }))
    ));
    // Finished: read from the store from now on, the same.
    assert_eq!(ops.get(&name).await.unwrap(), done);
    assert_eq!(ops.wait(&name, Duration::from_secs(600)).await.unwrap(), done);
    // Cancelling a finished operation changes nothing.
    assert_eq!(ops.cancel(&name).await.unwrap(), done);
    let missing = ops.get("operations/nope").await.unwrap_err();
    assert!(matches!(missing, AgentError::OperationNotFound(_)));
}

#[tokio::test]
async fn cancel_reaches_the_worker_and_a_failure_keeps_its_code() {
    let dir = TempDir::new("agent-ops").unwrap();
    let ops = open(&dir);
    let handle = ops.start(OperationKind::RebootVm, "vm2").await.unwrap();
    let name = handle.name().to_string();
    let mut token = handle.cancel_token();
    assert!(!handle.cancelled());
    let cancelled = ops.cancel(&name).await.unwrap();
    assert!(cancelled.metadata.unwrap().cancel_requested);
    assert!(!cancelled.done, "cancellation is cooperative: the worker ends it");
    token.cancelled().await;
    assert!(handle.cancelled());
    handle
        .fail(AgentError::Cancelled("cancelled on request".into()))
        .await;
    let op = ops.get(&name).await.unwrap();
    assert!(op.done);
    let e = error_of(&op).unwrap();
    assert_eq!(
        (e.code, e.message.as_str()),
        (Code::Cancelled as i32, "cancelled on request")
    );
    // The cancel request is in the store too.
    assert!(op.metadata.unwrap().cancel_requested);
}

#[tokio::test]
async fn a_dropped_handle_fails_its_operation() {
    let dir = TempDir::new("agent-ops").unwrap();
    let ops = open(&dir);
    let handle = ops.start(OperationKind::StopVm, "vm3").await.unwrap();
    let name = handle.name().to_string();
    drop(handle);
    let op = ops.wait(&name, Duration::from_secs(600)).await.unwrap();
    assert!(op.done);
    assert_eq!(error_of(&op).unwrap().code, Code::Internal as i32);
}

#[tokio::test]
async fn listing_filters_and_pages_newest_first() {
    let dir = TempDir::new("agent-ops").unwrap();
    let ops = open(&dir);
    let mut names = Vec::new();
    for (kind, vm) in [
        (OperationKind::StopVm, "a"),
        (OperationKind::RebootVm, "a"),
        (OperationKind::StopVm, "b"),
    ] {
        let h = ops.start(kind, vm).await.unwrap();
        names.push(h.name().to_string());
        if vm == "b" {
            h.finish(OperationResponse::default()).await;
        } else {
            // Kept running: leaked on purpose for this test, so that done=false has members.
            std::mem::forget(h);
        }
    }
    let list = |f: OperationFilter, before, limit| {
        let ops = ops.clone();
        async move {
            ops.list(f, before, limit)
                .await
                .unwrap()
                .into_iter()
                .map(|(seq, op)| (seq, op.name))
                .collect::<Vec<_>>()
        }
    };
    let all = list(OperationFilter::default(), None, 10).await;
    let all_names: Vec<&str> = all.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(all_names, [&names[2], &names[1], &names[0]]);
    let by_vm = OperationFilter {
        vm_id: Some("a".into()),
        ..Default::default()
    };
    assert_eq!(list(by_vm.clone(), None, 10).await.len(), 2);
    let page = list(by_vm.clone(), None, 1).await;
    assert_eq!(page[0].1, names[1]);
    let next = list(by_vm, Some(page[0].0), 1).await;
    assert_eq!(next[0].1, names[0]);
    let stops = OperationFilter {
        kind: Some(OperationKind::StopVm),
        ..Default::default()
    };
    assert_eq!(list(stops, None, 10).await.len(), 2);
    let running = OperationFilter {
        done: Some(false),
        ..Default::default()
    };
    assert_eq!(list(running, None, 10).await.len(), 2);
    let finished = OperationFilter {
        done: Some(true),
        ..Default::default()
    };
    assert_eq!(list(finished, None, 10).await, [all[0].clone()]);
}

#[tokio::test]
async fn recovery_aborts_what_was_running_and_keeps_what_finished() {
    let dir = TempDir::new("agent-ops").unwrap();
    let (running, finished) = {
        let ops = open(&dir);
        let running = ops.start(OperationKind::StopVm, "vm").await.unwrap();
        let finished = ops.start(OperationKind::StopVm, "vm").await.unwrap();
        let names = (running.name().to_string(), finished.name().to_string());
        finished.finish(OperationResponse::default()).await;
        // The "crash": the worker never finishes, and its Drop never runs.
        std::mem::forget(running);
        names
    };
    let ops = open(&dir);
    assert_eq!(ops.recover().await.unwrap(), 1);
    let op = ops.get(&running).await.unwrap();
    assert!(op.done);
    let e = error_of(&op).unwrap();
    assert_eq!(
        (e.code, e.message.as_str()),
        (Code::Aborted as i32, ABORTED_MESSAGE)
    );
    let op = ops.get(&finished).await.unwrap();
    assert!(matches!(op.result, Some(operation::Result::Response(_))));
    assert_eq!(ops.recover().await.unwrap(), 0);
}

#[test]
fn names_are_checked() {
    for bad in ["", "operations/", "ops/x", "operations/A", "operations/x/y"] {
        assert!(check_name("name", bad).is_err(), "{bad}");
    }
    check_name("name", "operations/0123-abc").unwrap();
}
