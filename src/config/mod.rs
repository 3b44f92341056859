//! Configuration: the TOML file, then `DISCOUNT_PROXY_…` environment variables, then flags.
//! A bad value stops the start with a message naming the key, before any port is bound.

mod redact;
mod validate;

pub use self::redact::redacted_url;

use crate::secret::Secret;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The prefix of every environment variable that overrides a config key.
pub const ENV_PREFIX: &str = "DISCOUNT_PROXY_";

/// String keys whose environment values are taken verbatim. figment parses environment
/// values, so a token `0123` would become the number 123 and a key prefix `2024` a type error.
const VERBATIM_KEYS: [&str; 7] = [
    "upstream.token",
    "server.api_tokens",
    "redis.key_prefix",
    "redis.url",
    "redis.nodes",
    "redis.sentinel_master",
    "upstream.url",
];

/// `DISCOUNT_PROXY_…` variables that are not config keys: the `warm` client's, which may well
/// be set in the same shell as a proxy's (`DISCOUNT_PROXY_CLIENT_TOKEN`).
const CLIENT_KEYS: [&str; 1] = ["client_token"];

/// The file read when no `--config` is given; missing is fine (built-in defaults apply).
pub const DEFAULT_PATH: &str = "config/default.toml";

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file given with `--config` does not exist.
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    /// The file or an environment variable has an unknown key, a wrong type or bad syntax.
    // figment's message already names the key and where it came from (file or variable).
    #[error("invalid config: {0}")]
    Load(Box<figment::Error>),
    /// A value loaded but failed validation: out of range, a bad URL, an empty token.
    #[error("invalid config: {key}: {message}")]
    Invalid {
        /// The offending key's path, like `upstream.url`.
        key: &'static str,
        /// What is wrong with the value, for the operator.
        message: String,
    },
}

impl ConfigError {
    fn invalid(key: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            key,
            message: message.into(),
        }
    }
}

/// The whole configuration. Every section has defaults that work on a developer's machine.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`: how export jobs reach the proxy and what a request may be.
    pub server: ServerConfig,
    /// `[redis]`: where the shared cache lives and how hard the proxy may lean on it.
    pub redis: RedisConfig,
    /// `[cache]`: how long answers are kept before the upstream is asked again.
    pub cache: CacheConfig,
    /// `[upstream]`: the discount service being fronted and how it is called.
    pub upstream: UpstreamConfig,
    /// `[coalesce]`: how instances sharing a Redis share their upstream fetches.
    pub coalesce: CoalesceConfig,
    /// `[log]`: the shape of the log output.
    pub log: LogConfig,
}

/// The HTTP side facing export jobs and curl.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to bind; behind a load balancer, bind all interfaces.
    pub listen: SocketAddr,
    /// Most SNs in one lookup or invalidate request; more is `413 batch_too_large`.
    pub max_batch: usize,
    /// Largest request body in bytes, enforced while reading; more is `413 payload_too_large`.
    pub max_body_bytes: usize,
    /// Deadline of one lookup; SNs not resolved by then come back as `deadline_exceeded`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long in-flight requests and write-backs may take to finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A client that has not sent its request headers by then is disconnected (slowloris).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A request body must arrive completely within this (slow or stalled bodies).
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Bearer tokens accepted on `/v1/*`; empty means no auth (health checks stay open).
    #[serde(deserialize_with = "list_or_csv")]
    pub api_tokens: Vec<Secret>,
    /// Most `/v1/*` requests being answered at once; past it, `503 overloaded` at once, so
    /// the admitted ones keep their latency.
    pub max_in_flight: usize,
    /// After SIGTERM, how long the proxy keeps serving while `/readyz` answers 503, so a load
    /// balancer sees it leave before its connections are refused.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// A response the client takes no bytes of for this long is abandoned and its connection
    /// closed, freeing its `max_in_flight` slot (clients that stop reading).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Most open client connections; past it new ones wait in the kernel's backlog until one
    /// closes. Idle and slow sockets up to this number never keep a client from being served.
    pub max_connections: usize,
    /// A JSON lookup response at least this big is compressed when the client accepts `zstd`
    /// or `gzip`; a streamed (NDJSON) one always is. Smaller ones are not worth the CPU.
    pub compress_min_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_batch: 10_000,
            max_body_bytes: 4 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            api_tokens: Vec::new(),
            max_in_flight: 1024,
            drain_delay: Duration::ZERO,
            write_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            compress_min_bytes: 1024,
        }
    }
}

