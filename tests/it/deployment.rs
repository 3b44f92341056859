//! The deployment files a user copies: `docker-compose.yml` (every profile) and the
//! `Dockerfile`. Docker cannot run here, so what their containers would run is checked
//! against the repository: every command is one the binary takes, every file a command or a
//! volume names exists in the build context, and every proxy's environment makes a config
//! the proxy accepts. (CI also runs `docker-compose config` on each profile.)

use crate::support::run_to_end;
use discount_proxy::config::Config;
use serde_yaml_ng::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> Value {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

/// The services built from this repository (`build: .`), by name.
fn built_services(compose: &Value) -> Vec<(String, Value)> {
    let services = compose["services"].as_mapping().expect("services");
    services
        .iter()
        .filter(|(_, service)| service.get("build").is_some())
        .map(|(name, service)| (name.as_str().unwrap().to_owned(), service.clone()))
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .map(|item| item.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The Dockerfile's `CMD`, what a service without `command:` runs.
fn dockerfile_cmd() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let cmd = text
        .lines()
        .find_map(|line| line.strip_prefix("CMD "))
        .expect("the Dockerfile has a CMD");
    serde_json::from_str(cmd).unwrap()
}

/// Where a path inside the container comes from in the repository: the service's volumes
/// first (`./config:/etc/discount-proxy:ro`), then the Dockerfile's `COPY config
/// /etc/discount-proxy`.
fn host_path(service: &Value, inside: &str) -> PathBuf {
    let mounts = strings(&service["volumes"])
        .into_iter()
        .map(|volume| {
            let mut parts = volume.split(':');
            let host = parts.next().unwrap().to_owned();
            let container = parts.next().unwrap().to_owned();
            (host, container)
        })
        .chain([("./config".to_owned(), "/etc/discount-proxy".to_owned())]);
    for (host, container) in mounts {
        if let Some(rest) = inside.strip_prefix(&container) {
            return repo().join(host).join(rest.trim_start_matches('/'));
        }
    }
    panic!("{inside} comes from no volume and no COPY");
}

#[tokio::test]
async fn every_built_service_runs_a_command_the_binary_takes_on_files_that_exist() {
    let compose = compose();
    let services = built_services(&compose);
    assert!(
        services.len() >= 5,
        "proxies and the upstream: {services:?}"
    );
    for (name, service) in &services {
        let command = match strings(&service["command"]) {
            command if command.is_empty() => dockerfile_cmd(),
            command => command,
        };
        let help = run_to_end(&[&command[0], "--help"], &[], "", Duration::from_secs(30)).await;
        assert!(
            help.status.success(),
            "{name}: {command:?} is no subcommand: {help}"
        );
        if let Some(at) = command.iter().position(|arg| arg == "--config") {
            let config = host_path(service, &command[at + 1]);
            assert!(config.is_file(), "{name}: {} is missing", config.display());
        }
        for volume in strings(&service["volumes"]) {
            let host = volume.split(':').next().unwrap();
            assert!(
                repo().join(host).exists(),
                "{name}: volume {host} is missing"
            );
        }
    }
    for (name, service) in compose["services"].as_mapping().unwrap() {
        for volume in strings(&service["volumes"]) {
            let host = volume.split(':').next().unwrap();
            assert!(
                repo().join(host).exists(),
                "{name:?}: volume {host} is missing"
            );
        }
    }
}

#[test]
// figment's Jail takes a closure returning figment's own (large) error type.
#[allow(clippy::result_large_err)]
fn every_proxy_services_environment_makes_a_config_the_proxy_accepts() {
    let compose = compose();
    let mut checked = Vec::new();
    for (name, service) in built_services(&compose) {
        let command = match strings(&service["command"]) {
            command if command.is_empty() => dockerfile_cmd(),
            command => command,
        };
        if command[0] != "serve" {
            continue;
        }
        let at = command.iter().position(|arg| arg == "--config").unwrap();
        let file = host_path(&service, &command[at + 1]);
        let environment = service["environment"].as_mapping().unwrap().clone();
        let mut mode = String::new();
        figment::Jail::expect_with(|jail| {
            for (key, value) in &environment {
                let value = match value {
                    Value::String(text) => text.clone(),
                    other => serde_yaml_ng::to_string(other).unwrap().trim().to_owned(),
                };
                jail.set_env(key.as_str().unwrap(), value);
            }
            let config = Config::load(Some(&file)).map_err(|err| format!("{name}: {err}"))?;
            config.validate().map_err(|err| format!("{name}: {err}"))?;
            mode = format!("{:?}", config.redis.mode);
            Ok(())
        });
        checked.push((name, mode));
    }
    let names: Vec<&str> = checked.iter().map(|(name, _)| name.as_str()).collect();
    assert!(
        names.contains(&"proxy") && names.contains(&"proxy-cluster"),
        "{checked:?}"
    );
    assert!(
        checked
            .iter()
            .any(|(name, mode)| name == "proxy-cluster" && mode == "Cluster"),
        "{checked:?}"
    );
}

#[test]
fn everything_the_dockerfile_copies_is_in_the_build_context() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let copies: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("COPY "))
        .filter(|args| !args.starts_with("--from"))
        .collect();
    assert!(copies.len() >= 4, "{copies:?}");
    for args in copies {
        let words: Vec<&str> = args.split_whitespace().collect();
        for source in &words[..words.len() - 1] {
            assert!(repo().join(source).exists(), "COPY {source}: missing");
        }
    }
}
