//! Store tests against a real SQLite file in a temporary directory.

use super::*;
use harness::TempDir;

fn spec(vcpus: u32, memory_mib: u64) -> VmSpec {
    VmSpec {
        vcpus,
        memory_mib,
        kernel: "/k".into(),
        ..Default::default()
    }
}

fn vm(id: &str, state: VmState, vcpus: u32, memory_mib: u64) -> Vm {
    Vm {
        vm_id: id.into(),
        spec: Some(spec(vcpus, memory_mib)),
        state: state as i32,
        ..Default::default()
    }
}

#[test]
fn migrations_apply_once_and_refuse_newer_schemas() {
    let dir = TempDir::new("agent-store").unwrap();
    let path = dir.path().join("state.db");
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
    let mode: String = store
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    drop(store);
    // Reopening applies nothing again (the CREATE TABLEs would fail).
    let store = Store::open(&path).unwrap();
    store.conn.pragma_update(None, "user_version", 99).unwrap();
    drop(store);
    assert!(matches!(Store::open(&path), Err(StoreError::TooNew(99))));
}

#[test]
fn revisions_events_and_persistence() {
    let dir = TempDir::new("agent-store").unwrap();
    let path = dir.path().join("state.db");
    let mut store = Store::open(&path).unwrap();
    let mut rx = store.subscribe();
    let a = store
        .create_vm(vm("a", VmState::Stopped, 1, 64), None, None)
        .unwrap();
    assert_eq!(a.revision, 1);
    let b = store
        .create_vm(vm("b", VmState::Stopped, 1, 64), None, None)
        .unwrap();
    assert_eq!(b.revision, 2);
    assert!(matches!(
        store.create_vm(vm("a", VmState::Stopped, 1, 64), None, None),
        Err(StoreError::Exists(_))
    ));
    let mut a2 = a.clone();
    a2.state = VmState::Running as i32;
    a2.pid = 42;
    let a2 = store.update_vm(a2, None).unwrap();
    assert_eq!((a2.revision, a2.create_time_ms), (3, a.create_time_ms));
    store.delete_vm("b").unwrap();
    assert!(matches!(store.delete_vm("b"), Err(StoreError::NotFound(_))));
    let kinds: Vec<(u64, WatchEventType)> = (0..4)
        .map(|_| rx.try_recv().unwrap())
        .map(|e| (e.revision, e.r#type()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (1, WatchEventType::Created),
            (2, WatchEventType::Created),
            (3, WatchEventType::Updated),
            (4, WatchEventType::Deleted)
        ]
    );
    drop(store);

    let store = Store::open(&path).unwrap();
    assert_eq!(store.revision().unwrap(), 4);
    let vms = store.list_vms().unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!((vms[0].pid, vms[0].state()), (42, VmState::Running));
    let after: Vec<u64> = store
        .events_after(2)
        .unwrap()
        .iter()
        .map(|e| e.revision)
        .collect();
    assert_eq!(after, vec![3, 4]);
    assert!(store.events_after(4).unwrap().is_empty());
    assert!(matches!(store.events_after(5), Err(StoreError::Compacted { .. })));
    let deleted = &store.events_after(3).unwrap()[0];
    assert_eq!(deleted.vm.as_ref().map(|v| v.vm_id.as_str()), Some("b"));
}

#[test]
fn capacity_counts_only_vms_that_hold_resources() {
    let dir = TempDir::new("agent-store").unwrap();
    let mut store = Store::open(&dir.path().join("state.db")).unwrap();
    let limit = Capacity {
        vcpus: 4,
        memory_mib: 1024,
    };
    store
        .create_vm(vm("a", VmState::Starting, 2, 512), Some(limit), None)
        .unwrap();
    store
        .create_vm(vm("off", VmState::Stopped, 4, 1024), Some(limit), None)
        .unwrap();
    assert_eq!(
        store.allocated().unwrap(),
        Capacity {
            vcpus: 2,
            memory_mib: 512
        }
    );
    let err = store
        .create_vm(vm("b", VmState::Starting, 1, 600), Some(limit), None)
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Exhausted(ref m) if m.contains("memory")),
        "{err}"
    );
    let err = store
        .create_vm(vm("c", VmState::Starting, 3, 64), Some(limit), None)
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Exhausted(ref m) if m.contains("vCPUs")),
        "{err}"
    );
    assert!(
        store.get_vm("b").unwrap().is_none(),
        "a refused VM is not half made"
    );
    // Starting the stopped one does not fit either; re-saving a running VM does not count it twice.
    let mut off = store.get_vm("off").unwrap().unwrap();
    off.state = VmState::Starting as i32;
    assert!(matches!(
        store.update_vm(off, Some(limit)),
        Err(StoreError::Exhausted(_))
    ));
    let mut a = store.get_vm("a").unwrap().unwrap();
    a.state = VmState::Running as i32;
    store.update_vm(a, Some(limit)).unwrap();
}