/// The shared cache. `Debug` redacts the URL's password (see `redact.rs`).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Where the shared cache is: `redis://[user:password@]host:port/db`, `rediss://` for TLS.
    pub url: String,
    /// How many multiplexed connections the proxy shares between all its requests. Each one
    /// pipelines whatever is sent on it concurrently, so a couple per core is plenty.
    pub pool_size: usize,
    /// Prefix of every key; bump its version to start from an empty cache.
    pub key_prefix: String,
    /// Bounds one Redis operation: the wait for a connection, a connect and the command
    /// together, however many callers wait. A lookup makes up to two Redis calls (read,
    /// write-back), so a hung Redis costs it a few times this, never more.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Most keys in one `MGET` or one write-back pipeline; bigger batches are split.
    pub chunk_size: usize,
    /// This many Redis failures in a row (timeouts, refused or broken connections) make the
    /// proxy skip Redis for `breaker_cooldown`, so a dead Redis does not add its timeout to
    /// every request. 0 turns the breaker off.
    pub breaker_failures: u32,
    /// How long Redis is skipped before one probe command tries it again.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// What kind of Redis deployment the proxy talks to, chosen at start.
    pub mode: RedisMode,
    /// Cluster: seed node URLs, each with its own credentials and TLS (empty: `url` is the
    /// one seed). Sentinel: the sentinels' URLs.
    #[serde(deserialize_with = "urls_list_or_csv")]
    pub nodes: Vec<String>,
    /// Sentinel: the master's service name. `url` then gives only the master's database,
    /// credentials and TLS.
    pub sentinel_master: Option<String>,
    /// Cluster and sentinel: cache reads may be answered by replicas (a little staler, less
    /// load on the masters).
    pub read_from_replicas: bool,
}

/// What kind of Redis deployment `redis.url` and `redis.nodes` point at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One Redis (`redis.url`).
    #[default]
    Standalone,
    /// A Redis Cluster: keys spread over its shards by hash slot.
    Cluster,
    /// A master with replicas watched by Sentinel.
    Sentinel,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/0".to_owned(),
            pool_size: 2,
            key_prefix: "discount:v1:".to_owned(),
            timeout: Duration::from_millis(250),
            chunk_size: 500,
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(1),
            mode: RedisMode::Standalone,
            nodes: Vec::new(),
            sentinel_master: None,
            read_from_replicas: false,
        }
    }
}

/// How long answers are kept.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long a fetched discount is fresh before it is fetched again (±10% jitter per key).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long a `not_found` answer is remembered, so unknown SNs do not hammer the upstream.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// How long past `ttl` a value may still be served, marked `stale`, while it is refreshed
    /// in the background, or while the upstream fails. Redis keeps keys for `ttl + stale_ttl`.
    #[serde(with = "humantime_serde")]
    pub stale_ttl: Duration,
    /// The last share of `ttl` (0 to 1) in which a hit may refresh its entry early, with a
    /// chance rising from 0 to 1 towards expiry, so hot keys never expire under load. 0 = off.
    pub early_refresh: f64,
    /// Entries kept by the in-memory cache used when Redis is not available (`demo`).
    pub memory_max_entries: usize,
    /// The in-process tier in front of Redis.
    pub local: LocalCacheConfig,
}

/// A small, short-lived copy of hot entries in the proxy's own memory, so they are answered
/// without a Redis round trip. Invalidations reach every instance's copy over Redis pub/sub;
/// if that channel is down, a copy is at most `ttl` out of date.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalCacheConfig {
    /// Whether the tier is used at all (off by default: one more place a value lives).
    pub enabled: bool,
    /// Most bytes of keys and values held; the least useful entries are evicted past it.
    pub max_bytes: usize,
    /// How long a copy is kept: the most a value can be out of date when an invalidation
    /// cannot be delivered, or when another instance refreshed it.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for LocalCacheConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_bytes: 16 * 1024 * 1024,
            ttl: Duration::from_secs(2),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(300),
            stale_ttl: Duration::from_secs(3600),
            early_refresh: 0.1,
            memory_max_entries: 100_000,
            local: LocalCacheConfig::default(),
        }
    }
}

