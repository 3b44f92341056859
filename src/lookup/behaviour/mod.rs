//! The lookup core's behaviour, proved in paused time over a scripted upstream and the
//! in-memory cache (see `testing`): what the integration suite shows with a real Redis and
//! HTTP, here in milliseconds. What needs real I/O stays in `tests/it/`.

mod coalescing;
mod deadline;
mod drain;
mod fence;
mod instances;
mod shedding;
mod stale;
mod streaming;
