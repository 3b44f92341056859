//! The waiters of this instance for SNs another instance fetches, woken when an announcement
//! names them (see `coordination`).
//!
//! A waiter listens before it looks at the cache again (subscribe, then recheck), so an
//! announcement that comes between the two is not missed. Announcements follow a pub/sub
//! subscription that can be lost: when it comes back, every waiter is woken (it may have
//! missed one), and the waiters poll slowly besides.

use super::invalidation_channel::{self, Invalidate};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::mpsc;

/// The listeners of each SN: their ids, and where to tell them.
type Ears = HashMap<String, Vec<(u64, mpsc::UnboundedSender<String>)>>;

/// Who listens for which SN.
#[derive(Default)]
pub struct Wakeups {
    listeners: Mutex<Ears>,
    next_id: AtomicU64,
}

/// One waiter's ear: the SNs named in announcements since it began listening. Stops
/// listening when dropped.
pub struct Listener {
    id: u64,
    sns: Vec<String>,
    wakeups: Arc<Wakeups>,
    heard: mpsc::UnboundedReceiver<String>,
}

impl Listener {
    /// The next SN announced (waits for one).
    pub async fn next(&mut self) -> Option<String> {
        self.heard.recv().await
    }

    /// An SN already announced, without waiting.
    pub fn try_next(&mut self) -> Option<String> {
        self.heard.try_recv().ok()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut listeners = self.wakeups.lock();
        for sn in &self.sns {
            if let Some(ears) = listeners.get_mut(sn) {
                ears.retain(|(id, _)| *id != self.id);
                if ears.is_empty() {
                    listeners.remove(sn);
                }
            }
        }
    }
}

impl Wakeups {
    /// Starts listening for `sns`.
    pub fn listen(self: &Arc<Self>, sns: Vec<String>) -> Listener {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tell, heard) = mpsc::unbounded_channel();
        let mut listeners = self.lock();
        for sn in &sns {
            listeners
                .entry(sn.clone())
                .or_default()
                .push((id, tell.clone()));
        }
        drop(listeners);
        Listener {
            id,
            sns,
            wakeups: Arc::clone(self),
            heard,
        }
    }

    /// Wakes whoever listens for these SNs.
    pub fn wake<'a>(&self, sns: impl IntoIterator<Item = &'a str>) {
        let listeners = self.lock();
        if listeners.is_empty() {
            return;
        }
        for sn in sns {
            for (_, tell) in listeners.get(sn).into_iter().flatten() {
                let _ = tell.send(sn.to_owned());
            }
        }
    }

    /// Wakes every waiter for every SN it listens for: an announcement may have been missed.
    pub fn wake_all(&self) {
        let listeners = self.lock();
        for (sn, ears) in listeners.iter() {
            for (_, tell) in ears {
                let _ = tell.send(sn.clone());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ears> {
        // Inserts and removes only: a poisoned map is still a consistent map.
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl super::invalidation_channel::Handler for Wakeups {
    fn subscribed(&self, up: bool) {
        if up {
            self.wake_all();
        }
    }

    fn message(&self, payload: &[u8]) {
        match invalidation_channel::decode(payload) {
            Invalidate::These(sns) => self.wake(sns),
            Invalidate::All => self.wake_all(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_hears_its_own_sns_until_dropped() {
        let wakeups = Arc::new(Wakeups::default());
        let mut a = wakeups.listen(vec!["A".into(), "B".into()]);
        let mut c = wakeups.listen(vec!["C".into()]);
        wakeups.wake(["B", "C", "Z"]);
        assert_eq!(a.try_next().as_deref(), Some("B"));
        assert_eq!(a.try_next(), None);
        assert_eq!(c.try_next().as_deref(), Some("C"));
        drop(a);
        wakeups.wake_all();
        assert_eq!(c.try_next().as_deref(), Some("C"));
        assert!(
            wakeups.lock().get("A").is_none(),
            "forgotten with its listener"
        );
    }
}