/// The discount service being fronted. `Debug` redacts the URL's query values (see
/// `redact.rs`).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// The discount service's URL template; `{sn}` is replaced by the percent-encoded SN.
    pub url: String,
    /// Sent as `Authorization: Token <token>` when set; never logged.
    pub token: Option<Secret>,
    /// Most upstream requests in flight, across all lookups, to protect the upstream.
    pub concurrency: usize,
    /// Time allowed for one upstream request, body included; past it, `upstream_timeout`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Time allowed for the TCP connect to the upstream.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Retries of a request that timed out, could not connect or got a `5xx` or `429`; never
    /// of a `404` or a bad body, and never past the lookup's deadline.
    pub retries: u32,
    /// The first retry waits up to this long (full jitter), doubling per retry.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// No retry waits longer than this, unless the upstream's `Retry-After` asks for more.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// Most upstream fetches queued or in flight; a lookup that would need more new ones gets
    /// `503 overloaded`, while lookups the cache can answer still get through.
    pub max_pending: usize,
    /// `[upstream.circuit]`: when to stop calling a failing upstream.
    pub circuit: crate::circuit::CircuitSettings,
    /// Largest upstream body accepted; a larger one is an `upstream_error`.
    pub max_body_bytes: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8001/contract/?sn={sn}".to_owned(),
            token: None,
            concurrency: 128,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            retries: 2,
            retry_backoff: Duration::from_millis(50),
            retry_backoff_max: Duration::from_secs(2),
            max_pending: 100_000,
            circuit: crate::circuit::CircuitSettings::default(),
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// Instances sharing one Redis acting as one: a fetch is claimed in Redis before it starts,
/// so the others wait for its answer instead of asking the upstream again.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoalesceConfig {
    /// With Redis: claims, notified waiting and fenced write-backs across instances. Off, each
    /// instance coalesces only its own requests, as before.
    pub distributed: bool,
    /// How long one instance's claim on a fetch lasts unless renewed (it is renewed every
    /// third of this while the fetch runs): the longest a crashed holder delays the others.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

impl Default for CoalesceConfig {
    fn default() -> Self {
        Self {
            distributed: true,
            lease_ttl: Duration::from_secs(10),
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines; `RUST_LOG` sets the level.
    pub format: LogFormat,
}

/// `text` for people, `json` for log pipelines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines, for a terminal (the default).
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

impl Config {
    /// Loads the file (or the default path, if present), then applies the environment.
    ///
    /// # Errors
    /// A missing explicit file, an unknown key, a wrong type: the message names the key and
    /// where it came from.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(path, ENV_PREFIX)
    }

    fn load_from(path: Option<&Path>, env_prefix: &str) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        match path {
            Some(path) if !path.exists() => return Err(ConfigError::MissingFile(path.to_owned())),
            Some(path) => figment = figment.merge(Toml::file_exact(path)),
            None if Path::new(DEFAULT_PATH).exists() => {
                figment = figment.merge(Toml::file_exact(DEFAULT_PATH));
            }
            None => {}
        }
        let env = Env::prefixed(env_prefix).split("__");
        figment = figment.merge(env.ignore(&VERBATIM_KEYS).ignore(&CLIENT_KEYS));
        for (key, value) in verbatim_env_values(env_prefix) {
            figment = figment.merge(Serialized::default(key, value));
        }
        figment
            .extract::<Config>()
            .map_err(|err| ConfigError::Load(Box::new(err)))
    }
}

