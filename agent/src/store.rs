//! The agent's state in SQLite: VMs (spec, observed state, pid), the change log that `WatchVms`
//! replays, the results of requests by `request_id`, operations, snapshots and base images.
//!
//! Every write goes through [`Store`], and every write that changes a VM bumps the host-wide revision,
//! appends an event and broadcasts it, all while the caller holds the store, so subscribers see events
//! in revision order. `Store` is synchronous; async code reaches it through
//! [`crate::state::StoreHandle`], which runs each call on the blocking pool.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::broadcast;

use crate::proto::{NicTap, Vm, VmSpec, VmState, WatchEventType, WatchVmsEvent};

/// Schema migrations, applied in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE vms (
        vm_id TEXT PRIMARY KEY,
        spec BLOB NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        state INTEGER NOT NULL,
        state_reason TEXT NOT NULL,
        pid INTEGER NOT NULL,
        exit_code INTEGER,
        boot_ms INTEGER,
        create_time_ms INTEGER NOT NULL,
        update_time_ms INTEGER NOT NULL,
        revision INTEGER NOT NULL
    );
    CREATE TABLE events (
        revision INTEGER PRIMARY KEY,
        vm_id TEXT NOT NULL,
        event BLOB NOT NULL
    );
    CREATE TABLE requests (
        request_id TEXT PRIMARY KEY,
        method TEXT NOT NULL,
        fingerprint BLOB NOT NULL,
        response BLOB NOT NULL,
        time_ms INTEGER NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('revision', 0);",
    // 2: the desired state, for --restore-on-boot (0: unspecified, for VMs stored before).
    "ALTER TABLE vms ADD COLUMN desired INTEGER NOT NULL DEFAULT 0;",
    // 3: long-running operations (`store_ops.rs`). `seq` orders them for listing and paging; the
    // operation itself is an encoded protobuf, with the columns that filters need beside it.
    "CREATE TABLE operations (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        kind INTEGER NOT NULL,
        vm_id TEXT NOT NULL,
        done INTEGER NOT NULL,
        update_time_ms INTEGER NOT NULL,
        operation BLOB NOT NULL
    );
    CREATE INDEX operations_by_vm ON operations (vm_id, seq);",
    // 4: snapshots (`store_snapshots.rs`), and the snapshot a VM was restored from. A snapshot is
    // an encoded protobuf with the columns that listing and the base check need beside it.
    "CREATE TABLE snapshots (
        snapshot_id TEXT PRIMARY KEY,
        vm_id TEXT NOT NULL,
        base TEXT NOT NULL,
        state INTEGER NOT NULL,
        snapshot BLOB NOT NULL
    );
    CREATE INDEX snapshots_by_base ON snapshots (base);
    ALTER TABLE vms ADD COLUMN restored_from TEXT NOT NULL DEFAULT '';",
    // 5: the destination of an outgoing migration while it runs, so that an agent restarted
    // meanwhile knows the VM may have moved.
    "ALTER TABLE vms ADD COLUMN migrating_to TEXT NOT NULL DEFAULT '';",
    // 6: the host side of each NIC as the last start set it up (`Vm.nic_taps`: the taps the
    // agent made), length-delimited `NicTap`s.
    "ALTER TABLE vms ADD COLUMN nic_taps BLOB NOT NULL DEFAULT x'';",
    // 7: base images (`store_images.rs`), an encoded protobuf each. Who uses one is read from
    // the specs, not stored.
    "CREATE TABLE images (
        image_id TEXT PRIMARY KEY,
        image BLOB NOT NULL
    );",
    // 8: the uid a jailed vmm of the VM runs as (`Vm.jail_uid`), 0 if never jailed.
    "ALTER TABLE vms ADD COLUMN jail_uid INTEGER NOT NULL DEFAULT 0;",
];

