//! What a lookup produces: an outcome per distinct SN, and the batch summary.

use crate::sn::SnError;
use crate::upstream::UpstreamError;
use bytes::Bytes;
use serde::Serialize;
use std::time::Duration;

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A fresh cache hit (`X-Cache: HIT`).
    Cache,
    /// Fetched from the upstream for this lookup (`X-Cache: MISS`).
    Upstream,
    /// A cached value past its TTL, served while it is refreshed or while the upstream fails
    /// (`X-Cache: STALE`).
    Stale,
}

impl Source {
    /// The `source` word in a response item.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::Upstream => "upstream",
            Self::Stale => "stale",
        }
    }
}

/// Why one SN of a batch has no answer; the others are unaffected.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ItemError {
    /// The upstream gave no definite answer: an error status, bad body, timeout, no
    /// connection, or an open circuit.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// `server.request_timeout` ran out before this SN was resolved.
    #[error("the request's deadline passed before the upstream answered")]
    DeadlineExceeded,
}

impl ItemError {
    /// The API error code, from API.md's table of item codes.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Upstream(err) => err.code(),
            Self::DeadlineExceeded => "deadline_exceeded",
        }
    }
}

/// What happened to one distinct SN.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The SN has a discount (`status: ok`).
    Found {
        /// The upstream's JSON, single-line, spliced into the response as-is.
        discount: Bytes,
        /// Where the answer came from.
        source: Source,
    },
    /// The upstream does not know the SN (`status: not_found`).
    NotFound {
        /// Where the answer came from.
        source: Source,
    },
    /// The SN failed validation; nothing was sent to Redis or the upstream for it.
    Invalid(SnError),
    /// No answer could be had for this SN (`status: error`); the others are unaffected.
    Failed(ItemError),
}

impl Outcome {
    /// The outcome's name in `discount_proxy_sns_total`.
    pub fn metric(&self) -> crate::metrics::SnOutcome {
        use crate::metrics::SnOutcome;
        match self {
            Self::Found {
                source: Source::Cache,
                ..
            } => SnOutcome::Hit,
            Self::Found {
                source: Source::Stale,
                ..
            } => SnOutcome::Stale,
            Self::Found {
                source: Source::Upstream,
                ..
            } => SnOutcome::Miss,
            Self::NotFound { .. } => SnOutcome::NotFound,
            Self::Invalid(_) => SnOutcome::Invalid,
            Self::Failed(_) => SnOutcome::Error,
        }
    }
}

/// The `summary` of a batch response; counts are over distinct SNs.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    /// SNs in the request, duplicates included.
    pub requested: usize,
    /// Distinct SNs, each looked up once.
    pub unique: usize,
    /// Fresh answers (found or not found) served from the cache.
    pub cache_hits: usize,
    /// SNs sent to the upstream, whether or not they were answered in time.
    pub upstream_fetches: usize,
    /// Answers served stale, past their TTL, while refreshed in the background.
    pub stale: usize,
    /// SNs the upstream does not know, cached or fetched.
    pub not_found: usize,
    /// SNs that got no answer (upstream failure or deadline).
    pub errors: usize,
    /// SNs rejected by validation.
    pub invalid: usize,
    /// Time from the request's arrival to the end of the lookup, in milliseconds.
    pub elapsed_ms: u64,
}

/// A resolved batch: each distinct SN once, and for each requested position which one it is.
#[derive(Debug)]
pub struct Batch {
    /// Each requested SN once, in first-seen order.
    pub distinct: Vec<String>,
    /// The outcome of each SN in `distinct`, at the same index.
    pub outcomes: Vec<Outcome>,
    /// `order[i]` is the index in `distinct` of the `i`-th requested SN.
    pub order: Vec<usize>,
    /// The counts and timing reported in the response's `summary`.
    pub summary: Summary,
}

impl Batch {
    /// The results in request order, duplicates repeated.
    pub fn in_request_order(&self) -> impl Iterator<Item = (&str, &Outcome)> {
        self.order
            .iter()
            .map(|&i| (self.distinct[i].as_str(), &self.outcomes[i]))
    }
}

pub(super) fn summarize(
    requested: usize,
    outcomes: &[Outcome],
    upstream_fetches: usize,
    elapsed: Duration,
) -> Summary {
    let mut summary = Summary {
        requested,
        unique: outcomes.len(),
        upstream_fetches,
        elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        ..Summary::default()
    };
    for outcome in outcomes {
        match outcome {
            Outcome::Found { source, .. } | Outcome::NotFound { source } => {
                match source {
                    Source::Cache => summary.cache_hits += 1,
                    Source::Stale => summary.stale += 1,
                    Source::Upstream => {}
                }
                if matches!(outcome, Outcome::NotFound { .. }) {
                    summary.not_found += 1;
                }
            }
            Outcome::Invalid(_) => summary.invalid += 1,
            Outcome::Failed(_) => summary.errors += 1,
        }
    }
    summary
}