/// The environment values of [`VERBATIM_KEYS`], matched like figment matches names (case
/// aside), so no spelling of a variable is silently dropped.
fn verbatim_env_values(prefix: &str) -> Vec<(&'static str, String)> {
    let wanted: Vec<(String, &'static str)> = VERBATIM_KEYS
        .iter()
        .map(|key| {
            (
                format!("{prefix}{}", key.replace('.', "__")).to_ascii_uppercase(),
                *key,
            )
        })
        .collect();
    std::env::vars_os()
        .filter_map(|(name, value)| {
            let name = name.to_str()?.trim().to_ascii_uppercase();
            let (_, key) = wanted.iter().find(|(variable, _)| *variable == name)?;
            Some((*key, value.to_string_lossy().into_owned()))
        })
        .collect()
}

/// A list from TOML, or a comma-separated string from an environment variable (an empty one
/// is an empty list).
fn list_or_csv<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Secret>, D::Error> {
    Ok(strings_or_csv(deserializer)?
        .into_iter()
        .map(Secret::new)
        .collect())
}

/// [`list_or_csv`] for URLs.
fn urls_list_or_csv<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    strings_or_csv(deserializer)
}

fn strings_or_csv<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCsv {
        List(Vec<String>),
        Csv(String),
    }
    Ok(match ListOrCsv::deserialize(deserializer)? {
        ListOrCsv::List(list) => list,
        ListOrCsv::Csv(csv) => csv
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

#[cfg(test)]
// figment's Jail closures return figment::Error, which is large; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in_jail(jail: &Jail, file: Option<&str>) -> Result<Config, ConfigError> {
        let path = file.map(|contents| {
            let path = jail.directory().join("test.toml");
            std::fs::write(&path, contents).unwrap();
            path
        });
        let config = Config::load(path.as_deref())?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn every_file_in_config_dir_loads_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                let config = Config::load_from(Some(&path), "NOTHING_SET_")
                    .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
                config
                    .validate()
                    .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
                seen += 1;
            }
        }
        assert!(
            seen >= 2,
            "expected default.toml and production.example.toml"
        );
    }

    fn key_paths(value: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    key_paths(value, &path, out);
                }
            }
            serde_json::Value::Null => {}
            _ => out.push(prefix.to_owned()),
        }
    }

    #[test]
    fn the_production_example_documents_every_key() {
        let mut known = Vec::new();
        key_paths(
            &serde_json::to_value(Config::default()).unwrap(),
            "",
            &mut known,
        );
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/production.example.toml");
        let file: serde_json::Value = Figment::from(Toml::file_exact(path)).extract().unwrap();
        let mut documented = Vec::new();
        key_paths(&file, "", &mut documented);
        let missing: Vec<_> = known
            .iter()
            .filter(|key| !documented.contains(key))
            .collect();
        assert!(
            missing.is_empty(),
            "not in production.example.toml: {missing:?}"
        );
        assert!(known.len() > 20, "{known:?}");
    }

    #[test]
    fn env_overrides_file_and_lists_are_comma_separated() {
        Jail::expect_with(|jail| {
            jail.set_env("DISCOUNT_PROXY_SERVER__MAX_BATCH", "500");
            jail.set_env("DISCOUNT_PROXY_SERVER__API_TOKENS", "t1, t2");
            jail.set_env("DISCOUNT_PROXY_UPSTREAM__TOKEN", "012345");
            jail.set_env("DISCOUNT_PROXY_CACHE__TTL", "90s");
            jail.set_env("DISCOUNT_PROXY_REDIS__KEY_PREFIX", "2024");
            jail.set_env("discount_proxy_upstream__url", "http://up:1/?sn={sn}");
            let config = load_in_jail(jail, Some("[server]\nmax_batch = 20\n")).unwrap();
            assert_eq!(config.server.max_batch, 500);
            let tokens: Vec<_> = config
                .server
                .api_tokens
                .iter()
                .map(Secret::expose)
                .collect();
            assert_eq!(tokens, ["t1", "t2"]);
            assert_eq!(
                config.upstream.token.as_ref().map(Secret::expose),
                Some("012345")
            );
            assert_eq!(config.cache.ttl, Duration::from_secs(90));
            assert_eq!(config.redis.key_prefix, "2024");
            assert_eq!(config.upstream.url, "http://up:1/?sn={sn}");
            Ok(())
        });
    }

    #[test]
    fn redis_topology_keys_load_from_the_environment_and_errors_name_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("DISCOUNT_PROXY_REDIS__MODE", "cluster");
            jail.set_env(
                "DISCOUNT_PROXY_REDIS__NODES",
                "redis://10.0.0.1:7000, rediss://u:p@10.0.0.2:7000",
            );
            let config = load_in_jail(jail, None).unwrap();
            assert_eq!(config.redis.mode, RedisMode::Cluster);
            assert_eq!(
                config.redis.nodes,
                ["redis://10.0.0.1:7000", "rediss://u:p@10.0.0.2:7000"]
            );
            assert!(
                !format!("{config:?}").contains("u:p@"),
                "a node's password is redacted"
            );
            jail.set_env("DISCOUNT_PROXY_REDIS__NODES", "");
            assert!(load_in_jail(jail, None).unwrap().redis.nodes.is_empty());
            jail.set_env("DISCOUNT_PROXY_REDIS__NODES", "redis://ok:1,nope");
            let err = load_in_jail(jail, None).unwrap_err().to_string();
            assert!(err.contains("redis.nodes"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            let err = load_in_jail(
                jail,
                Some("[redis]\nmode = \"sentinel\"\nnodes = [\"redis://s:26379\"]\n"),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("redis.sentinel_master"), "{err}");
            let err = load_in_jail(jail, Some("[redis]\nmode = \"shards\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("mode"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_named_in_the_error() {
        Jail::expect_with(|jail| {
            let err = load_in_jail(jail, Some("[server]\nmax_btach = 1\n")).unwrap_err();
            assert!(err.to_string().contains("max_btach"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("DISCOUNT_PROXY_REDIS__URLL", "redis://x");
            let err = load_in_jail(jail, None).unwrap_err();
            assert!(err.to_string().contains("urll"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_warm_clients_token_variable_is_not_a_config_key() {
        Jail::expect_with(|jail| {
            jail.set_env("DISCOUNT_PROXY_CLIENT_TOKEN", "tok-1");
            jail.set_env("DISCOUNT_PROXY_SERVER__MAX_BATCH", "7");
            let config = load_in_jail(jail, None).unwrap();
            assert_eq!(config.server.max_batch, 7);
            assert!(config.server.api_tokens.is_empty());
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_named_in_the_error() {
        Jail::expect_with(|jail| {
            let err = load_in_jail(jail, Some("[cache]\nttl = \"soon\"\n")).unwrap_err();
            assert!(err.to_string().contains("ttl"), "{err}");
            let err = load_in_jail(jail, Some("[upstream]\nurl = \"http://x/a\"\n")).unwrap_err();
            assert!(err.to_string().contains("upstream.url"), "{err}");
            let err = load_in_jail(jail, Some("[redis]\nurl = \"nope\"\n")).unwrap_err();
            assert!(err.to_string().contains("redis.url"), "{err}");
            let err = load_in_jail(jail, Some("[upstream]\nconcurrency = 0\n")).unwrap_err();
            assert!(err.to_string().contains("upstream.concurrency"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn debug_output_redacts_tokens() {
        let mut config = Config::default();
        config.upstream.token = Some(Secret::new("upstream-secret"));
        config.server.api_tokens = vec![Secret::new("client-secret")];
        let printed = format!("{config:?}");
        assert!(!printed.contains("upstream-secret") && !printed.contains("client-secret"));
    }

    #[test]
    fn debug_output_redacts_the_redis_password_and_upstream_query_values() {
        let mut config = Config::default();
        config.redis.url = "redis://proxy:redis-secret@cache:6379/0".to_owned();
        config.upstream.url = "https://up/contract/{sn}?api_key=key-secret&v=2".to_owned();
        for printed in [format!("{config:?}"), format!("{:?}", config.redis)] {
            assert!(!printed.contains("redis-secret"), "{printed}");
            assert!(!printed.contains("key-secret"), "{printed}");
        }
        let printed = format!("{config:?}");
        assert!(
            printed.contains("redis://proxy:***@cache:6379/0"),
            "{printed}"
        );
        assert!(
            printed.contains("/contract/{sn}?api_key=***&v=***"),
            "{printed}"
        );
        assert!(
            printed.contains("pool_size: 2"),
            "the rest is still shown: {printed}"
        );
    }
}
