//! hami-node as an NRI plugin (containerd 1.7+ with NRI enabled, on by
//! default since containerd 2.0; CRI-O 1.26+): the protocol side.
//!
//! The plugin dials the runtime's socket (`/var/run/nri/nri.sock`), splits
//! it into NRI's two ttrpc connections ([`mux`]), serves its own service
//! on connection 1 and registers on connection 2
//! (`Runtime.RegisterPlugin`). The runtime then calls `Configure` (the
//! plugin subscribes to CreateContainer), `Synchronize` (every pod and
//! container it has, possibly in several requests) and, for each container
//! being created, `CreateContainer`, whose answer adjusts the container's
//! env and mounts or fails its creation. A [`Handler`] decides those;
//! [`run`] reconnects with backoff whenever the runtime goes away and does
//! the whole sequence again (Synchronize gives the state anew).
//!
//! ttrpc is the `ttrpc` crate's (async); NRI's messages are our own
//! `.proto` (`proto/nri_v1alpha1.proto`), decoded with prost inside the
//! method handlers. Protocol facts: docs/design/nri-protocol-notes.md.

pub mod mux;
pub mod node;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ttrpc::asynchronous::transport::{Listener, Socket};
use ttrpc::asynchronous::{Client, MethodHandler, Server, Service, TtrpcContext};
use ttrpc::proto::ResponseInit as _;
use ttrpc::{Code, get_status};

use crate::pending::BoxFuture;
use crate::proto_nri::{
    Container, ContainerAdjustment, CreateContainerRequest, CreateContainerResponse, Empty,
    PodSandbox, RegisterPluginRequest, SynchronizeRequest, SynchronizeResponse,
};

/// The runtime's default NRI socket.
pub const DEFAULT_SOCKET: &str = "/var/run/nri/nri.sock";
/// The plugin's service, as ttrpc names it.
pub const PLUGIN_SERVICE: &str = "nri.pkg.api.v1alpha1.Plugin";
/// The runtime's service, as ttrpc names it.
pub const RUNTIME_SERVICE: &str = "nri.pkg.api.v1alpha1.Runtime";
/// NRI's event number of CreateContainer.
pub const EVENT_CREATE_CONTAINER: i32 = 4;
/// How long a call to the runtime may take (NRI's default request timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The subscription bit of NRI event `event`.
pub fn event_bit(event: i32) -> i32 {
    1 << (event - 1)
}

/// What the plugin does with the runtime's pods and containers.
pub trait Handler: Send + Sync + 'static {
    /// Every pod and container the runtime has, at each (re)connection.
    fn synchronize<'a>(
        &'a self,
        pods: &'a [PodSandbox],
        containers: &'a [Container],
    ) -> BoxFuture<'a, ()>;
    /// A container being created: how to adjust it, or why it must not be
    /// created (the runtime fails its creation with that message).
    fn create_container<'a>(
        &'a self,
        pod: &'a PodSandbox,
        container: &'a Container,
    ) -> BoxFuture<'a, Result<ContainerAdjustment, String>>;
}

/// Who the plugin is to the runtime.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `[a-zA-Z0-9_.+-]+`.
    pub name: String,
    /// Two digits; plugins are called in ascending index order.
    pub index: String,
}

/// Why one connection to the runtime ended.
#[derive(Debug, thiserror::Error)]
pub enum NriError {
    #[error("connecting to the NRI socket {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the NRI plugin service: {0}")]
    Serve(String),
    #[error("registering with the runtime: {0}")]
    Register(String),
    #[error("the NRI connection failed: {0}")]
    Stream(std::io::Error),
}

/// Plugin-side state of one connection: Synchronize's pods and containers
/// while the runtime sends them in parts.
#[derive(Default)]
struct SyncParts {
    pods: Vec<PodSandbox>,
    containers: Vec<Container>,
}