#[test]
fn request_ids_keep_the_first_answer() {
    let dir = TempDir::new("agent-store").unwrap();
    let mut store = Store::open(&dir.path().join("state.db")).unwrap();
    let created = store
        .create_vm(
            vm("a", VmState::Stopped, 1, 64),
            None,
            Some(("r1", "CreateVm", b"fp")),
        )
        .unwrap();
    let stored = store.find_request("r1").unwrap().unwrap();
    assert_eq!(stored.method, "CreateVm");
    assert_eq!(stored.fingerprint, b"fp");
    assert_eq!(Vm::decode(stored.response.as_slice()).unwrap(), created);
    let first = store.record_request("r2", "PauseVm", b"x", b"first").unwrap();
    let second = store.record_request("r2", "PauseVm", b"x", b"second").unwrap();
    assert_eq!(first.response, b"first");
    assert_eq!(second.response, b"first");
    assert!(store.find_request("r3").unwrap().is_none());
}

#[test]
fn a_version_1_database_is_migrated_to_the_latest_keeping_its_vms() {
    let dir = TempDir::new("agent-store").unwrap();
    let path = dir.path().join("state.db");
    {
        // What the first agent wrote: schema 1 with one VM.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO vms (vm_id, spec, vcpus, memory_mib, state, state_reason, pid,
                              create_time_ms, update_time_ms, revision)
             VALUES ('old', ?1, 1, 64, ?2, '', 7, 1, 1, 1)",
            params![spec(1, 64).encode_to_vec(), VmState::Running as i32],
        )
        .unwrap();
    }
    let mut store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
    // Version 3 adds the operations table, empty.
    assert!(store
        .list_operations(&OperationFilter::default(), None, 10)
        .unwrap()
        .is_empty());
    let mut old = store.get_vm("old").unwrap().unwrap();
    assert_eq!((old.pid, old.desired_state()), (7, VmState::Unspecified));
    old.desired_state = VmState::Running as i32;
    store.update_vm(old, None).unwrap();
    assert_eq!(
        store.get_vm("old").unwrap().unwrap().desired_state(),
        VmState::Running
    );
}

fn snapshot(id: &str, vm_id: &str, base: &str, state: crate::proto::SnapshotState) -> crate::proto::Snapshot {
    crate::proto::Snapshot {
        snapshot_id: id.into(),
        vm_id: vm_id.into(),
        base_snapshot_id: base.into(),
        state: state as i32,
        ..Default::default()
    }
}

