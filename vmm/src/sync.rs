//! Locking that survives a poisoned mutex.
//!
//! The release build aborts on panic, so a poisoned lock only happens in tests; recovering the
//! guard there keeps one failed assertion from cascading into unrelated ones.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the guard of a poisoned mutex as it is.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
