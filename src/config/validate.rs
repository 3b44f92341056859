//! What types alone cannot check: ranges, URL shapes, the `{sn}` placeholder.

use super::{Config, ConfigError, RedisMode, redacted_url};
use std::time::Duration;

/// The longest timeout or grace period accepted: longer is a typo, and would overflow clocks.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The longest TTL accepted (Redis takes more, but no discount should be cached longer).
const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

impl Config {
    /// Checks what types alone cannot: ranges, URL shapes, the `{sn}` placeholder, tokens
    /// that fit in a header.
    ///
    /// # Errors
    /// The first invalid key, with what is wrong with it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let server = &self.server;
        at_least(server.max_batch, 1, "server.max_batch")?;
        at_least(server.max_body_bytes, 64, "server.max_body_bytes")?;
        timeout(server.request_timeout, "server.request_timeout")?;
        timeout(server.shutdown_grace, "server.shutdown_grace")?;
        timeout(server.header_read_timeout, "server.header_read_timeout")?;
        timeout(server.body_read_timeout, "server.body_read_timeout")?;
        if server
            .api_tokens
            .iter()
            .any(|token| token.expose().is_empty())
        {
            return Err(ConfigError::invalid(
                "server.api_tokens",
                "a token is empty",
            ));
        }
        at_least(server.max_in_flight, 1, "server.max_in_flight")?;
        timeout(server.write_timeout, "server.write_timeout")?;
        at_least(server.max_connections, 1, "server.max_connections")?;
        within(
            server.drain_delay,
            Duration::ZERO,
            MAX_TIMEOUT,
            "server.drain_delay",
        )?;
        validate_redis_url(&self.redis.url, "redis.url")?;
        self.validate_topology()?;
        at_least(self.redis.pool_size, 1, "redis.pool_size")?;
        at_least(self.redis.chunk_size, 1, "redis.chunk_size")?;
        timeout(self.redis.timeout, "redis.timeout")?;
        timeout(self.redis.breaker_cooldown, "redis.breaker_cooldown")?;
        ttl(self.cache.ttl, "cache.ttl")?;
        ttl(self.cache.negative_ttl, "cache.negative_ttl")?;
        within(
            self.cache.stale_ttl,
            Duration::ZERO,
            MAX_TTL,
            "cache.stale_ttl",
        )?;
        fraction(self.cache.early_refresh, "cache.early_refresh")?;
        at_least(self.cache.memory_max_entries, 1, "cache.memory_max_entries")?;
        at_least(self.cache.local.max_bytes, 4096, "cache.local.max_bytes")?;
        // Minutes at most: it bounds how out of date a copy can be when invalidations are lost.
        within(
            self.cache.local.ttl,
            Duration::from_millis(1),
            Duration::from_secs(600),
            "cache.local.ttl",
        )?;
        validate_upstream_url(&self.upstream.url)?;
        validate_upstream_token(self.upstream.token.as_ref())?;
        at_least(self.upstream.concurrency, 1, "upstream.concurrency")?;
        timeout(self.upstream.timeout, "upstream.timeout")?;
        timeout(self.upstream.connect_timeout, "upstream.connect_timeout")?;
        at_least(self.upstream.max_body_bytes, 2, "upstream.max_body_bytes")?;
        self.validate_resilience()?;
        self.validate_coalesce()
    }

    /// `[coalesce]`: a lease long enough to renew over a Redis round trip, short enough that
    /// a crashed holder does not stall the others for long; a key prefix that leaves every
    /// key's hash slot to its SN on a cluster, so a claim's keys share the entry's slot.
    fn validate_coalesce(&self) -> Result<(), ConfigError> {
        within(
            self.coalesce.lease_ttl,
            Duration::from_millis(300),
            Duration::from_secs(600),
            "coalesce.lease_ttl",
        )?;
        let prefix = &self.redis.key_prefix;
        if self.coalesce.distributed
            && self.redis.mode == RedisMode::Cluster
            && prefix.contains(['{', '}'])
        {
            return Err(ConfigError::invalid(
                "redis.key_prefix",
                "must not hold '{' or '}' on a cluster with coalesce.distributed: the prefix \
                 would pick the hash slot of every key, claims and fences included",
            ));
        }
        Ok(())
    }

    /// `redis.mode` and what it needs: cluster seeds that are Redis URLs, a sentinel master
    /// name.
    fn validate_topology(&self) -> Result<(), ConfigError> {
        let redis = &self.redis;
        match redis.mode {
            RedisMode::Standalone => Ok(()),
            RedisMode::Cluster => redis
                .nodes
                .iter()
                .try_for_each(|node| validate_redis_url(node, "redis.nodes")),
            RedisMode::Sentinel => {
                match redis.sentinel_master.as_deref().map(str::trim) {
                    None | Some("") => {
                        return Err(ConfigError::invalid(
                            "redis.sentinel_master",
                            "is required when redis.mode is sentinel: the master's service name",
                        ));
                    }
                    Some(_) => {}
                }
                if redis.nodes.is_empty() {
                    return Err(ConfigError::invalid(
                        "redis.nodes",
                        "must list the sentinels' URLs when redis.mode is sentinel",
                    ));
                }
                redis
                    .nodes
                    .iter()
                    .try_for_each(|node| validate_redis_url(node, "redis.nodes"))
            }
        }
    }

    fn validate_resilience(&self) -> Result<(), ConfigError> {
        let upstream = &self.upstream;
        if upstream.retries > MAX_RETRIES {
            return Err(ConfigError::invalid(
                "upstream.retries",
                format!("must be at most {MAX_RETRIES}, got {}", upstream.retries),
            ));
        }
        timeout(upstream.retry_backoff, "upstream.retry_backoff")?;
        within(
            upstream.retry_backoff_max,
            upstream.retry_backoff,
            MAX_TIMEOUT,
            "upstream.retry_backoff_max",
        )?;
        // A batch the proxy accepts must be able to start its fetches on an idle proxy.
        at_least(
            upstream.max_pending,
            self.server.max_batch,
            "upstream.max_pending",
        )?;
        let circuit = &upstream.circuit;
        at_least(
            circuit.consecutive_failures as usize,
            1,
            "upstream.circuit.consecutive_failures",
        )?;
        if !(circuit.failure_ratio > 0.0 && circuit.failure_ratio <= 1.0) {
            return Err(ConfigError::invalid(
                "upstream.circuit.failure_ratio",
                format!(
                    "must be above 0 and at most 1, got {}",
                    circuit.failure_ratio
                ),
            ));
        }
        at_least(
            circuit.min_requests as usize,
            1,
            "upstream.circuit.min_requests",
        )?;
        timeout(circuit.window, "upstream.circuit.window")?;
        timeout(circuit.cooldown, "upstream.circuit.cooldown")?;
        at_least(circuit.probes as usize, 1, "upstream.circuit.probes")?;
        Ok(())
    }
}

