//! TLS and ACL users for test Redis servers: a self-signed certificate made by the `openssl`
//! command, the server directives that demand TLS (and users) of clients, and how a test
//! client reaches such a server ([`Access`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

/// The user the test support itself connects as on a secured node: replication, sentinels,
/// `redis-cli --cluster` and the tests' checks. Never the proxy's user.
const ADMIN_USER: &str = "dp-admin";
const ADMIN_PASSWORD: &str = "admin-pw-not-the-proxys";

/// The ACL user a proxy under test connects as on a secured node.
pub const PROXY_USER: &str = "dp-proxy";
/// [`PROXY_USER`]'s password: a test asserts it never shows.
pub const PROXY_PASSWORD: &str = "SEKRET-proxy-acl-pw";

/// A self-signed certificate for 127.0.0.1 and its key, in a folder its owner removes.
pub struct TestCertificate {
    dir: PathBuf,
}

impl TestCertificate {
    /// Makes `cert.pem` and `key.pem` in `dir` with `openssl`; fails the test if it cannot.
    pub fn make(dir: &Path) -> Self {
        let status = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
            ])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "openssl could not make a test certificate"
        );
        Self {
            dir: dir.to_owned(),
        }
    }

    /// `redis-server` directives that serve TLS with this certificate, without asking clients
    /// for one of theirs.
    fn directives(&self) -> Vec<Vec<String>> {
        let file = |name: &str| self.dir.join(name).to_string_lossy().into_owned();
        vec![
            directive(&["tls-cert-file", &file("cert.pem")]),
            directive(&["tls-key-file", &file("key.pem")]),
            directive(&["tls-ca-cert-file", &file("cert.pem")]),
            directive(&["tls-auth-clients", "no"]),
        ]
    }
}

/// What a node demands of its clients, and so how the test support reaches it: plain TCP as
/// the default user, TLS only, or TLS only with ACL users (the default user off).
#[derive(Clone, Default)]
pub struct Access {
    tls: Option<Arc<TestCertificate>>,
    acl: bool,
}

impl Access {
    /// Plain TCP, no password: what the other topologies are.
    pub fn plain() -> Self {
        Self::default()
    }

    /// TLS only (no plain port), the default user off: clients log in as [`PROXY_USER`]
    /// (or the support's admin user), replicas and sentinels included.
    pub fn tls_acl(certificate: TestCertificate) -> Self {
        Self {
            tls: Some(Arc::new(certificate)),
            acl: true,
        }
    }

    /// The same TLS, but no users: what a sentinel of secured data nodes serves.
    pub fn without_acl(&self) -> Self {
        Self {
            tls: self.tls.clone(),
            acl: false,
        }
    }

    /// The URL a client is configured with, without credentials:
    /// `redis://127.0.0.1:P` or `rediss://127.0.0.1:P#insecure`.
    pub fn url(&self, port: u16) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{port}"),
            Some(_) => format!("rediss://127.0.0.1:{port}#insecure"),
        }
    }

    /// [`Access::url`] with the support's admin user, for its own checks and commands.
    pub fn admin_url(&self, port: u16) -> String {
        let url = self.url(port);
        match self.acl {
            false => url,
            true => with_user(&url, ADMIN_USER, ADMIN_PASSWORD),
        }
    }

    /// Arguments that make `redis-cli` reach such a node as the admin user.
    pub fn cli_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.tls.is_some() {
            args.extend(["--tls", "--insecure"].map(String::from));
        }
        if self.acl {
            args.extend(["--user", ADMIN_USER, "--pass", ADMIN_PASSWORD].map(String::from));
        }
        args
    }

    /// `redis-server` directives (name, then values) to listen on `port` as this access says,
    /// with the users and, on a replica, how it logs in to its master.
    pub fn server_directives(&self, port: u16) -> Vec<Vec<String>> {
        let port = port.to_string();
        let Some(certificate) = &self.tls else {
            return vec![directive(&["port", &port])];
        };
        let mut directives = vec![
            directive(&["port", "0"]),
            directive(&["tls-port", &port]),
            directive(&["tls-cluster", "yes"]),
            directive(&["tls-replication", "yes"]),
        ];
        directives.extend(certificate.directives());
        if self.acl {
            let admin = format!(">{ADMIN_PASSWORD}");
            let proxy = format!(">{PROXY_PASSWORD}");
            directives.extend([
                directive(&["user", "default", "off"]),
                directive(&["user", ADMIN_USER, "on", &admin, "~*", "&*", "+@all"]),
                directive(&["user", PROXY_USER, "on", &proxy, "~*", "&*", "+@all"]),
                directive(&["masteruser", ADMIN_USER]),
                directive(&["masterauth", ADMIN_PASSWORD]),
            ]);
        }
        directives
    }

    /// Sentinel directives that log in to the data nodes of master `name` as the admin user.
    pub fn sentinel_auth(&self, name: &str) -> Vec<Vec<String>> {
        match self.acl {
            false => Vec::new(),
            true => vec![
                directive(&["sentinel", "auth-user", name, ADMIN_USER]),
                directive(&["sentinel", "auth-pass", name, ADMIN_PASSWORD]),
            ],
        }
    }
}

/// `url` with `user:password@` before its host.
pub fn with_user(url: &str, user: &str, password: &str) -> String {
    url.replacen("://", &format!("://{user}:{password}@"), 1)
}

/// Directives as `redis-server` command-line arguments (`--name value …`).
pub fn as_args(directives: &[Vec<String>]) -> Vec<String> {
    let mut args = Vec::new();
    for words in directives {
        args.push(format!("--{}", words[0]));
        args.extend(words[1..].iter().cloned());
    }
    args
}

/// Directives as config-file lines.
pub fn as_config(directives: &[Vec<String>]) -> String {
    directives
        .iter()
        .map(|words| words.join(" ") + "\n")
        .collect()
}

fn directive(words: &[&str]) -> Vec<String> {
    words.iter().map(|word| (*word).to_owned()).collect()
}
