//! The kubelet's PodResources API client (`List` on
//! `<kubelet root>/pod-resources/kubelet.sock`): which container received
//! which device IDs. [`DeviceOwners`] is the seam the plugin calls.

use std::path::{Path, PathBuf};

use crate::lockfree::{Owner, PreStartError, find_owner};
use crate::pending::BoxFuture;
use crate::proto_podresources::ListPodResourcesRequest;
use crate::proto_podresources::pod_resources_lister_client::PodResourcesListerClient;
use crate::register::unix_channel;

/// The kubelet's default PodResources socket.
pub const DEFAULT_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

/// Why the owner of some device IDs is not known.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// The kubelet could not be asked.
    #[error("asking the kubelet's PodResources API at {socket}: {detail}")]
    Unavailable { socket: PathBuf, detail: String },
    /// The kubelet answered, and no container (or not exactly one) holds them.
    #[error(transparent)]
    NotFound(#[from] PreStartError),
}

/// Who received some device IDs of a resource.
pub trait DeviceOwners: Send + Sync + 'static {
    fn owner<'a>(
        &'a self,
        resource: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Owner, OwnerError>>;
}

/// [`DeviceOwners`] from the kubelet's PodResources `List`, one connection
/// per call (the socket is local; a kubelet restart needs no reconnect).
pub struct PodResources {
    socket: PathBuf,
}

impl PodResources {
    pub fn new(socket: &Path) -> PodResources {
        PodResources {
            socket: socket.to_path_buf(),
        }
    }

    async fn ask(&self, resource: &str, ids: &[String]) -> Result<Owner, OwnerError> {
        let unavailable = |detail: String| OwnerError::Unavailable {
            socket: self.socket.clone(),
            detail,
        };
        let channel = unix_channel(&self.socket)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let list = PodResourcesListerClient::new(channel)
            .list(ListPodResourcesRequest {})
            .await
            .map_err(|s| unavailable(s.to_string()))?
            .into_inner();
        Ok(find_owner(&list, resource, ids)?)
    }
}

impl DeviceOwners for PodResources {
    fn owner<'a>(
        &'a self,
        resource: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Owner, OwnerError>> {
        Box::pin(self.ask(resource, ids))
    }
}
