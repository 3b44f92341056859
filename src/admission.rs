//! Admission: how much the proxy takes on at once. A place among `server.max_connections`
//! per open client connection, and a slot among `server.max_in_flight` per `/v1/*` request,
//! held until its response has been written to the client's socket or abandoned.
//!
//! Holding the slot only until the response is *built* would let clients that never read
//! pile up without bound: each would keep a whole JSON body, or a streamed lookup, waiting in
//! memory. So the slot travels with the response body ([`AdmittedBody`]), and when hyper has
//! taken the body's last frame the slot is parked on the connection ([`Unflushed`]) until the
//! connection's next successful flush: the moment the last byte reached the socket. A client
//! that stops reading is cut off by `server.write_timeout` (see `server::stream`), which
//! drops the connection, and with it the slot. So stuck readers are bounded in number by
//! `max_in_flight` and in time by `write_timeout`, like Varnish's `send_timeout` and nginx's
//! `send_timeout`.

use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A bound on things taken on at once: requests being answered (`server.max_in_flight`) or
/// open connections (`server.max_connections`).
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    max: usize,
}

/// One admitted request's or connection's slot. Dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Admission {
    /// Room for `max` at once.
    pub fn new(max: usize) -> Self {
        let max = max.min(Semaphore::MAX_PERMITS);
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A slot, or `None` when every one is taken (the caller answers `503 overloaded`).
    pub fn try_admit(&self) -> Option<Slot> {
        Arc::clone(&self.slots)
            .try_acquire_owned()
            .ok()
            .map(|permit| Slot { _permit: permit })
    }

    /// A slot, once one is free (the accept loop waits here while at the bound, leaving new
    /// connections in the kernel's backlog).
    pub async fn admit(&self) -> Slot {
        match Arc::clone(&self.slots).acquire_owned().await {
            Ok(permit) => Slot { _permit: permit },
            // The semaphore is never closed; if it were, nothing could be admitted again, and
            // waiting forever is what "nothing free" means.
            Err(_) => std::future::pending().await,
        }
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }

    /// Slots taken now.
    pub fn in_use(&self) -> usize {
        self.max.saturating_sub(self.available())
    }
}

/// Per connection: the slots of responses that hyper has taken in full but that may still
/// sit in its write buffer. Freed by the connection's next successful flush, or with the
/// connection.
#[derive(Debug, Default)]
pub struct Unflushed {
    /// Set while `slots` holds any, so a flush with nothing parked takes no lock.
    any: AtomicBool,
    slots: Mutex<Vec<Slot>>,
}

impl Unflushed {
    fn park(&self, slot: Slot) {
        self.lock().push(slot);
        self.any.store(true, Ordering::Release);
    }

    /// Everything written so far has reached the socket: the parked slots are free.
    pub fn flushed(&self) {
        if self.any.swap(false, Ordering::AcqRel) {
            // Cleared in place, keeping the capacity: one connection's responses park and
            // free a slot each, and must not allocate for it every time. The lock is the
            // connection's own, so freeing under it holds up no one.
            self.lock().clear();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A response body that keeps its request's [`Slot`] while hyper writes it.
///
/// When the body is dropped (hyper took its last frame, or the connection went away) the slot
/// is parked on the connection's [`Unflushed`] until the bytes are on the socket.
pub struct AdmittedBody<B> {
    body: B,
    slot: Option<Slot>,
    unflushed: Arc<Unflushed>,
}

impl<B> AdmittedBody<B> {
    /// `body`, holding `slot` until it is written on the connection of `unflushed`.
    pub fn new(body: B, slot: Slot, unflushed: Arc<Unflushed>) -> Self {
        Self {
            body,
            slot: Some(slot),
            unflushed,
        }
    }
}

impl<B> Drop for AdmittedBody<B> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.unflushed.park(slot);
        }
    }
}

impl<B: Body + Unpin> Body for AdmittedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn a_slot_is_not_free_until_the_connection_flushed_the_body() {
        let admission = Admission::new(1);
        let unflushed = Arc::new(Unflushed::default());
        let slot = admission.try_admit().unwrap();
        let body = AdmittedBody::new(
            Full::new(bytes::Bytes::from_static(b"{}")),
            slot,
            Arc::clone(&unflushed),
        );
        assert!(admission.try_admit().is_none());
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"{}");
        // Taken by hyper in full, not yet on the socket.
        assert_eq!(admission.available(), 0);
        unflushed.flushed();
        assert_eq!(admission.available(), 1);
    }

    #[test]
    fn a_closed_connection_frees_the_slots_parked_on_it() {
        let admission = Admission::new(2);
        let unflushed = Arc::new(Unflushed::default());
        for _ in 0..2 {
            let slot = admission.try_admit().unwrap();
            drop(AdmittedBody::new(
                Full::new(bytes::Bytes::new()),
                slot,
                Arc::clone(&unflushed),
            ));
        }
        assert_eq!(admission.available(), 0);
        drop(unflushed);
        assert_eq!(admission.available(), 2);
    }
}
