//! The test's kubelet-side peer, shared by the gRPC tests: a Registration
//! server on a unix socket that passes every request on, and a bound on
//! every wait so a broken plugin fails instead of hanging.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use hami_node::plugin;
use hami_node::proto;
use hami_node::proto::registration_server::{Registration, RegistrationServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

struct PeerRegistration(mpsc::UnboundedSender<proto::RegisterRequest>);

#[tonic::async_trait]
impl Registration for PeerRegistration {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let _ = self.0.send(request.into_inner());
        Ok(Response::new(proto::Empty {}))
    }
}

/// Serves the peer's Registration service on `path`; each registration
/// arrives on `tx`.
pub fn serve_registration(
    path: &Path,
    tx: mpsc::UnboundedSender<proto::RegisterRequest>,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    let listener = plugin::bind(path).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(PeerRegistration(tx)))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    )
}
