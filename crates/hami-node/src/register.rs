//! The `Registration` client: tells the kubelet (on its socket,
//! `<device-plugin dir>/kubelet.sock`) which resource this plugin serves
//! and on which socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::proto;
use crate::proto::registration_client::RegistrationClient;

/// A gRPC channel over the unix socket at `path` (the URI is a
/// placeholder; every connection dials the socket).
pub async fn unix_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

/// Why registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("connecting to the registration socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("registering {resource} (endpoint {endpoint}) at {path}: {status}")]
    Refused {
        path: PathBuf,
        resource: String,
        endpoint: String,
        status: tonic::Status,
    },
}

/// Registers the plugin serving `resource` on the socket file `endpoint`
/// (a name in the kubelet's device-plugin dir), with `options` (what the
/// kubelet will call), at the registration server `registration_socket`.
pub async fn register(
    registration_socket: &Path,
    endpoint: &str,
    resource: &str,
    options: proto::DevicePluginOptions,
) -> Result<(), RegisterError> {
    let channel =
        unix_channel(registration_socket)
            .await
            .map_err(|source| RegisterError::Connect {
                path: registration_socket.to_path_buf(),
                source,
            })?;
    let request = proto::RegisterRequest {
        version: crate::API_VERSION.to_string(),
        endpoint: endpoint.to_string(),
        resource_name: resource.to_string(),
        options: Some(options),
    };
    RegistrationClient::new(channel)
        .register(request)
        .await
        .map_err(|status| RegisterError::Refused {
            path: registration_socket.to_path_buf(),
            resource: resource.to_string(),
            endpoint: endpoint.to_string(),
            status,
        })?;
    Ok(())
}
