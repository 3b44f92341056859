//! What types alone cannot check: ranges, URL shapes, the `{sn}` placeholder.

use super::{Config, ConfigError, redacted_url};
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

// Messages never echo a URL as given: it may hold a password.
fn validate_redis_url(raw: &str) -> Result<(), ConfigError> {
    const KEY: &str = "redis.url";
    let url = url::Url::parse(raw)
        .map_err(|err| ConfigError::invalid(KEY, format!("is not a URL ({err})")))?;
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err(ConfigError::invalid(
            KEY,
            format!(
                "scheme {:?} is not supported; use redis://host:port/db or rediss:// for TLS",
                url.scheme()
            ),
        ));
    }
    // What redis-rs will do with it later, done now: the error names the key, before binding.
    redis::IntoConnectionInfo::into_connection_info(raw).map_err(|err| {
        ConfigError::invalid(KEY, format!("{} cannot be used: {err}", redacted_url(raw)))
    })?;
    Ok(())
}

fn validate_upstream_url(template: &str) -> Result<(), ConfigError> {
    const KEY: &str = "upstream.url";
    if !template.contains("{sn}") {
        return Err(ConfigError::invalid(
            KEY,
            format!("{} has no {{sn}} placeholder", redacted_url(template)),
        ));
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
        assert!(validate_redis_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(validate_redis_url("rediss://cache.internal:6380/1").is_ok());
        for bad in ["redis://h/abc", "mysql://h", "nope", "redis://"] {
            let err = validate_redis_url(bad).unwrap_err().to_string();
            assert!(err.contains("redis.url"), "{bad}: {err}");
        }
    }

    #[test]
    fn url_errors_never_echo_a_password() {
        for bad in [
            "redis://:s3cr3t@h/abc",
            "redis://u:s3cr3t@h:notaport/0",
            "redis://:s3cr3t#x@h",
        ] {
            let err = validate_redis_url(bad).unwrap_err().to_string();
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