/// More retries than this only stretch an outage: the deadline ends them anyway.
const MAX_RETRIES: u32 = 20;

fn fraction(value: f64, key: &'static str) -> Result<(), ConfigError> {
    if !(0.0..=1.0).contains(&value) {
        return Err(ConfigError::invalid(
            key,
            format!("must be between 0 and 1, got {value}"),
        ));
    }
    Ok(())
}

fn at_least(value: usize, min: usize, key: &'static str) -> Result<(), ConfigError> {
    if value < min {
        return Err(ConfigError::invalid(
            key,
            format!("must be at least {min}, got {value}"),
        ));
    }
    Ok(())
}

fn timeout(value: Duration, key: &'static str) -> Result<(), ConfigError> {
    within(value, Duration::from_millis(1), MAX_TIMEOUT, key)
}

fn ttl(value: Duration, key: &'static str) -> Result<(), ConfigError> {
    within(value, Duration::from_millis(1), MAX_TTL, key)
}

fn within(
    value: Duration,
    min: Duration,
    max: Duration,
    key: &'static str,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        let (min, max, got) = (
            humantime::format_duration(min),
            humantime::format_duration(max),
            humantime::format_duration(value),
        );
        return Err(ConfigError::invalid(
            key,
            format!("must be between {min} and {max}, got {got}"),
        ));
    }
    Ok(())
}

/// The token goes into `Authorization: Token <token>`: it must be a valid header value.
fn validate_upstream_token(token: Option<&crate::secret::Secret>) -> Result<(), ConfigError> {
    const KEY: &str = "upstream.token";
    let Some(token) = token else { return Ok(()) };
    if token.expose().is_empty() {
        return Err(ConfigError::invalid(
            KEY,
            "is empty; leave it unset for no token",
        ));
    }
    if hyper::header::HeaderValue::from_str(&format!("Token {}", token.expose())).is_err() {
        return Err(ConfigError::invalid(
            KEY,
            "holds characters a header cannot carry",
        ));
    }
    Ok(())
}

// Messages never echo a URL as given: it may hold a password.
fn validate_redis_url(raw: &str, key: &'static str) -> Result<(), ConfigError> {
    let url = url::Url::parse(raw)
        .map_err(|err| ConfigError::invalid(key, format!("is not a URL ({err})")))?;
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err(ConfigError::invalid(
            key,
            format!(
                "scheme {:?} is not supported; use redis://host:port/db or rediss:// for TLS",
                url.scheme()
            ),
        ));
    }
    // What redis-rs will do with it later, done now: the error names the key, before binding.
    redis::IntoConnectionInfo::into_connection_info(raw).map_err(|err| {
        ConfigError::invalid(key, format!("{} cannot be used: {err}", redacted_url(raw)))
    })?;
    Ok(())
}

