//! What instances sharing a Redis use to act as one (`coalesce.distributed`): claims on
//! fetches (leases), renewed and released by compare-token scripts; a lease taken for a fetch
//! still queued behind others, which an instance about to fetch the SN at once may take over
//! until the holder starts it (so a short lookup never waits for another instance's long
//! export to reach its SN, and still only one instance fetches it); fences that an
//! invalidation sets so no fetch that began before it is written back anywhere; write-backs
//! made only if no fence and no newer answer came first; and a notification after each
//! write-back that wakes the instances waiting for it.
//!
//! Companion keys share their entry's hash slot, so each script touches one slot on a
//! cluster: `<prefix>lease:{<entry key>}` and `<prefix>fence:{<entry key>}`, the entry key
//! being the hash tag. An SN may hold `{` or `}` (a valid SN is any printable text), which
//! would make that tag something else: such an SN's companions are tagged with a short
//! string chosen to hash to the entry's slot instead (see [`companion_key`]).

use super::{CacheError, Write};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::time::Duration;

pub use super::wakeups::{Listener, Wakeups};

/// What a claim on one SN's fetch came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This instance holds the lease; `fence` is the SN's fence token now (empty if none),
    /// which its write-back must still find.
    Won {
        /// The fence token seen with the claim.
        fence: Bytes,
        /// Taken over from another instance, which held it for a fetch still queued.
        took_over: bool,
    },
    /// Another instance holds the lease.
    Lost,
    /// Asked only if absent, and the entry is there: written since it was read as missing
    /// (another instance fetched it meanwhile). Read it again.
    Present,
    /// Redis could not be asked: the caller fetches on its own (fail open).
    Skipped,
}

/// One SN to claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask<'a> {
    /// The SN.
    pub sn: &'a str,
    /// A miss (as opposed to a refresh): claimed only if its entry is absent.
    pub if_absent: bool,
    /// Its fetch waits behind others: the lease is held as queued, which an instance about
    /// to fetch the SN at once takes over, until [`Coordination::start`] turns it into a
    /// fetch's. A claim that is not queued takes a queued lease over.
    pub queued: bool,
}

/// A write-back made only if the SN's fence is still `fence` and the stored entry, if any,
/// was not fetched later; the lease `token` names (if any) is released in the same step.
#[derive(Debug, Clone)]
pub struct FencedWrite {
    /// The entry to store.
    pub write: Write,
    /// The fence token seen when the fetch was claimed (empty: none).
    pub fence: Bytes,
    /// The lease to release with it.
    pub token: Option<String>,
}

/// How many fenced writes Redis refused, by reason, and which were written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refusals {
    /// The SN was invalidated since the claim.
    pub fenced: usize,
    /// A later answer is stored.
    pub newer: usize,
    /// Whether each write (in order) was made.
    pub written: Vec<bool>,
}

