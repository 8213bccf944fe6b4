//! The `snapshots` table: the snapshots this agent keeps, with the base each diff builds on, so
//! that a base is never deleted from under a diff.

use prost::Message;
use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::{Store, StoreError};
use crate::proto::{Snapshot, SnapshotState};

fn decode(blob: &[u8]) -> Result<Snapshot, StoreError> {
    Ok(Snapshot::decode(blob)?)
}

impl Store {
    /// Stores a new snapshot record; [`StoreError::SnapshotExists`] if the id is taken.
    pub fn insert_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let inserted = self.conn.execute(
            "INSERT INTO snapshots (snapshot_id, vm_id, base, state, snapshot)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (snapshot_id) DO NOTHING",
            params![
                snapshot.snapshot_id,
                snapshot.vm_id,
                snapshot.base_snapshot_id,
                snapshot.state,
                snapshot.encode_to_vec()
            ],
        )?;
        if inserted == 0 {
            return Err(StoreError::SnapshotExists(snapshot.snapshot_id.clone()));
        }
        Ok(())
    }

    /// Replaces a snapshot's record.
    pub fn update_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let updated = self.conn.execute(
            "UPDATE snapshots SET base = ?2, state = ?3, snapshot = ?4 WHERE snapshot_id = ?1",
            params![
                snapshot.snapshot_id,
                snapshot.base_snapshot_id,
                snapshot.state,
                snapshot.encode_to_vec()
            ],
        )?;
        if updated == 0 {
            return Err(StoreError::SnapshotNotFound(snapshot.snapshot_id.clone()));
        }
        Ok(())
    }

    /// One snapshot.
    pub fn get_snapshot(&self, snapshot_id: &str) -> Result<Option<Snapshot>, StoreError> {
        let blob: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT snapshot FROM snapshots WHERE snapshot_id = ?1",
                [snapshot_id],
                |r| r.get(0),
            )
            .optional()?;
        blob.map(|b| decode(&b)).transpose()
    }

    /// Up to `limit` snapshots (of `vm_id` if given) with ids after `after`, ordered by id.
    pub fn list_snapshots(
        &self,
        vm_id: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Snapshot>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT snapshot FROM snapshots
             WHERE (?1 IS NULL OR vm_id = ?1) AND (?2 IS NULL OR snapshot_id > ?2)
             ORDER BY snapshot_id LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![vm_id, after, limit as i64], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for blob in rows {
            out.push(decode(&blob?)?);
        }
        Ok(out)
    }

    /// Forgets a snapshot, unless it is being written or a diff builds on it
    /// ([`StoreError::SnapshotInUse`]); returns the record it had.
    pub fn delete_snapshot(&mut self, snapshot_id: &str) -> Result<Snapshot, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let blob: Option<Vec<u8>> = tx
            .query_row(
                "SELECT snapshot FROM snapshots WHERE snapshot_id = ?1",
                [snapshot_id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(blob) = blob else {
            return Err(StoreError::SnapshotNotFound(snapshot_id.to_string()));
        };
        let snapshot = decode(&blob)?;
        if snapshot.state() == SnapshotState::Creating {
            return Err(StoreError::SnapshotInUse(format!(
                "snapshot '{snapshot_id}' is being written; delete it once its operation ends"
            )));
        }
        let child: Option<String> = tx
            .query_row(
                "SELECT snapshot_id FROM snapshots WHERE base = ?1 ORDER BY snapshot_id LIMIT 1",
                [snapshot_id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(child) = child {
            return Err(StoreError::SnapshotInUse(format!(
                "snapshot '{snapshot_id}' is the base of diff snapshot '{child}'; delete that first"
            )));
        }
        tx.execute("DELETE FROM snapshots WHERE snapshot_id = ?1", [snapshot_id])?;
        tx.commit()?;
        Ok(snapshot)
    }

    /// Forgets a snapshot record whatever its state (a create that failed); true if it was there.
    pub fn remove_snapshot_record(&mut self, snapshot_id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute("DELETE FROM snapshots WHERE snapshot_id = ?1", [snapshot_id])?;
        Ok(n > 0)
    }

    /// Marks every snapshot still CREATING as FAILED with `reason`: called at start, when no
    /// worker of a previous agent can be left to finish them. Returns their ids.
    pub fn fail_unfinished_snapshots(&mut self, reason: &str) -> Result<Vec<String>, StoreError> {
        let unfinished: Vec<Vec<u8>> = {
            let mut stmt = self
                .conn
                .prepare("SELECT snapshot FROM snapshots WHERE state = ?1")?;
            let rows = stmt.query_map([SnapshotState::Creating as i32], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut ids = Vec::new();
        for blob in &unfinished {
            let mut snapshot = decode(blob)?;
            snapshot.state = SnapshotState::Failed as i32;
            snapshot.state_reason = reason.to_string();
            self.update_snapshot(&snapshot)?;
            ids.push(snapshot.snapshot_id);
        }
        Ok(ids)
    }
}
