//! A Redis shared by several lookup cores, as instances share one: the in-memory cache for
//! entries, and in memory too the leases (expiring in paused time), the fences and the
//! announcements the real scripts and channel carry. It can be made unreachable.

use crate::cache::coordination::{Ask, Claim, Coordination, FencedWrite, Refusals, Wakeups};
use crate::cache::{Cache, CacheError, CacheKind, MemoryCache, Values, Write};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The shared store.
pub(in crate::lookup) struct FakeRedis {
    memory: MemoryCache,
    /// Each lease's value (its token, or `q` and its token while queued), as the scripts
    /// keep it, and when it expires.
    leases: Mutex<HashMap<String, (String, Instant)>>,
    fences: Mutex<HashMap<String, String>>,
    instances: Mutex<Vec<Arc<Wakeups>>>,
    fence_count: AtomicU64,
    down: AtomicBool,
    /// Claim calls made, for "a pure-hit lookup claims nothing".
    pub(in crate::lookup) claim_calls: AtomicU64,
    /// Release calls that sent anything (as `RedisCache`, which sends nothing for none), for
    /// "dropped claims go in one call".
    pub(in crate::lookup) release_calls: AtomicU64,
}

impl Default for FakeRedis {
    fn default() -> Self {
        Self {
            memory: MemoryCache::new(100_000),
            leases: Mutex::default(),
            fences: Mutex::default(),
            instances: Mutex::default(),
            fence_count: AtomicU64::new(0),
            down: AtomicBool::new(false),
            claim_calls: AtomicU64::new(0),
            release_calls: AtomicU64::new(0),
        }
    }
}

impl FakeRedis {
    /// One instance's connection to it.
    pub(in crate::lookup) fn link(self: &Arc<Self>) -> Arc<FakeLink> {
        let wakeups = Arc::new(Wakeups::default());
        self.instances.lock().unwrap().push(Arc::clone(&wakeups));
        Arc::new(FakeLink {
            redis: Arc::clone(self),
            wakeups,
        })
    }

    /// Makes every coordination call fail (or work again).
    pub(in crate::lookup) fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// Whether `sn`'s lease is held now.
    pub(in crate::lookup) fn leased(&self, sn: &str) -> bool {
        let leases = self.leases.lock().unwrap();
        leases
            .get(sn)
            .is_some_and(|(_, until)| *until > Instant::now())
    }

    fn holder(&self, sn: &str) -> Option<String> {
        let leases = self.leases.lock().unwrap();
        let (token, until) = leases.get(sn)?;
        (*until > Instant::now()).then(|| token.clone())
    }

    fn fence(&self, sn: &str) -> String {
        self.fences
            .lock()
            .unwrap()
            .get(sn)
            .cloned()
            .unwrap_or_default()
    }
}

impl Cache for FakeRedis {
    fn get_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Values> {
        self.memory.get_many(sns)
    }

    fn set_many<'a>(&'a self, writes: &'a [Write]) -> BoxFuture<'a, Result<(), CacheError>> {
        self.memory.set_many(writes)
    }

    /// An invalidation with fences, as `RedisCache` makes it with `coalesce.distributed`.
    fn delete_many<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, Result<u64, CacheError>> {
        let token = self.fence_count.fetch_add(1, Ordering::SeqCst).to_string();
        let mut fences = self.fences.lock().unwrap();
        for sn in sns {
            fences.insert((*sn).to_owned(), token.clone());
        }
        drop(fences);
        self.memory.delete_many(sns)
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), CacheError>> {
        self.memory.ping()
    }

    fn kind(&self) -> CacheKind {
        CacheKind::Redis
    }
}

/// One instance's side: its own waiters, the shared store.
pub(in crate::lookup) struct FakeLink {
    redis: Arc<FakeRedis>,
    wakeups: Arc<Wakeups>,
}

