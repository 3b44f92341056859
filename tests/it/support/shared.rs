//! One expensive fixture (a cluster, a sentinel set) shared by the tests that run at the same
//! time, and stopped when the last of them lets go.

use std::sync::{Arc, Mutex, PoisonError, Weak};

/// A process-wide slot holding a fixture weakly: concurrent tests get the same `Arc`, and the
/// last `Arc` dropped runs the fixture's `Drop`, which stops its processes. A `static` holding
/// the fixture itself would never be dropped, and its processes would outlive the test binary.
pub struct Shared<T> {
    slot: Mutex<Weak<T>>,
}

impl<T> Shared<T> {
    pub const fn new() -> Self {
        Self {
            slot: Mutex::new(Weak::new()),
        }
    }

    /// The fixture some running test already holds, or a fresh one from `start`. The lock is
    /// held while starting, so two tests asking at once start one fixture, not two.
    pub fn get_or_start(&self, start: impl FnOnce() -> T) -> Arc<T> {
        // A test that panicked while starting leaves an empty slot: usable as it is.
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(running) = slot.upgrade() {
            return running;
        }
        let fresh = Arc::new(start());
        *slot = Arc::downgrade(&fresh);
        fresh
    }
}