#[test]
fn snapshots_are_kept_listed_and_a_base_outlives_its_diffs() {
    use crate::proto::SnapshotState::{Creating, Failed, Ready};
    let dir = TempDir::new("agent-store").unwrap();
    let mut store = Store::open(&dir.path().join("state.db")).unwrap();
    store.insert_snapshot(&snapshot("full", "a", "", Ready)).unwrap();
    store
        .insert_snapshot(&snapshot("diff", "a", "full", Ready))
        .unwrap();
    store
        .insert_snapshot(&snapshot("other", "b", "", Creating))
        .unwrap();
    assert!(matches!(
        store.insert_snapshot(&snapshot("full", "c", "", Ready)),
        Err(StoreError::SnapshotExists(id)) if id == "full"
    ));
    let ids = |v: Vec<crate::proto::Snapshot>| v.into_iter().map(|s| s.snapshot_id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_snapshots(None, None, 10).unwrap()),
        ["diff", "full", "other"]
    );
    assert_eq!(
        ids(store.list_snapshots(Some("a"), None, 10).unwrap()),
        ["diff", "full"]
    );
    assert_eq!(
        ids(store.list_snapshots(None, Some("diff"), 1).unwrap()),
        ["full"]
    );

    let e = store.delete_snapshot("full").unwrap_err();
    assert!(
        matches!(&e, StoreError::SnapshotInUse(m) if m.contains("'diff'")),
        "{e}"
    );
    let e = store.delete_snapshot("other").unwrap_err();
    assert!(
        matches!(&e, StoreError::SnapshotInUse(m) if m.contains("being written")),
        "{e}"
    );
    assert!(matches!(
        store.delete_snapshot("nope"),
        Err(StoreError::SnapshotNotFound(_))
    ));
    assert_eq!(store.delete_snapshot("diff").unwrap().base_snapshot_id, "full");
    store.delete_snapshot("full").unwrap();

    // An agent that died while "other" was written left it CREATING.
    assert_eq!(store.fail_unfinished_snapshots("cut short").unwrap(), ["other"]);
    let other = store.get_snapshot("other").unwrap().unwrap();
    assert_eq!(
        (other.state(), other.state_reason.as_str()),
        (Failed, "cut short")
    );
    assert!(store.fail_unfinished_snapshots("again").unwrap().is_empty());
    assert!(store.remove_snapshot_record("other").unwrap());
    assert!(store.get_snapshot("other").unwrap().is_none());
}

#[test]
fn a_restored_vm_remembers_its_snapshot() {
    let dir = TempDir::new("agent-store").unwrap();
    let mut store = Store::open(&dir.path().join("state.db")).unwrap();
    let mut clone = vm("clone", VmState::Starting, 1, 128);
    clone.restored_from = "snap".into();
    store.create_vm(clone, None, None).unwrap();
    assert_eq!(store.get_vm("clone").unwrap().unwrap().restored_from, "snap");
}

#[test]
fn an_outgoing_migration_is_remembered_until_cleared() {
    let dir = TempDir::new("agent-store").unwrap();
    let path = dir.path().join("state.db");
    let mut store = Store::open(&path).unwrap();
    let created = store
        .create_vm(vm("mover", VmState::Running, 1, 128), None, None)
        .unwrap();
    let mut moving = created.clone();
    moving.migrating_to = "tcp://10.0.0.2:7443".into();
    store.update_vm(moving, None).unwrap();
    drop(store);
    let mut store = Store::open(&path).unwrap();
    let mut stored = store.get_vm("mover").unwrap().unwrap();
    assert_eq!(stored.migrating_to, "tcp://10.0.0.2:7443");
    stored.migrating_to.clear();
    store.update_vm(stored, None).unwrap();
    assert_eq!(store.get_vm("mover").unwrap().unwrap().migrating_to, "");
}

#[test]
fn an_updated_spec_is_kept_and_a_record_without_one_keeps_the_stored_spec() {
    let dir = TempDir::new("agent-store").unwrap();
    let path = dir.path().join("state.db");
    let mut store = Store::open(&path).unwrap();
    let mut with_balloon = vm("b", VmState::Running, 1, 256);
    if let Some(s) = with_balloon.spec.as_mut() {
        s.balloon = Some(crate::proto::BalloonSpec::default());
    }
    let mut stored = store.create_vm(with_balloon, None, None).unwrap();
    if let Some(b) = stored.spec.as_mut().and_then(|s| s.balloon.as_mut()) {
        b.amount_mib = 64;
    }
    store.update_vm(stored.clone(), None).unwrap();
    stored.spec = None;
    stored.state = VmState::Stopped as i32;
    store.update_vm(stored, None).unwrap();
    drop(store);
    let store = Store::open(&path).unwrap();
    let vm = store.get_vm("b").unwrap().unwrap();
    assert_eq!(vm.state(), VmState::Stopped);
    let balloon = vm.spec.and_then(|s| s.balloon).unwrap();
    assert_eq!(balloon.amount_mib, 64);
}

