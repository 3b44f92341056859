//! The nginx configuration the repository ships (`deploy/nginx/discount-proxy.conf`, the
//! `many` profile of `docker-compose.yml`), run for real in front of two proxies: requests
//! are spread over both, and a streamed lookup's lines pass through as they come.

use crate::support::{TestApp, free_port, wait_until};
use futures_util::StreamExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// nginx with the shipped site, its upstreams pointed at `a` and `b`; stopped by pid on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Nginx {
    async fn start(a: &TestApp, b: &TestApp) -> Self {
        let shipped =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/discount-proxy.conf");
        let site = std::fs::read_to_string(shipped).unwrap();
        let port = free_port();
        let site = replace_once(&site, "proxy-a:8080", &a.addr.to_string());
        let site = replace_once(&site, "proxy-b:8080", &b.addr.to_string());
        let site = replace_once(&site, "listen 8090;", &format!("listen 127.0.0.1:{port};"));
        let dir = crate::support::temp_dir("nginx");
        std::fs::write(dir.join("site.conf"), site).unwrap();
        let main = format!(
            "pid {dir}/nginx.pid;\nerror_log {dir}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n  include {dir}/site.conf;\n}}\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), main).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx runs (.ci/run installs nginx-light)");
        let nginx = Self { child, dir, port };
        wait_until("nginx listens", WAIT, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        nginx
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `text` with its one `from` replaced: the shipped file must still say what the test expects.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "the shipped site names {from} once"
    );
    text.replacen(from, to, 1)
}

#[tokio::test]
async fn the_shipped_nginx_site_spreads_requests_over_both_proxies() {
    let (a, b) = (TestApp::spawn().await, TestApp::spawn().await);
    let nginx = Nginx::start(&a, &b).await;
    let client = crate::support::http_client();
    for i in 0..20 {
        let response = client
            .get(nginx.url(&format!("/v1/discounts/LB-{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let (on_a, on_b) = (a.upstream.total_calls(), b.upstream.total_calls());
    assert_eq!(on_a + on_b, 20, "every lookup answered by one of them");
    assert!(
        on_a > 0 && on_b > 0,
        "both proxies served: {on_a} and {on_b}"
    );
}

#[tokio::test]
async fn a_streamed_lookups_lines_pass_the_balancer_as_they_come() {
    let (a, b) = (TestApp::spawn().await, TestApp::spawn().await);
    for app in [&a, &b] {
        app.lookup(&["LB-HIT"]).await;
        app.upstream.hold();
    }
    let nginx = Nginx::start(&a, &b).await;
    let response = crate::support::http_client()
        .post(nginx.url("/v1/discounts/lookup"))
        .header("accept", "application/x-ndjson")
        .json(&serde_json::json!({ "sns": ["LB-HIT", "LB-HELD"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut received = Vec::new();
    while !received.contains(&b'\n') {
        let chunk = tokio::time::timeout(WAIT, body.next())
            .await
            .expect("the hit's line arrives while the miss is held")
            .expect("the stream goes on")
            .unwrap();
        received.extend_from_slice(&chunk);
    }
    let first: serde_json::Value =
        serde_json::from_slice(&received[..=received.iter().position(|&c| c == b'\n').unwrap()])
            .unwrap();
    assert_eq!(first["sn"], "LB-HIT", "{first}");
    wait_until("the miss is held at an upstream", WAIT, || async {
        a.upstream.in_flight() + b.upstream.in_flight() == 1
    })
    .await;
    for app in [&a, &b] {
        app.upstream.release();
    }
    while let Some(chunk) = body.next().await {
        received.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(received).unwrap();
    assert!(
        text.contains("LB-HELD") && text.contains("summary"),
        "{text}"
    );
}
