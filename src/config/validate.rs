//! What types alone cannot check: ranges, URL shapes, the `{sn}` placeholder.

use super::{Config, ConfigError};
use std::time::Duration;

impl Config {
    /// Checks what types alone cannot: ranges, URL shapes, the `{sn}` placeholder.
    ///
    /// # Errors
    /// The first invalid key, with what is wrong with it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        at_least(self.server.max_batch, 1, "server.max_batch")?;
        at_least(self.server.max_body_bytes, 64, "server.max_body_bytes")?;
        positive(self.server.request_timeout, "server.request_timeout")?;
        positive(
            self.server.header_read_timeout,
            "server.header_read_timeout",
        )?;
        validate_redis_url(&self.redis.url)?;
        at_least(self.redis.pool_size, 1, "redis.pool_size")?;
        at_least(self.redis.chunk_size, 1, "redis.chunk_size")?;
        positive(self.redis.timeout, "redis.timeout")?;
        positive(self.cache.ttl, "cache.ttl")?;
        positive(self.cache.negative_ttl, "cache.negative_ttl")?;
        at_least(self.cache.memory_max_entries, 1, "cache.memory_max_entries")?;
        validate_upstream_url(&self.upstream.url)?;
        at_least(self.upstream.concurrency, 1, "upstream.concurrency")?;
        positive(self.upstream.timeout, "upstream.timeout")?;
        positive(self.upstream.connect_timeout, "upstream.connect_timeout")?;
        at_least(self.upstream.max_body_bytes, 2, "upstream.max_body_bytes")?;
        if self
            .server
            .api_tokens
            .iter()
            .any(|token| token.expose().is_empty())
        {
            return Err(ConfigError::invalid(
                "server.api_tokens",
                "a token is empty",
            ));
        }
        Ok(())
    }
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

fn positive(value: Duration, key: &'static str) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::invalid(key, "must be longer than 0s"));
    }
    Ok(())
}

fn validate_redis_url(raw: &str) -> Result<(), ConfigError> {
    let url = url::Url::parse(raw)
        .map_err(|err| ConfigError::invalid("redis.url", format!("{raw:?} is not a URL: {err}")))?;
    match url.scheme() {
        "redis" if url.host_str().is_some() => Ok(()),
        "redis" => Err(ConfigError::invalid("redis.url", "has no host")),
        other => Err(ConfigError::invalid(
            "redis.url",
            format!("scheme {other:?} is not supported; use redis://host:port/db"),
        )),
    }
}

fn validate_upstream_url(template: &str) -> Result<(), ConfigError> {
    const KEY: &str = "upstream.url";
    if !template.contains("{sn}") {
        return Err(ConfigError::invalid(
            KEY,
            format!("{template:?} has no {{sn}} placeholder"),
        ));
    }
    let sample = template.replace("{sn}", "C2024-0001");
    let url = url::Url::parse(&sample)
        .map_err(|err| ConfigError::invalid(KEY, format!("{template:?} is not a URL: {err}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ConfigError::invalid(
            KEY,
            "must be an http:// or https:// URL with a host",
        ));
    }
    Ok(())
}
