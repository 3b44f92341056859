//! URLs fit for logs, error messages and `Debug` output: credentials and query values
//! replaced by `***`, the `{sn}` placeholder kept, so an operator still sees where things go.
//!
//! Also the `Debug` of the config sections that hold such URLs.

use super::{RedisConfig, UpstreamConfig};
use std::fmt;

/// What a secret part of a URL is printed as.
const STARS: &str = "***";

/// The placeholder of `upstream.url`, the one query value that is not a secret.
const PLACEHOLDER: &str = "{sn}";

/// A URL fit for logs and error messages: the password (or a lone user name, which is where
/// some APIs take a token) and every query value but `{sn}` replaced by `***`. Not a URL at
/// all: `(not a URL)`, since the text may still hold a secret.
pub fn redacted_url(raw: &str) -> String {
    let Ok(mut url) = url::Url::parse(raw) else {
        return "(not a URL)".to_owned();
    };
    if url.password().is_some() {
        let _ = url.set_password(Some(STARS));
    } else if !url.username().is_empty() {
        let _ = url.set_username(STARS);
    }
    if let Some(query) = url.query() {
        let query = redacted_query(query);
        url.set_query(Some(&query));
    }
    // The URL parser percent-encodes the braces of a placeholder in the path.
    url.to_string().replace("%7Bsn%7D", PLACEHOLDER)
}

/// Every `key=value` pair with its value's text replaced, `{sn}` kept where it stands.
fn redacted_query(query: &str) -> String {
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) => format!("{key}={}", redacted_value(value)),
            // A bare value (`?SECRETKEY`) is a value too.
            None => redacted_value(pair),
        })
        .collect();
    pairs.join("&")
}

fn redacted_value(value: &str) -> String {
    let parts: Vec<&str> = value
        .split(PLACEHOLDER)
        .map(|part| if part.is_empty() { "" } else { STARS })
        .collect();
    parts.join(PLACEHOLDER)
}

/// A URL that prints redacted as `{:?}`: for the config's `Debug` impls.
#[derive(Clone, Copy)]
struct RedactedUrl<'a>(&'a str);

impl fmt::Debug for RedactedUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&redacted_url(self.0), f)
    }
}

// Destructured in full: whoever adds a field decides here whether it is a secret.
impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            url,
            pool_size,
            key_prefix,
            timeout,
            chunk_size,
            breaker_failures,
            breaker_cooldown,
            mode,
            nodes,
            sentinel_master,
            read_from_replicas,
        } = self;
        let nodes: Vec<RedactedUrl<'_>> = nodes.iter().map(|node| RedactedUrl(node)).collect();
        f.debug_struct("RedisConfig")
            .field("url", &RedactedUrl(url))
            .field("pool_size", pool_size)
            .field("key_prefix", key_prefix)
            .field("timeout", timeout)
            .field("chunk_size", chunk_size)
            .field("breaker_failures", breaker_failures)
            .field("breaker_cooldown", breaker_cooldown)
            .field("mode", mode)
            .field("nodes", &nodes)
            .field("sentinel_master", sentinel_master)
            .field("read_from_replicas", read_from_replicas)
            .finish()
    }
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            url,
            token,
            concurrency,
            timeout,
            connect_timeout,
            retries,
            retry_backoff,
            retry_backoff_max,
            max_pending,
            circuit,
            max_body_bytes,
        } = self;
        f.debug_struct("UpstreamConfig")
            .field("url", &RedactedUrl(url))
            .field("token", token)
            .field("concurrency", concurrency)
            .field("timeout", timeout)
            .field("connect_timeout", connect_timeout)
            .field("retries", retries)
            .field("retry_backoff", retry_backoff)
            .field("retry_backoff_max", retry_backoff_max)
            .field("max_pending", max_pending)
            .field("circuit", circuit)
            .field("max_body_bytes", max_body_bytes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_query_values_are_stars_and_the_placeholder_stays() {
        for (raw, printed) in [
            (
                "redis://user:pw@cache:6379/0",
                "redis://user:***@cache:6379/0",
            ),
            ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
            ("redis://cache:6379/0", "redis://cache:6379/0"),
            (
                "rediss://u:pw@cache:6380/1#insecure",
                "rediss://u:***@cache:6380/1#insecure",
            ),
            (
                "http://up:8001/contract/?sn={sn}&api_key=k&v=2",
                "http://up:8001/contract/?sn={sn}&api_key=***&v=***",
            ),
            (
                "https://token@up/contract/{sn}?KEY",
                "https://***@up/contract/{sn}?***",
            ),
            (
                "http://up/?sn=C-{sn}&empty=",
                "http://up/?sn=***{sn}&empty=",
            ),
            ("http://up/c/?sn={sn}", "http://up/c/?sn={sn}"),
            ("not a url pw", "(not a URL)"),
        ] {
            assert_eq!(redacted_url(raw), printed, "{raw}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn no_password_or_query_value_survives_and_the_placeholder_does(
                password in "[A-Za-z0-9_~-]{6,20}",
                values in proptest::collection::vec("[A-Za-z0-9._~%*-]{6,20}", 1..4),
                scheme in prop_oneof![Just("http"), Just("https"), Just("redis")],
            ) {
                let query: Vec<String> = values
                    .iter()
                    .enumerate()
                    .map(|(index, value)| format!("k{index}={value}"))
                    .collect();
                let raw = format!(
                    "{scheme}://user:{password}@host:1/c/?sn={{sn}}&{}",
                    query.join("&")
                );
                let printed = redacted_url(&raw);
                prop_assert!(!printed.contains(&password), "{}", printed);
                for value in &values {
                    // A value of only stars would be the redaction itself.
                    if value.trim_matches('*').len() > 2 {
                        prop_assert!(!printed.contains(value.as_str()), "{}", printed);
                    }
                }
                prop_assert!(printed.contains("sn={sn}"), "{}", printed);
            }

            #[test]
            fn any_text_redacts_without_panicking(raw in any::<String>()) {
                let _ = redacted_url(&raw);
            }
        }
    }
}
