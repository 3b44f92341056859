//! The one integration-test binary: real `redis-server`s, a real stub upstream over HTTP, and
//! the proxy on a free port. Set `TEST_LOG=1` to see the proxy's logs.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod support;

mod batch_bound;
mod cache_control;
mod chaos;
mod circuit;
mod cluster;
mod cluster_reads;
mod cluster_shards;
mod coalescing;
mod commands;
mod compression;
mod deployment;
mod drain;
mod failing_sns;
mod failover_windows;
mod foreign_entries;
mod garbage_input;
mod hostile_clients;
mod http_errors;
mod hung_redis;
mod instances;
mod instances_measured;
mod invalidation_loop;
mod lifecycle;
mod load_balancer;
mod local_tier;
mod lookup;
mod manual;
mod metrics;
mod observability;
mod openapi;
mod python_export;
mod redis_faults;
mod request_ids;
mod retries;
mod secrets;
mod secured_topologies;
mod sentinel_mode;
mod shedding;
mod stale;
mod streaming;
mod tier_topologies;
mod topologies;
mod upstream_errors;
mod warm;
