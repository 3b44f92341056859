//! What a lookup produces: an outcome per distinct SN, and the batch summary.

use crate::sn::SnError;
use crate::upstream::UpstreamError;
use bytes::Bytes;
use serde::Serialize;
use std::time::Duration;

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Upstream,
    Stale,
}

impl Source {
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
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
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
    Found { discount: Bytes, source: Source },
    NotFound { source: Source },
    Invalid(SnError),
    Failed(ItemError),
}

/// The `summary` of a batch response; counts are over distinct SNs.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub requested: usize,
    pub unique: usize,
    pub cache_hits: usize,
    pub upstream_fetches: usize,
    pub stale: usize,
    pub not_found: usize,
    pub errors: usize,
    pub invalid: usize,
    pub elapsed_ms: u64,
}

/// A resolved batch: each distinct SN once, and for each requested position which one it is.
#[derive(Debug)]
pub struct Batch {
    pub distinct: Vec<String>,
    pub outcomes: Vec<Outcome>,
    /// `order[i]` is the index in `distinct` of the `i`-th requested SN.
    pub order: Vec<usize>,
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
