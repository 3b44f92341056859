//! nginx `proxy_cache` in front of the simulator: the reference an operator would deploy
//! instead of the proxy for single-SN lookups.

use crate::processes::Service;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

/// Writes `nginx.conf` into `dir` and starts nginx in the foreground from it.
///
/// # Errors
/// The config cannot be written or nginx cannot be started.
pub fn spawn(
    program: &Path,
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Result<Service> {
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, config(dir, listen, upstream))
        .with_context(|| format!("writing {}", conf.display()))?;
    let mut command = Command::new(program);
    // A trailing slash: nginx joins the prefix and relative paths without adding one.
    command
        .arg("-p")
        .arg(format!("{}/", dir.display()))
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .args(["-g", "daemon off;"]);
    Service::spawn("nginx", command, dir.join("nginx.log"))
}

/// The config: every path in `dir` (the packaged build's temp paths are under /var/lib,
/// which a non-root run cannot write), keep-alive to the upstream, and a cache for 200s
/// and 404s with a lock so a cold key is fetched once.
fn config(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> String {
    let dir = dir.display();
    format!(
        r#"worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log notice;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy-temp;
    fastcgi_temp_path {dir}/nginx-fastcgi;
    uwsgi_temp_path {dir}/nginx-uwsgi;
    scgi_temp_path {dir}/nginx-scgi;
    proxy_cache_path {dir}/nginx-cache levels=1:2 keys_zone=discounts:10m max_size=256m inactive=10m use_temp_path=off;
    upstream simulator {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://simulator;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache discounts;
            proxy_cache_valid 200 404 10m;
            proxy_cache_lock on;
            add_header X-Cache $upstream_cache_status;
        }}
    }}
}}
"#
    )
}