/// One method of the plugin's service.
struct Method {
    name: &'static str,
    handler: Arc<dyn Handler>,
    parts: Arc<Mutex<SyncParts>>,
    /// Configure has been called on this connection.
    configured: Arc<tokio::sync::Notify>,
}

fn ok<M: prost::Message>(m: &M) -> ttrpc::Response {
    let mut r = ttrpc::Response::init_status(get_status(Code::OK, ""));
    ttrpc::proto::ResponseInit::set_payload(&mut r, m.encode_to_vec());
    r
}

fn failed(code: Code, message: impl ToString) -> ttrpc::Response {
    ttrpc::Response::init_status(get_status(code, message))
}

fn decode<M: prost::Message + Default>(method: &str, payload: &[u8]) -> Result<M, ttrpc::Response> {
    M::decode(payload).map_err(|e| failed(Code::INVALID_ARGUMENT, format!("{method}: {e}")))
}

#[async_trait::async_trait]
impl MethodHandler for Method {
    async fn handler(
        &self,
        _: TtrpcContext,
        req: ttrpc::Request,
    ) -> ttrpc::Result<ttrpc::Response> {
        let payload = &req.payload;
        Ok(match self.name {
            "Configure" => match decode::<crate::proto_nri::ConfigureRequest>(self.name, payload) {
                Ok(c) => {
                    tracing::info!(
                        runtime = %c.runtime_name,
                        version = %c.runtime_version,
                        request_timeout_ms = c.request_timeout,
                        "NRI: configured by the runtime"
                    );
                    self.configured.notify_one();
                    ok(&crate::proto_nri::ConfigureResponse {
                        events: event_bit(EVENT_CREATE_CONTAINER),
                    })
                }
                Err(r) => r,
            },
            "Synchronize" => match decode::<SynchronizeRequest>(self.name, payload) {
                Ok(s) => {
                    let all = {
                        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
                        parts.pods.extend(s.pods);
                        parts.containers.extend(s.containers);
                        if s.more {
                            None
                        } else {
                            Some(std::mem::take(&mut *parts))
                        }
                    };
                    match all {
                        // A part: answer `more`, no updates, as NRI requires.
                        None => ok(&SynchronizeResponse {
                            update: Vec::new(),
                            more: true,
                        }),
                        Some(all) => {
                            self.handler.synchronize(&all.pods, &all.containers).await;
                            ok(&SynchronizeResponse::default())
                        }
                    }
                }
                Err(r) => r,
            },
            "CreateContainer" => match decode::<CreateContainerRequest>(self.name, payload) {
                Ok(c) => {
                    let (pod, container) =
                        (c.pod.unwrap_or_default(), c.container.unwrap_or_default());
                    match self.handler.create_container(&pod, &container).await {
                        Ok(adjust) => ok(&CreateContainerResponse {
                            adjust: Some(adjust),
                            update: Vec::new(),
                        }),
                        Err(why) => failed(Code::FAILED_PRECONDITION, why),
                    }
                }
                Err(r) => r,
            },
            // Shutdown, StateChange: nothing to do.
            _ => ok(&Empty {}),
        })
    }
}

fn plugin_service(
    handler: Arc<dyn Handler>,
    configured: Arc<tokio::sync::Notify>,
) -> HashMap<String, Service> {
    let parts = Arc::new(Mutex::new(SyncParts::default()));
    let methods: HashMap<String, Box<dyn MethodHandler + Send + Sync>> = [
        "Configure",
        "Synchronize",
        "CreateContainer",
        "Shutdown",
        "StateChange",
    ]
    .into_iter()
    .map(|name| {
        let m: Box<dyn MethodHandler + Send + Sync> = Box::new(Method {
            name,
            handler: handler.clone(),
            parts: parts.clone(),
            configured: configured.clone(),
        });
        (name.to_string(), m)
    })
    .collect();
    [(
        PLUGIN_SERVICE.to_string(),
        Service {
            methods,
            streams: HashMap::new(),
        },
    )]
    .into()
}