/// The cross-instance side of coalescing, as the lookup core sees it. Every batch call sends
/// one pipeline per group (per chunk on one Redis, per master on a cluster).
pub trait Coordination: Send + Sync + 'static {
    /// Claims each SN's fetch for `lease_ttl` under `token`, in order (see [`Ask`]). A group
    /// Redis failed for comes back [`Claim::Skipped`].
    fn claim<'a>(
        &'a self,
        sns: &'a [Ask<'a>],
        token: &'a str,
        lease_ttl: Duration,
    ) -> BoxFuture<'a, Vec<Claim>>;

    /// Starts the fetch of each queued lease `(sn, token)`: from now on no other instance
    /// takes it over. `Some(true)` where it was still this token's (or already started),
    /// `Some(false)` where another instance took it over (or it is gone), `None` where Redis
    /// failed.
    fn start<'a>(
        &'a self,
        leases: &'a [(&'a str, &'a str)],
        lease_ttl: Duration,
    ) -> BoxFuture<'a, Vec<Option<bool>>>;

    /// Extends each lease `(sn, token)` still held to `lease_ttl`: `Some(false)` where it was
    /// lost (expired, or another instance holds it now), `None` where Redis failed.
    fn renew<'a>(
        &'a self,
        leases: &'a [(&'a str, &'a str)],
        lease_ttl: Duration,
    ) -> BoxFuture<'a, Vec<Option<bool>>>;

    /// Gives up each lease `(sn, token)` still held (compare-and-delete). Best effort: a
    /// lease not released expires on its own.
    fn release<'a>(&'a self, leases: &'a [(&'a str, &'a str)]) -> BoxFuture<'a, ()>;

    /// Writes each entry unless refused (see [`FencedWrite`]).
    ///
    /// # Errors
    /// A group Redis failed for (the others are written).
    fn write_fenced<'a>(
        &'a self,
        writes: &'a [FencedWrite],
    ) -> BoxFuture<'a, Result<Refusals, CacheError>>;

    /// Tells every instance to look at these SNs again: an answer was written (or a fetch
    /// ended without one, its lease released). Best effort: waiters also poll.
    fn announce<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, ()>;

    /// Where this instance's waiters listen for announcements.
    fn wakeups(&self) -> &std::sync::Arc<Wakeups>;
}

/// The key of `kind` (`lease`, `fence`) that goes with `entry_key` (`<prefix><sn>`), in the
/// same hash slot.
pub fn companion_key(prefix: &str, kind: &str, entry_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + kind.len() + entry_key.len() + 8);
    key.extend_from_slice(prefix.as_bytes());
    key.extend_from_slice(kind.as_bytes());
    key.push(b':');
    if entry_key.iter().any(|&byte| byte == b'{' || byte == b'}') {
        // `{tag}` then the key: the first braces are the tag's, whatever the SN holds.
        key.push(b'{');
        key.extend_from_slice(&slot_tag(entry_key));
        key.push(b'}');
        key.extend_from_slice(entry_key);
    } else {
        key.push(b'{');
        key.extend_from_slice(entry_key);
        key.push(b'}');
    }
    key
}

/// The first short alphanumeric string (in a fixed order, so every instance picks the same)
/// whose hash slot is `key`'s. At most 62^3 tries: every slot has a three-character tag.
fn slot_tag(key: &[u8]) -> Vec<u8> {
    use redis::cluster_routing::Slot;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let wanted = Slot::for_key(key);
    for len in 1..=4u32 {
        let count = ALPHABET.len().pow(len);
        for mut n in 0..count {
            let mut tag = Vec::with_capacity(len as usize);
            for _ in 0..len {
                tag.push(ALPHABET[n % ALPHABET.len()]);
                n /= ALPHABET.len();
            }
            if Slot::for_key(&tag) == wanted {
                return tag;
            }
        }
    }
    // Unreachable: 62^3 strings cover the 16,384 slots. The whole key still names the SN.
    key.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn leases_and_fences_share_their_entrys_hash_slot() {
        let prefix = "discount:v1:";
        for sn in [
            "A-1", "SN000123", "x{y}z", "{}", "}{", "a{", "b}", "{only}", "é{ü}",
        ] {
            let entry = format!("{prefix}{sn}");
            for kind in ["lease", "fence"] {
                let companion = companion_key(prefix, kind, entry.as_bytes());
                assert_eq!(
                    Slot::for_key(&companion),
                    Slot::for_key(entry.as_bytes()),
                    "{sn} {kind}: {}",
                    String::from_utf8_lossy(&companion)
                );
                assert_ne!(companion, entry.as_bytes());
            }
        }
    }

    #[test]
    fn companions_of_different_sns_differ() {
        let a = companion_key("p:", "lease", b"p:x{1}");
        let b = companion_key("p:", "lease", b"p:y{1}");
        assert_ne!(a, b);
        assert_eq!(companion_key("p:", "lease", b"p:A"), b"p:lease:{p:A}");
    }
}