/// How many change events are kept for `WatchVms` resumption.
pub const KEPT_EVENTS: u64 = 10_000;
/// How long a request id is remembered, in milliseconds.
pub const REQUEST_ID_TTL_MS: i64 = 24 * 3600 * 1000;
/// How many events a slow watcher may fall behind before it re-reads them from the database.
const BROADCAST_CAPACITY: usize = 1024;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored protobuf could not be decoded.
    #[error("corrupt record")]
    Decode(#[from] prost::DecodeError),
    /// The database was written by a newer agent.
    #[error("schema version {0} is newer than this agent knows ({known})", known = MIGRATIONS.len())]
    TooNew(i64),
    /// A VM with this id exists.
    #[error("a VM with id '{0}' already exists")]
    Exists(String),
    /// No VM with this id.
    #[error("no VM with id '{0}'")]
    NotFound(String),
    /// A snapshot with this id exists.
    #[error("a snapshot with id '{0}' already exists")]
    SnapshotExists(String),
    /// No snapshot with this id.
    #[error("no snapshot with id '{0}'")]
    SnapshotNotFound(String),
    /// The snapshot cannot be deleted now (a diff builds on it, or it is being written).
    #[error("{0}")]
    SnapshotInUse(String),
    /// An image with this id exists.
    #[error("an image with id '{0}' already exists")]
    ImageExists(String),
    /// No image with this id.
    #[error("no image with id '{0}'")]
    ImageNotFound(String),
    /// The image cannot be deleted now (VMs or snapshots use it).
    #[error("{0}")]
    ImageInUse(String),
    /// Starting the VM would exceed the host's allocatable resources.
    #[error("{0}")]
    Exhausted(String),
    /// The events after the requested revision are no longer kept (or it is in the future).
    #[error("cannot resume from revision {asked}: resumable are {oldest} to {current}")]
    Compacted {
        /// What the client asked for.
        asked: u64,
        /// The oldest revision one may resume from.
        oldest: u64,
        /// The latest revision.
        current: u64,
    },
}

/// What VMs may use on this host, or hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
}

/// A remembered request: what it was (method and fingerprint) and the encoded first response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRequest {
    /// The RPC, e.g. `CreateVm`.
    pub method: String,
    /// The encoded request without its request id.
    pub fingerprint: Vec<u8>,
    /// The encoded response.
    pub response: Vec<u8>,
}

/// States in which a VM holds host resources.
pub fn holds_resources(state: VmState) -> bool {
    matches!(
        state,
        VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
    )
}

