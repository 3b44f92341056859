//! Every label value a metric can carry, as a type: a typo is a compile error, and the
//! values an operator may see are listed here and nowhere else.
//!
//! prometheus-client's `EncodeLabelValue` derive writes a variant's name as it is spelled
//! (`NotFound`); the values this proxy has always exposed are lowercase (`not_found`), and
//! dashboards and alerts match on them. So each enum names its text once, in
//! [`label_values!`], which writes the enum, its text and its encoding together. Label
//! *sets* use the derive ([`EncodeLabelSet`]): a field's name is its label's name.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use std::fmt::Write as _;

/// Declares a label-value enum with the text each variant is exposed as.
macro_rules! label_values {
    ($(
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$variant_meta:meta])* $variant:ident => $text:literal,)+
        }
    )+) => {$(
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $name {
            /// The text the value is exposed as.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
                encoder.write_str(self.as_str())
            }
        }
    )+};
}

label_values! {
    /// Which `/v1/*` route a request took.
    pub enum Endpoint {
        /// `POST /v1/discounts/lookup`, JSON or NDJSON.
        Batch => "batch",
        /// `GET /v1/discounts/{sn}`.
        Single => "single",
        /// `POST /v1/discounts/invalidate`.
        Invalidate => "invalidate",
        /// `DELETE /v1/discounts/{sn}`.
        Delete => "delete",
    }

    /// What an SN of a lookup came to, for `discount_proxy_sns_total{outcome}`.
    pub enum SnOutcome {
        /// A fresh discount from the cache.
        Hit => "hit",
        /// A discount fetched from the upstream (or joined from a fetch under way).
        Miss => "miss",
        /// A discount served stale.
        Stale => "stale",
        /// The upstream does not know the SN (cached or fetched).
        NotFound => "not_found",
        /// The SN failed validation.
        Invalid => "invalid",
        /// No answer: an upstream failure, an open circuit, or the deadline.
        Error => "error",
    }

    /// How one upstream request ended.
    pub enum UpstreamOutcome {
        /// A discount.
        Ok => "ok",
        /// A definite `404`.
        NotFound => "not_found",
        /// Any other failure: a status, a bad body, a refused connection.
        Error => "error",
        /// No answer within `upstream.timeout`.
        Timeout => "timeout",
    }

    /// What became of answers handed to the write-back.
    pub enum WriteBackOutcome {
        /// Written.
        Ok => "ok",
        /// Redis failed the write.
        Failed => "failed",
        /// Redis's circuit was open: not tried.
        Skipped => "skipped",
        /// Invalidated while being fetched: not written.
        Fenced => "fenced",
        /// Still unwritten when the shutdown grace ran out.
        Abandoned => "abandoned",
    }

    /// A Redis command, as the metrics name it (a pipeline of `SET`s is `SET`).
    pub enum RedisCommand {
        /// A batch read.
        Mget => "MGET",
        /// The cluster's slot map, asked for when it may have changed.
        ClusterSlots => "CLUSTER SLOTS",
        /// Write-backs.
        Set => "SET",
        /// Invalidations.
        Del => "DEL",
        /// The readiness probe.
        Ping => "PING",
        /// An invalidation message to the other instances.
        Publish => "PUBLISH",
        /// Claims on fetches (leases), one script call per SN.
        Claim => "EVALSHA claim",
        /// Queued leases whose fetches start.
        Start => "EVALSHA start",
        /// Leases renewed while their fetches run.
        Renew => "EVALSHA renew",
        /// Leases given up by compare-and-delete.
        Release => "EVALSHA release",
        /// Write-backs made only if no invalidation and no newer answer came first.
        SetFenced => "EVALSHA set",
        /// Invalidations that fence fetches in flight on every instance.
        Fence => "EVALSHA fence",
        /// A script loaded on a node that did not have it.
        ScriptLoad => "SCRIPT LOAD",
    }

    /// How a Redis command ended.
    pub enum RedisOutcome {
        /// Redis answered.
        Ok => "ok",
        /// Redis answered with an error, or the connection broke.
        Error => "error",
        /// No answer within `redis.timeout`.
        Timeout => "timeout",
        /// Not sent: Redis's circuit was open.
        Skipped => "skipped",
    }

    /// The shared Redis connections, by state.
    pub enum PoolState {
        /// Open.
        Size => "size",
        /// Usable.
        Available => "available",
        /// Callers waiting for a connect.
        Waiting => "waiting",
    }

    /// Why a request was answered `503 overloaded`.
    pub enum ShedReason {
        /// Every `server.max_in_flight` slot was taken.
        InFlight => "in_flight",
        /// Its new fetches would pass `upstream.max_pending`.
        Pending => "pending",
    }

    /// A dependency with a circuit breaker.
    pub enum Dependency {
        /// The discount service.
        Upstream => "upstream",
        /// The shared cache.
        Redis => "redis",
    }

    /// Whether the in-process tier had an SN.
    pub enum LocalResult {
        /// It had it.
        Hit => "hit",
        /// It did not.
        Miss => "miss",
    }

    /// Something that happened on the invalidation channel.
    pub enum InvalidationEvent {
        /// This instance told the others.
        Published => "published",
        /// Telling the others failed.
        PublishFailed => "publish_failed",
        /// Another instance's message arrived.
        Received => "received",
    }
}

