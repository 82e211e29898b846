//! The one error type of hami-kube.

use std::path::PathBuf;

/// What failed while talking to Kubernetes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration found (no --kubeconfig, $KUBECONFIG, ~/.kube/config or in-cluster service account): {0}"
    )]
    InferConfig(#[from] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// An API call failed; `what` names the verb and the object.
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("node {node} not found")]
    NodeNotFound { node: String },
    #[error("node {node} is locked by {holder} since {since}; gave up after {waited_ms} ms")]
    Locked {
        node: String,
        holder: String,
        since: String,
        waited_ms: u128,
    },
    #[error(
        "node {node} has {key}={since}: a bind took the device plugin's lock there less than {expiry_secs} s ago and the plugin has not released it yet"
    )]
    PluginLocked {
        node: String,
        key: String,
        since: String,
        expiry_secs: i64,
    },
    #[error("node {node}: lock annotation changed under us {attempts} times in a row")]
    LockContention { node: String, attempts: u32 },
    #[error(transparent)]
    Decode(#[from] hami_api::DecodeError),
}

impl Error {
    pub(crate) fn api(what: impl Into<String>, source: kube::Error) -> Error {
        Error::Api {
            what: what.into(),
            source,
        }
    }

    /// Whether the API server answered 409 Conflict (a stale resourceVersion).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Api { source: kube::Error::Api(s), .. } if s.is_conflict())
    }

    /// Whether the API server answered 404 Not Found.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Api { source: kube::Error::Api(s), .. } if s.is_not_found())
    }
}

/// Whether a raw kube error is a 409 Conflict.
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict())
}

/// Whether a raw kube error is a 422: for a JSON patch, a `test` operation
/// that did not hold (the object is not as the caller believed).
pub fn is_unprocessable(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 422)
}

/// Whether a raw kube error is a 404 Not Found.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}
