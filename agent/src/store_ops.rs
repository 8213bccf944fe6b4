//! The `operations` table: long-running operations, kept after they finish so that a client can
//! learn the outcome later (also after an agent restart).

use prost::Message;
use rusqlite::{params, OptionalExtension};

use super::{now_ms, Store, StoreError};
use crate::proto::{operation, Operation, OperationError, OperationKind};

/// How long a finished operation is kept, in milliseconds.
pub const OPERATION_TTL_MS: i64 = 7 * 24 * 3600 * 1000;

/// Which operations a listing wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperationFilter {
    /// Only those on this VM.
    pub vm_id: Option<String>,
    /// Only those of this kind.
    pub kind: Option<OperationKind>,
    /// Only finished (true) or running (false) ones.
    pub done: Option<bool>,
}

fn kind_of(op: &Operation) -> i32 {
    op.metadata.as_ref().map(|m| m.kind).unwrap_or(0)
}

fn vm_of(op: &Operation) -> &str {
    op.metadata.as_ref().map(|m| m.vm_id.as_str()).unwrap_or("")
}

fn updated_of(op: &Operation) -> i64 {
    op.metadata.as_ref().map(|m| m.update_time_ms).unwrap_or(0)
}

impl Store {
    /// Stores a new operation (its name must be new), and forgets finished operations older than
    /// [`OPERATION_TTL_MS`].
    pub fn insert_operation(&mut self, op: &Operation) -> Result<(), StoreError> {
        self.conn.execute(
            "DELETE FROM operations WHERE done = 1 AND update_time_ms <= ?1",
            [now_ms() - OPERATION_TTL_MS],
        )?;
        self.conn.execute(
            "INSERT INTO operations (name, kind, vm_id, done, update_time_ms, operation)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                op.name,
                kind_of(op),
                vm_of(op),
                op.done,
                updated_of(op),
                op.encode_to_vec()
            ],
        )?;
        Ok(())
    }

    /// Replaces a stored operation that is not finished yet. A finished one is never written
    /// again: a late write (a cancel request racing the worker's end) must not undo its result.
    pub fn update_operation(&mut self, op: &Operation) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE operations SET done = ?2, update_time_ms = ?3, operation = ?4
             WHERE name = ?1 AND done = 0",
            params![op.name, op.done, updated_of(op), op.encode_to_vec()],
        )?;
        Ok(())
    }

    /// One operation.
    pub fn get_operation(&self, name: &str) -> Result<Option<Operation>, StoreError> {
        let blob: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT operation FROM operations WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(blob.map(|b| Operation::decode(b.as_slice())).transpose()?)
    }

    /// Up to `limit` operations matching `filter`, newest first, older than the one numbered
    /// `before` if given; each with its number, which pages continue from.
    pub fn list_operations(
        &self,
        filter: &OperationFilter,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, Operation)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, operation FROM operations
             WHERE (?1 IS NULL OR vm_id = ?1) AND (?2 IS NULL OR kind = ?2)
               AND (?3 IS NULL OR done = ?3) AND (?4 IS NULL OR seq < ?4)
             ORDER BY seq DESC LIMIT ?5",
        )?;
        let rows = stmt.query_map(
            params![
                filter.vm_id,
                filter.kind.map(|k| k as i32),
                filter.done,
                before,
                limit as i64
            ],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
        )?;
        let mut ops = Vec::new();
        for row in rows {
            let (seq, blob) = row?;
            ops.push((seq, Operation::decode(blob.as_slice())?));
        }
        Ok(ops)
    }

    /// Finishes every operation still marked running with `error`: called at start, when no
    /// worker of a previous agent can be left to finish them. Returns how many there were.
    pub fn abort_unfinished_operations(&mut self, error: &OperationError) -> Result<usize, StoreError> {
        let unfinished: Vec<Vec<u8>> = {
            let mut stmt = self
                .conn
                .prepare("SELECT operation FROM operations WHERE done = 0")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let now = now_ms();
        let tx = self.conn.transaction()?;
        for blob in &unfinished {
            let mut op = Operation::decode(blob.as_slice())?;
            op.done = true;
            op.result = Some(operation::Result::Error(error.clone()));
            if let Some(m) = op.metadata.as_mut() {
                m.update_time_ms = now;
            }
            tx.execute(
                "UPDATE operations SET done = 1, update_time_ms = ?2, operation = ?3 WHERE name = ?1",
                params![op.name, now, op.encode_to_vec()],
            )?;
        }
        tx.commit()?;
        Ok(unfinished.len())
    }
}