impl Coordination for FakeLink {
    fn claim<'a>(
        &'a self,
        sns: &'a [Ask<'a>],
        token: &'a str,
        lease_ttl: Duration,
    ) -> BoxFuture<'a, Vec<Claim>> {
        Box::pin(async move {
            let redis = &self.redis;
            redis.claim_calls.fetch_add(1, Ordering::SeqCst);
            let mut claims = Vec::with_capacity(sns.len());
            for ask in sns {
                let sn = ask.sn;
                if redis.is_down() {
                    claims.push(Claim::Skipped);
                    continue;
                }
                let stored = redis.memory.get_many(&[sn]).await.values.pop().flatten();
                if ask.if_absent && stored.is_some() {
                    claims.push(Claim::Present);
                    continue;
                }
                let took_over = match redis.holder(sn) {
                    None => false,
                    Some(held) if held.starts_with('q') && !ask.queued => true,
                    Some(_) => {
                        claims.push(Claim::Lost);
                        continue;
                    }
                };
                let value = match ask.queued {
                    true => format!("q{token}"),
                    false => token.to_owned(),
                };
                let until = Instant::now() + lease_ttl;
                let mut leases = redis.leases.lock().unwrap();
                leases.insert(sn.to_owned(), (value, until));
                drop(leases);
                claims.push(Claim::Won {
                    fence: Bytes::from(redis.fence(sn)),
                    took_over,
                });
            }
            claims
        })
    }

    fn start<'a>(
        &'a self,
        leases: &'a [(&'a str, &'a str)],
        lease_ttl: Duration,
    ) -> BoxFuture<'a, Vec<Option<bool>>> {
        // A queued lease becomes the token's, its TTL renewed; a started one is left as it is.
        let started = self.extend(leases, lease_ttl, |held, token| {
            held.starts_with('q').then(|| token.to_owned())
        });
        Box::pin(async move { started })
    }

    fn renew<'a>(
        &'a self,
        leases: &'a [(&'a str, &'a str)],
        lease_ttl: Duration,
    ) -> BoxFuture<'a, Vec<Option<bool>>> {
        let renewed = self.extend(leases, lease_ttl, |held, _| Some(held.to_owned()));
        Box::pin(async move { renewed })
    }

    fn release<'a>(&'a self, leases: &'a [(&'a str, &'a str)]) -> BoxFuture<'a, ()> {
        if !leases.is_empty() {
            self.redis.release_calls.fetch_add(1, Ordering::SeqCst);
        }
        for (sn, token) in leases {
            self.release_one(sn, token);
        }
        Box::pin(async {})
    }

    fn write_fenced<'a>(
        &'a self,
        writes: &'a [FencedWrite],
    ) -> BoxFuture<'a, Result<Refusals, CacheError>> {
        Box::pin(async move {
            if self.redis.is_down() {
                return Err(CacheError::ConnectFailed);
            }
            let mut refusals = Refusals::default();
            for fenced in writes {
                let sn = fenced.write.sn.as_str();
                if let Some(token) = &fenced.token {
                    self.release_one(sn, token);
                }
                refusals.written.push(false);
                if self.redis.fence(sn).as_bytes() != fenced.fence {
                    refusals.fenced += 1;
                    continue;
                }
                let stored = self
                    .redis
                    .memory
                    .get_many(&[sn])
                    .await
                    .values
                    .pop()
                    .flatten();
                let mine = fetched_ms(&fenced.write.value);
                if let (Some(theirs), Some(mine)) = (stored.as_deref().and_then(fetched_ms), mine)
                    && theirs > mine
                {
                    refusals.newer += 1;
                    continue;
                }
                self.redis
                    .memory
                    .set_many(std::slice::from_ref(&fenced.write))
                    .await?;
                refusals.written.pop();
                refusals.written.push(true);
            }
            Ok(refusals)
        })
    }

    fn announce<'a>(&'a self, sns: &'a [&'a str]) -> BoxFuture<'a, ()> {
        if !self.redis.is_down() {
            for wakeups in self.redis.instances.lock().unwrap().iter() {
                wakeups.wake(sns.iter().copied());
            }
        }
        Box::pin(async {})
    }

    fn wakeups(&self) -> &Arc<Wakeups> {
        &self.wakeups
    }
}

/// Whether a lease's value is `token`'s, queued or not, as the real scripts compare it.
fn holds(held: &str, token: &str) -> bool {
    held.strip_prefix('q').unwrap_or(held) == token
}

/// The fetch time in a `dp1±<13-digit ms>` header, as the real script reads it.
fn fetched_ms(raw: &[u8]) -> Option<u64> {
    let digits = raw.get(4..17)?;
    raw.starts_with(b"dp1").then_some(())?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

impl FakeLink {
    /// Whether each lease `(sn, token)` is still `token`'s (queued or not); where `value(held,
    /// token)` gives a new value, it is set and lasts `lease_ttl` more, as `START` and `RENEW`
    /// do.
    fn extend(
        &self,
        leases: &[(&str, &str)],
        lease_ttl: Duration,
        value: impl Fn(&str, &str) -> Option<String>,
    ) -> Vec<Option<bool>> {
        let redis = &self.redis;
        leases
            .iter()
            .map(|(sn, token)| {
                if redis.is_down() {
                    return None;
                }
                let held = redis.holder(sn).filter(|held| holds(held, token));
                if let Some(value) = held.as_deref().and_then(|held| value(held, token)) {
                    let until = Instant::now() + lease_ttl;
                    let mut all = redis.leases.lock().unwrap();
                    all.insert((*sn).to_owned(), (value, until));
                }
                Some(held.is_some())
            })
            .collect()
    }

    fn release_one(&self, sn: &str, token: &str) {
        if self.redis.is_down() {
            return;
        }
        let mut leases = self.redis.leases.lock().unwrap();
        if leases.get(sn).is_some_and(|(held, _)| holds(held, token)) {
            leases.remove(sn);
        }
    }
}
