//! Client setup: an explicit kubeconfig file, else the usual inference
//! (`$KUBECONFIG`, `~/.kube/config`, then the in-cluster service account).

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::{Error, Result};

/// Installs rustls' ring crypto provider as the process default. Needed
/// because more than one provider is compiled into the dependency graph, so
/// rustls cannot pick one by itself. Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Connects to the API server.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<Client> {
    install_crypto_provider();
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.to_path_buf(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                })?
        }
        None => Config::infer().await?,
    };
    Client::try_from(config).map_err(Error::Client)
}