fn validate_upstream_url(template: &str) -> Result<(), ConfigError> {
    const KEY: &str = "upstream.url";
    match template.matches("{sn}").count() {
        1 => {}
        0 => {
            return Err(ConfigError::invalid(
                KEY,
                format!("{} has no {{sn}} placeholder", redacted_url(template)),
            ));
        }
        _ => return Err(ConfigError::invalid(KEY, "must hold {sn} exactly once")),
    }
    let sample = template.replace("{sn}", "C2024-0001");
    let url = url::Url::parse(&sample)
        .map_err(|err| ConfigError::invalid(KEY, format!("is not a URL ({err})")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ConfigError::invalid(
            KEY,
            "must be an http:// or https:// URL with a host",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_that_redis_rs_rejects_are_config_errors() {
        assert!(validate_redis_url("redis://127.0.0.1:6379/0", "redis.url").is_ok());
        assert!(validate_redis_url("rediss://cache.internal:6380/1", "redis.url").is_ok());
        for bad in ["redis://h/abc", "mysql://h", "nope", "redis://"] {
            let err = validate_redis_url(bad, "redis.url")
                .unwrap_err()
                .to_string();
            assert!(err.contains("redis.url"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations_outside_sane_bounds_are_rejected_before_they_can_overflow() {
        let mut config = Config::default();
        config.server.request_timeout = Duration::from_secs(300_000_000_000);
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("server.request_timeout")
        );
        let mut config = Config::default();
        config.cache.ttl = Duration::from_secs(100 * 365 * 24 * 3600);
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("cache.ttl")
        );
        let mut config = Config::default();
        config.server.shutdown_grace = Duration::ZERO;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("server.shutdown_grace")
        );
    }

    #[test]
    fn upstream_tokens_must_fit_in_a_header() {
        use crate::secret::Secret;
        for (token, ok) in [
            ("abc123", true),
            ("", false),
            ("a\nb", false),
            ("a\rb", false),
        ] {
            let mut config = Config::default();
            config.upstream.token = Some(Secret::new(token));
            let result = config.validate();
            assert_eq!(result.is_ok(), ok, "{token:?}");
            if let Err(err) = result {
                assert!(err.to_string().contains("upstream.token"));
            }
        }
    }

    #[test]
    fn the_in_process_tier_is_accepted_in_every_redis_mode() {
        for mode in [
            RedisMode::Standalone,
            RedisMode::Cluster,
            RedisMode::Sentinel,
        ] {
            let mut config = Config::default();
            config.redis.mode = mode;
            config.redis.nodes = vec!["redis://127.0.0.1:26379".to_owned()];
            config.redis.sentinel_master = Some("mymaster".to_owned());
            config.cache.local.enabled = true;
            assert!(
                config.validate().is_ok(),
                "{mode:?}: {:?}",
                config.validate()
            );
        }
    }

    #[test]
    fn a_braced_key_prefix_is_refused_on_a_cluster_only_when_instances_coalesce() {
        let mut config = Config::default();
        config.redis.mode = RedisMode::Cluster;
        config.redis.key_prefix = "{discount}:".to_owned();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("redis.key_prefix"), "{err}");
        config.coalesce.distributed = false;
        assert!(config.validate().is_ok());
        config.coalesce.distributed = true;
        config.redis.mode = RedisMode::Standalone;
        assert!(config.validate().is_ok(), "one Redis has no slots");
    }

    #[test]
    fn a_lease_must_outlast_a_redis_round_trip() {
        let mut config = Config::default();
        config.coalesce.lease_ttl = Duration::from_millis(10);
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("coalesce.lease_ttl"), "{err}");
    }

    #[test]
    fn the_template_holds_sn_exactly_once() {
        assert!(validate_upstream_url("http://up/{sn}?again={sn}").is_err());
        assert!(validate_upstream_url("http://up/?sn={sn}").is_ok());
    }

    #[test]
    fn url_errors_never_echo_a_password() {
        for bad in [
            "redis://:s3cr3t@h/abc",
            "redis://u:s3cr3t@h:notaport/0",
            "redis://:s3cr3t#x@h",
        ] {
            let err = validate_redis_url(bad, "redis.url")
                .unwrap_err()
                .to_string();
            assert!(!err.contains("s3cr3t"), "{err}");
        }
        let err = validate_upstream_url("http://u:s3cr3t@up/contract")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("upstream.url") && !err.contains("s3cr3t"),
            "{err}"
        );
        let err = validate_upstream_url("http://u:s3cr3t@up:x/{sn}")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
    }
}
