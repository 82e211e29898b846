//! The one error type of the binary: what stops it from starting.

/// Why hami-scheduler cannot run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("device config: {0}")]
    DeviceConfig(#[from] hami_api::config::ConfigError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Kube(#[from] hami_kube::Error),
}
