//! TLS set-up shared by the upstream client and `rediss://` connections.

/// reqwest and redis-rs are built without a default crypto provider (it saves minutes of
/// build); ring's must be installed before the first TLS client is built. Idempotent.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