/// The SQLite state database.
pub struct Store {
    conn: Connection,
    events: broadcast::Sender<WatchVmsEvent>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) the database at `path`, in WAL mode, and applies the migrations it
    /// lacks.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // With WAL, NORMAL still never corrupts the database; a power cut may lose the last commits.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(Store { conn, events })
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// A receiver of every event committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<WatchVmsEvent> {
        self.events.subscribe()
    }

    /// The revision of the last change.
    pub fn revision(&self) -> Result<u64, StoreError> {
        let rev: i64 = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| r.get(0))?;
        Ok(rev as u64)
    }

    /// One VM.
    pub fn get_vm(&self, vm_id: &str) -> Result<Option<Vm>, StoreError> {
        let row = self
            .conn
            .query_row(
                &format!("SELECT {VM_COLUMNS} FROM vms WHERE vm_id = ?1"),
                [vm_id],
                read_row,
            )
            .optional()?;
        row.map(decode_row).transpose()
    }

    /// All VMs, ordered by id.
    pub fn list_vms(&self) -> Result<Vec<Vm>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {VM_COLUMNS} FROM vms ORDER BY vm_id"))?;
        let rows = stmt.query_map([], read_row)?;
        let mut vms = Vec::new();
        for row in rows {
            vms.push(decode_row(row?)?);
        }
        Ok(vms)
    }

    /// What VMs holding resources use, `except` one VM.
    fn allocated_except(&self, except: &str) -> Result<Capacity, StoreError> {
        let (vcpus, memory): (i64, i64) = self.conn.query_row(
            "SELECT COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mib), 0) FROM vms
             WHERE vm_id != ?1 AND state IN (?2, ?3, ?4, ?5)",
            params![
                except,
                VmState::Starting as i32,
                VmState::Running as i32,
                VmState::Paused as i32,
                VmState::Stopping as i32
            ],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Capacity {
            vcpus: vcpus as u64,
            memory_mib: memory as u64,
        })
    }

    /// What all VMs holding resources use.
    pub fn allocated(&self) -> Result<Capacity, StoreError> {
        self.allocated_except("")
    }

    /// Adds a new VM. If its state holds resources and `limit` is given, refuses
    /// ([`StoreError::Exhausted`]) when the VM does not fit next to the others. With `request`, the
    /// request id is remembered in the same transaction, answered by the stored VM.
    pub fn create_vm(
        &mut self,
        mut vm: Vm,
        limit: Option<Capacity>,
        request: Option<(&str, &str, &[u8])>,
    ) -> Result<Vm, StoreError> {
        // `&mut self` makes the check and the insert below one step for every other caller.
        let exists = self
            .conn
            .query_row("SELECT 1 FROM vms WHERE vm_id = ?1", [&vm.vm_id], |_| Ok(()))
            .optional()?
            .is_some();
        if exists {
            return Err(StoreError::Exists(vm.vm_id));
        }
        if let Some(limit) = limit {
            self.check_fits(&vm, limit)?;
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        vm.create_time_ms = now;
        vm.update_time_ms = now;
        vm.revision = next_revision(&tx)?;
        write_vm(&tx, &vm)?;
        let event = event(vm.revision, WatchEventType::Created, &vm);
        append_event(&tx, &event)?;
        if let Some((id, method, fingerprint)) = request {
            tx.execute(
                "INSERT INTO requests (request_id, method, fingerprint, response, time_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, method, fingerprint, vm.encode_to_vec(), now],
            )?;
        }
        tx.commit()?;
        self.after_commit(event);
        Ok(vm)
    }

    fn check_fits(&self, vm: &Vm, limit: Capacity) -> Result<(), StoreError> {
        if !holds_resources(vm.state()) {
            return Ok(());
        }
        let spec = vm.spec.clone().unwrap_or_default();
        let used = self.allocated_except(&vm.vm_id)?;
        if used.vcpus + u64::from(spec.vcpus) > limit.vcpus {
            return Err(StoreError::Exhausted(format!(
                "not enough vCPUs: {} wanted, {} of {} allocatable in use",
                spec.vcpus, used.vcpus, limit.vcpus
            )));
        }
        if used.memory_mib + spec.memory_mib > limit.memory_mib {
            return Err(StoreError::Exhausted(format!(
                "not enough memory: {} MiB wanted, {} of {} MiB allocatable in use",
                spec.memory_mib, used.memory_mib, limit.memory_mib
            )));
        }
        Ok(())
    }

    /// Replaces a VM's record and logs the change. The spec is replaced too when `vm` has one (only
    /// what UpdateVm may change differs; vCPUs and memory, which capacity counts, are kept as
    /// stored). With `limit`, refuses
    /// like [`Store::create_vm`] when the new state holds resources that the host does not have.
    pub fn update_vm(&mut self, mut vm: Vm, limit: Option<Capacity>) -> Result<Vm, StoreError> {
        if let Some(limit) = limit {
            self.check_fits(&vm, limit)?;
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let created: Option<i64> = tx
            .query_row(
                "SELECT create_time_ms FROM vms WHERE vm_id = ?1",
                [&vm.vm_id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(created) = created else {
            return Err(StoreError::NotFound(vm.vm_id));
        };
        vm.create_time_ms = created;
        vm.update_time_ms = now_ms();
        vm.revision = next_revision(&tx)?;
        write_vm(&tx, &vm)?;
        let event = event(vm.revision, WatchEventType::Updated, &vm);
        append_event(&tx, &event)?;
        tx.commit()?;
        self.after_commit(event);
        Ok(vm)
    }

    /// Gives VM `vm_id` a jail uid from `uids` that no other VM holds (keeping the one it has if
    /// that is still in the range and its own), and returns the VM as stored.
    pub fn assign_jail_uid(&mut self, vm_id: &str, uids: std::ops::Range<u32>) -> Result<Vm, StoreError> {
        let vms = self.list_vms()?;
        let mut mine = None;
        let mut taken = std::collections::HashSet::new();
        for vm in vms {
            if vm.vm_id == vm_id {
                mine = Some(vm);
            } else if vm.jail_uid != 0 {
                taken.insert(vm.jail_uid);
            }
        }
        let Some(mut vm) = mine else {
            return Err(StoreError::NotFound(vm_id.to_string()));
        };
        if uids.contains(&vm.jail_uid) && !taken.contains(&vm.jail_uid) {
            return Ok(vm);
        }
        let (first, count) = (uids.start, uids.len());
        vm.jail_uid = uids.into_iter().find(|u| !taken.contains(u)).ok_or_else(|| {
            StoreError::Exhausted(format!(
                "every jail uid ({first} and the {} after it) is held by another VM",
                count.saturating_sub(1)
            ))
        })?;
        self.update_vm(vm, None)
    }

    /// Forgets a VM; the DELETED event carries its last record.
    pub fn delete_vm(&mut self, vm_id: &str) -> Result<(), StoreError> {
        let Some(mut last) = self.get_vm(vm_id)? else {
            return Err(StoreError::NotFound(vm_id.to_string()));
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM vms WHERE vm_id = ?1", [vm_id])?;
        last.revision = next_revision(&tx)?;
        last.update_time_ms = now_ms();
        let event = event(last.revision, WatchEventType::Deleted, &last);
        append_event(&tx, &event)?;
        tx.commit()?;
        self.after_commit(event);
        Ok(())
    }

    /// The events after `revision`, in order. [`StoreError::Compacted`] if some were dropped.
    pub fn events_after(&self, revision: u64) -> Result<Vec<WatchVmsEvent>, StoreError> {
        let current = self.revision()?;
        let oldest: Option<i64> = self
            .conn
            .query_row("SELECT MIN(revision) FROM events", [], |r| r.get(0))?;
        // Resuming from `revision` needs every event from revision + 1 on.
        let first_kept = oldest.map(|o| o as u64).unwrap_or(current + 1);
        if revision > current || revision + 1 < first_kept {
            return Err(StoreError::Compacted {
                asked: revision,
                oldest: first_kept.saturating_sub(1),
                current,
            });
        }
        let mut stmt = self
            .conn
            .prepare("SELECT event FROM events WHERE revision > ?1 ORDER BY revision")?;
        let rows = stmt.query_map([revision as i64], |r| r.get::<_, Vec<u8>>(0))?;
        let mut events = Vec::new();
        for row in rows {
            events.push(WatchVmsEvent::decode(row?.as_slice())?);
        }
        Ok(events)
    }

    /// The first answer to `request_id`, if it is remembered.
    pub fn find_request(&self, request_id: &str) -> Result<Option<StoredRequest>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT method, fingerprint, response FROM requests WHERE request_id = ?1 AND time_ms > ?2",
                params![request_id, now_ms() - REQUEST_ID_TTL_MS],
                |r| {
                    Ok(StoredRequest {
                        method: r.get(0)?,
                        fingerprint: r.get(1)?,
                        response: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    /// Remembers the answer to `request_id` unless one is remembered already; returns the one kept
    /// (so that of two racing retries, both answer with the first result). Forgets expired ids.
    pub fn record_request(
        &mut self,
        request_id: &str,
        method: &str,
        fingerprint: &[u8],
        response: &[u8],
    ) -> Result<StoredRequest, StoreError> {
        let now = now_ms();
        self.conn.execute(
            "DELETE FROM requests WHERE time_ms <= ?1",
            [now - REQUEST_ID_TTL_MS],
        )?;
        self.conn.execute(
            "INSERT OR IGNORE INTO requests (request_id, method, fingerprint, response, time_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![request_id, method, fingerprint, response, now],
        )?;
        self.find_request(request_id)?
            .ok_or_else(|| StoreError::NotFound(request_id.to_string()))
    }

    /// Replaces the answer remembered for `request_id` (a create records the VM as inserted, then
    /// as it was returned once started).
    pub fn update_request(&mut self, request_id: &str, response: &[u8]) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE requests SET response = ?2 WHERE request_id = ?1",
            params![request_id, response],
        )?;
        Ok(())
    }

    /// Forgets the answer to `request_id` (a create undone after it was recorded, so that a
    /// retry acts again rather than return a VM that is gone).
    pub fn forget_request(&mut self, request_id: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM requests WHERE request_id = ?1", [request_id])?;
        Ok(())
    }

    fn after_commit(&mut self, event: WatchVmsEvent) {
        if event.revision.is_multiple_of(100) {
            let keep_from = event.revision.saturating_sub(KEPT_EVENTS) as i64;
            if let Err(e) = self
                .conn
                .execute("DELETE FROM events WHERE revision <= ?1", [keep_from])
            {
                tracing::warn!(error = %e, "cannot prune old events");
            }
        }
        // No receiver is fine: nobody watches.
        let _ = self.events.send(event);
    }
}

const VM_COLUMNS: &str = "vm_id, spec, state, state_reason, pid, exit_code, boot_ms, \
                          create_time_ms, update_time_ms, revision, desired, restored_from, \
                          migrating_to, nic_taps, jail_uid";

type VmRow = (
    String,
    Vec<u8>,
    i32,
    String,
    i64,
    Option<i32>,
    Option<i64>,
    i64,
    i64,
    i64,
    i32,
    String,
    String,
    Vec<u8>,
    i64,
);

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VmRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
        r.get(13)?,
        r.get(14)?,
    ))
}

fn decode_row(row: VmRow) -> Result<Vm, StoreError> {
    let (
        vm_id,
        spec,
        state,
        state_reason,
        pid,
        exit_code,
        boot_ms,
        created,
        updated,
        revision,
        desired,
        restored_from,
        migrating_to,
        nic_taps,
        jail_uid,
    ) = row;
    Ok(Vm {
        vm_id,
        spec: Some(VmSpec::decode(spec.as_slice())?),
        state,
        state_reason,
        pid: pid as u32,
        exit_code,
        boot_ms: boot_ms.map(|b| b as u64),
        create_time_ms: created,
        update_time_ms: updated,
        revision: revision as u64,
        desired_state: desired,
        restored_from,
        migrating_to,
        nic_taps: decode_nic_taps(&nic_taps)?,
        jail_uid: u32::try_from(jail_uid).unwrap_or(0),
    })
}

/// `Vm.nic_taps` as stored: each `NicTap` length-delimited, in order.
fn encode_nic_taps(taps: &[NicTap]) -> Vec<u8> {
    let mut buf = Vec::new();
    for tap in taps {
        // Writing into a Vec cannot run out of room.
        let _ = tap.encode_length_delimited(&mut buf);
    }
    buf
}

fn decode_nic_taps(mut buf: &[u8]) -> Result<Vec<NicTap>, StoreError> {
    let mut taps = Vec::new();
    while !buf.is_empty() {
        taps.push(NicTap::decode_length_delimited(&mut buf)?);
    }
    Ok(taps)
}

fn write_vm(tx: &rusqlite::Transaction<'_>, vm: &Vm) -> Result<(), StoreError> {
    let spec = vm.spec.clone().unwrap_or_default();
    tx.execute(
        "INSERT INTO vms (vm_id, spec, vcpus, memory_mib, state, state_reason, pid, exit_code,
                          boot_ms, create_time_ms, update_time_ms, revision, desired,
                          restored_from, migrating_to, nic_taps, jail_uid)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?17, ?18)
         ON CONFLICT (vm_id) DO UPDATE SET state = ?5, state_reason = ?6, pid = ?7,
             exit_code = ?8, boot_ms = ?9, update_time_ms = ?11, revision = ?12, desired = ?13,
             migrating_to = ?15, spec = COALESCE(?16, spec), nic_taps = ?17, jail_uid = ?18",
        params![
            vm.vm_id,
            spec.encode_to_vec(),
            spec.vcpus,
            spec.memory_mib as i64,
            vm.state,
            vm.state_reason,
            vm.pid,
            vm.exit_code,
            vm.boot_ms.map(|b| b as i64),
            vm.create_time_ms,
            vm.update_time_ms,
            vm.revision as i64,
            vm.desired_state,
            vm.restored_from,
            vm.migrating_to,
            vm.spec.as_ref().map(|s| s.encode_to_vec()),
            encode_nic_taps(&vm.nic_taps),
            vm.jail_uid
        ],
    )?;
    Ok(())
}

fn next_revision(tx: &rusqlite::Transaction<'_>) -> Result<u64, StoreError> {
    let rev: i64 = tx.query_row(
        "UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value",
        [],
        |r| r.get(0),
    )?;
    Ok(rev as u64)
}

fn event(revision: u64, kind: WatchEventType, vm: &Vm) -> WatchVmsEvent {
    WatchVmsEvent {
        revision,
        r#type: kind as i32,
        vm: Some(vm.clone()),
    }
}

fn append_event(tx: &rusqlite::Transaction<'_>, event: &WatchVmsEvent) -> Result<(), StoreError> {
    let vm_id = event.vm.as_ref().map(|v| v.vm_id.as_str()).unwrap_or("");
    tx.execute(
        "INSERT INTO events (revision, vm_id, event) VALUES (?1, ?2, ?3)",
        params![event.revision as i64, vm_id, event.encode_to_vec()],
    )?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > MIGRATIONS.len() as i64 {
        return Err(StoreError::TooNew(version));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

#[path = "store_ops.rs"]
mod ops;
pub use ops::OperationFilter;

#[path = "store_snapshots.rs"]
mod snapshots;

#[path = "store_images.rs"]
mod images;
pub use images::ImageUsers;

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