#[test]
fn images_are_kept_and_not_deleted_while_used() {
    use crate::proto::{Disk, Image, Snapshot};
    let dir = TempDir::new("agent-store").unwrap();
    let path = dir.path().join("state.db");
    let mut store = Store::open(&path).unwrap();
    assert!(store.schema_version().unwrap() >= 7, "migration 7 adds images");
    let image = |id: &str| Image {
        image_id: id.into(),
        create_time_ms: 5,
        ..Default::default()
    };
    store.insert_image(&image("base")).unwrap();
    store.insert_image(&image("data")).unwrap();
    assert!(matches!(
        store.insert_image(&image("base")),
        Err(StoreError::ImageExists(_))
    ));
    assert_eq!(store.image_ids().unwrap(), ["base", "data"]);
    store
        .check_images_exist(&["base".to_string(), "data".to_string()])
        .unwrap();
    assert!(matches!(
        store.check_images_exist(&["nope".to_string()]),
        Err(StoreError::ImageNotFound(_))
    ));
    // A VM booting from one image with an overlay of the other, and a snapshot of it.
    let mut on_images = vm("a", VmState::Stopped, 1, 64);
    if let Some(s) = on_images.spec.as_mut() {
        s.image_id = "base".into();
        s.disks = vec![
            Disk {
                image_id: "base".into(),
                root: true,
                ..Default::default()
            },
            Disk {
                image_id: "data".into(),
                ..Default::default()
            },
        ];
    }
    let spec = on_images.spec.clone();
    store.create_vm(on_images, None, None).unwrap();
    store
        .insert_snapshot(&Snapshot {
            snapshot_id: "s1".into(),
            vm_id: "a".into(),
            spec,
            ..Default::default()
        })
        .unwrap();
    let base = store.get_image("base").unwrap().unwrap();
    assert_eq!((base.vms_using, base.snapshots_using), (1, 1));
    let listed = store.list_images().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!((listed[1].image_id.as_str(), listed[1].vms_using), ("data", 1));
    let e = store.delete_image("base").unwrap_err();
    assert!(matches!(e, StoreError::ImageInUse(_)), "{e}");
    assert_eq!(
        e.to_string(),
        "image 'base' is used by VM 'a' and snapshot 's1'; delete them first"
    );
    store.delete_vm("a").unwrap();
    let e = store.delete_image("data").unwrap_err();
    assert_eq!(
        e.to_string(),
        "image 'data' is used by snapshot 's1'; delete them first"
    );
    store.delete_snapshot("s1").unwrap();
    let gone = store.delete_image("base").unwrap();
    assert_eq!(gone.image_id, "base");
    assert!(store.get_image("base").unwrap().is_none());
    assert!(matches!(
        store.delete_image("base"),
        Err(StoreError::ImageNotFound(_))
    ));
    drop(store);
    // Kept across a reopen.
    let store = Store::open(&path).unwrap();
    assert_eq!(store.image_ids().unwrap(), ["data"]);
}

#[test]
fn jail_uids_are_unique_kept_and_freed_with_the_vm() {
    let dir = TempDir::new("agent-store").unwrap();
    let mut store = Store::open(&dir.path().join("state.db")).unwrap();
    for id in ["a", "b", "c"] {
        store
            .create_vm(vm(id, VmState::Stopped, 1, 64), None, None)
            .unwrap();
    }
    let uids = 1000..1002;
    assert_eq!(store.assign_jail_uid("a", uids.clone()).unwrap().jail_uid, 1000);
    assert_eq!(store.assign_jail_uid("b", uids.clone()).unwrap().jail_uid, 1001);
    // Kept on the next start.
    assert_eq!(store.assign_jail_uid("a", uids.clone()).unwrap().jail_uid, 1000);
    assert!(matches!(
        store.assign_jail_uid("c", uids.clone()),
        Err(StoreError::Exhausted(_))
    ));
    store.delete_vm("a").unwrap();
    assert_eq!(store.assign_jail_uid("c", uids.clone()).unwrap().jail_uid, 1000);
    // A uid outside a new range is replaced.
    assert_eq!(store.assign_jail_uid("b", 2000..2001).unwrap().jail_uid, 2000);
    assert!(matches!(
        store.assign_jail_uid("nope", uids),
        Err(StoreError::NotFound(_))
    ));
}