/// A listener's stream of exactly one connection, `conn`, that then stays
/// open (ttrpc's server stops accepting when the stream ends, after which
/// its shutdown cannot reach the accept loop).
pub fn one_connection<S>(
    conn: S,
) -> impl futures::Stream<Item = std::io::Result<S>> + Send + 'static
where
    S: Send + 'static,
{
    use futures::StreamExt as _;
    futures::stream::iter([Ok(conn)]).chain(futures::stream::pending())
}

/// Calls `method` of the service named `service` with `request`.
pub async fn call<M: prost::Message, R: prost::Message + Default>(
    client: &Client,
    service: &str,
    method: &str,
    request: &M,
) -> Result<R, String> {
    let mut req = ttrpc::Request::new();
    req.service = service.to_string();
    req.method = method.to_string();
    req.payload = request.encode_to_vec();
    req.timeout_nano = CALL_TIMEOUT.as_nanos() as i64;
    let res = client
        .request(req)
        .await
        .map_err(|e| format!("{service}/{method}: {e}"))?;
    R::decode(res.payload.as_slice()).map_err(|e| format!("{service}/{method}: {e}"))
}

/// One connection's life: dial `socket`, serve the plugin's service,
/// register, and serve until the runtime hangs up. `registered` is told
/// once Configure came (the runtime accepted the plugin).
pub async fn serve_once(
    socket: &Path,
    who: &Identity,
    handler: Arc<dyn Handler>,
    registered: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), NriError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| NriError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
    let conns = mux::split(stream);
    let configured = Arc::new(tokio::sync::Notify::new());
    // Serve first: the runtime may call Configure before RegisterPlugin
    // has returned.
    let mut server = Server::new()
        .register_service(plugin_service(handler, configured.clone()))
        .add_listener(Listener::new(one_connection(conns.plugin)));
    server
        .start()
        .await
        .map_err(|e| NriError::Serve(e.to_string()))?;
    let client = Client::new(Socket::new(conns.runtime));
    let register = RegisterPluginRequest {
        plugin_name: who.name.clone(),
        plugin_idx: who.index.clone(),
        nri_version: String::new(),
    };
    let registering = async {
        call::<_, Empty>(&client, RUNTIME_SERVICE, "RegisterPlugin", &register)
            .await
            .map_err(NriError::Register)?;
        configured.notified().await;
        Ok::<_, NriError>(())
    };
    let mut done = conns.done;
    tokio::select! {
        r = registering => {
            r?;
            tracing::info!(name = %who.name, index = %who.index, "NRI: registered with the runtime");
            if let Some(tx) = registered {
                let _ = tx.send(());
            }
        }
        r = &mut done => {
            let _ = tokio::time::timeout(Duration::from_secs(1), server.shutdown()).await;
            return match r {
                Ok(Ok(())) => Err(NriError::Register("the runtime closed the connection".into())),
                Ok(Err(e)) => Err(NriError::Stream(e)),
                Err(e) => Err(NriError::Serve(e.to_string())),
            };
        }
    }
    let ended = done.await;
    let _ = tokio::time::timeout(Duration::from_secs(1), server.shutdown()).await;
    match ended {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(NriError::Stream(e)),
        Err(e) => Err(NriError::Serve(e.to_string())),
    }
}

/// Serves the runtime at `socket` until `shutdown`, connecting again
/// (every second, then up to every 10 s while it stays away) whenever the
/// runtime restarts or is not there yet.
pub async fn run(
    socket: PathBuf,
    who: Identity,
    handler: Arc<dyn Handler>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = std::time::Instant::now();
        let once = serve_once(&socket, &who, handler.clone(), None);
        tokio::select! {
            _ = &mut shutdown => return,
            r = once => match r {
                Ok(()) => tracing::warn!("NRI: the runtime closed the connection; connecting again"),
                Err(e) => tracing::warn!("NRI: {e}; connecting again in {}s", backoff.as_secs()),
            },
        }
        // A connection that lasted resets the backoff.
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_secs(1);
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