label_values! {
    /// What a claim on a missed SN's fetch came to.
    pub enum ClaimResult {
        /// This instance holds the lease and fetches.
        Won => "won",
        /// Another instance holds it: this one waits for its answer.
        Lost => "lost",
        /// Redis could not be asked: this instance fetches (local coalescing only).
        Skipped => "skipped",
        /// Another instance wrote the answer since this one read the SN as missing: read.
        Present => "present",
        /// Another instance held it for a fetch still queued behind others; this one was
        /// about to fetch it at once, so took it over and fetches it.
        TookOver => "took_over",
    }

    /// How a wait for another instance's fetch ended.
    pub enum WaitOutcome {
        /// Its answer was read after a notification (or right after listening).
        Notified => "notified",
        /// Its answer was read by the safety-net poll.
        Polled => "polled",
        /// Its lease expired or was released without an answer: this instance claimed and
        /// fetched.
        TookOver => "took_over",
        /// The request's deadline passed first.
        DeadlinePassed => "deadline_passed",
    }

    /// What happened to a lease this instance held.
    pub enum LeaseEvent {
        /// Renewed while its fetch ran.
        Renewed => "renewed",
        /// Found expired or taken over at renewal: another instance may fetch too.
        Expired => "expired",
        /// Held for a fetch still queued, taken over by an instance that fetched it at
        /// once: this one waits for that answer instead.
        Yielded => "yielded",
    }

    /// Why a fenced write-back was refused.
    pub enum RefusalReason {
        /// The SN was invalidated since its fetch was claimed.
        Fenced => "fenced",
        /// The entry in Redis was fetched later than this answer.
        Newer => "newer",
    }
}

impl SnOutcome {
    /// Every outcome, in the order of [`SnOutcome::index`].
    pub const ALL: [Self; 6] = [
        Self::Hit,
        Self::Miss,
        Self::Stale,
        Self::NotFound,
        Self::Invalid,
        Self::Error,
    ];

    /// The outcome's place in [`SnOutcome::ALL`], for counting in an array.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// `endpoint` and `status` of a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct EndpointStatus {
    pub(super) endpoint: Endpoint,
    pub(super) status: u16,
}

/// `endpoint` of a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct EndpointLabel {
    pub(super) endpoint: Endpoint,
}

/// `outcome` of an SN.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct SnLabel {
    pub(super) outcome: SnOutcome,
}

/// `outcome` of an upstream request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct UpstreamLabel {
    pub(super) outcome: UpstreamOutcome,
}

/// `outcome` of answers at the write-back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct WriteBackLabel {
    pub(super) outcome: WriteBackOutcome,
}

/// `command` and `outcome` of a Redis command.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct RedisLabels {
    pub(super) command: RedisCommand,
    pub(super) outcome: RedisOutcome,
}

/// `node` (a cluster master, `host:port`) and `outcome` of a Redis command.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct NodeLabels {
    pub(super) node: String,
    pub(super) outcome: RedisOutcome,
}

/// `command` of a Redis command.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct CommandLabel {
    pub(super) command: RedisCommand,
}

/// `state` of the shared Redis connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct PoolLabel {
    pub(super) state: PoolState,
}

/// `reason` a request was shed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct ShedLabel {
    pub(super) reason: ShedReason,
}

/// `dependency` of a circuit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct DependencyLabel {
    pub(super) dependency: Dependency,
}

/// `result` of an in-process tier lookup.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct LocalLabel {
    pub(super) result: LocalResult,
}

/// `event` on the invalidation channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct InvalidationLabel {
    pub(super) event: InvalidationEvent,
}

/// `result` of a claim.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct ClaimLabel {
    pub(super) result: ClaimResult,
}

/// `outcome` of a wait for another instance's fetch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct WaitLabel {
    pub(super) outcome: WaitOutcome,
}

/// `event` of a lease.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct LeaseLabel {
    pub(super) event: LeaseEvent,
}

/// `reason` a fenced write was refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct RefusalLabel {
    pub(super) reason: RefusalReason,
}
