//! What aistack-exporter and aistack-actioner share: the node_exporter-style common flags,
//! logging, YAML config loading with path-named problems, the Docker engine connection, the
//! exporter's JSON API as both sides read it, `/metrics`, and serving HTTP with bounded
//! connections and graceful shutdown.
//!
//! The two binaries stay independent programs (they talk only over HTTP); this crate only keeps
//! them from writing the same plumbing twice.

pub mod api;
pub mod cli;
pub mod config;
pub mod docker;
pub mod healthcheck;
pub mod http;
pub mod logging;
pub mod login1;
pub mod node;
pub mod server;

/// Makes ring the process-wide TLS crypto provider (for reqwest's rustls). Idempotent; call
/// before building an HTTP client.
pub fn install_tls_provider() {
    // Err means a provider is installed already: fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds an HTTP client with `configure`, trusting the system's CA certificates. Where there
/// are none (an image without ca-certificates, `SSL_CERT_FILE` pointing nowhere), rustls'
/// platform verifier refuses to build at all; then the client is built trusting no
/// certificate: plain `http://` works, `https://` fails each request with a certificate error,
/// and one warning says why. A binary never stops over a missing CA store.
pub fn http_client(
    configure: impl Fn(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
) -> Result<reqwest::Client, reqwest::Error> {
    install_tls_provider();
    match configure(reqwest::Client::builder()).build() {
        Ok(client) => Ok(client),
        Err(err) => {
            let why = std::error::Error::source(&err)
                .map_or_else(|| err.to_string(), ToString::to_string);
            tracing::warn!(reason = %why, "no usable CA certificates on this system (install ca-certificates): https:// requests will fail, http:// works");
            configure(reqwest::Client::builder())
                .tls_certs_only(Vec::new())
                .build()
        }
    }
}

/// The crate version the binaries were built from.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git revision the binaries were built from ("unknown" outside a git checkout).
pub const REVISION: &str = env!("AISTACK_REVISION");

/// What `--version` prints after the program name.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (revision ",
    env!("AISTACK_REVISION"),
    ")"
);
