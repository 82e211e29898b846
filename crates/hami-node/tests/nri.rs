//! The NRI plugin's protocol against an in-process runtime speaking NRI's
//! wire protocol (ttrpc over the two-connection multiplexer on a unix
//! socket): registration, Configure's subscription, Synchronize in parts,
//! a CreateContainer adjustment and a refused creation, and the runtime
//! restarting while the plugin runs (the plugin connects again and goes
//! through the whole sequence anew).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hami_node::nri::{self, Handler, Identity, mux};
use hami_node::pending::BoxFuture;
use hami_node::proto_nri::{
    ConfigureRequest, ConfigureResponse, Container, ContainerAdjustment, CreateContainerRequest,
    CreateContainerResponse, Empty, KeyValue, Mount, PodSandbox, RegisterPluginRequest,
    SynchronizeRequest, SynchronizeResponse,
};
use prost::Message as _;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use ttrpc::asynchronous::transport::{Listener, Socket};
use ttrpc::asynchronous::{Client, MethodHandler, Server, Service, TtrpcContext};
use ttrpc::proto::ResponseInit as _;

const WAIT: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

/// The plugin's decisions, recorded.
#[derive(Default)]
struct Recorder {
    synced: Mutex<Vec<(usize, usize)>>,
}

impl Handler for Recorder {
    fn synchronize<'a>(
        &'a self,
        pods: &'a [PodSandbox],
        containers: &'a [Container],
    ) -> BoxFuture<'a, ()> {
        self.synced
            .lock()
            .unwrap()
            .push((pods.len(), containers.len()));
        Box::pin(async {})
    }

    fn create_container<'a>(
        &'a self,
        pod: &'a PodSandbox,
        container: &'a Container,
    ) -> BoxFuture<'a, Result<ContainerAdjustment, String>> {
        let r = if container.name == "unlimited" {
            Err(format!(
                "pod {}/{}: no limits for {}",
                pod.namespace, pod.name, container.name
            ))
        } else {
            Ok(ContainerAdjustment {
                annotations: HashMap::new(),
                env: vec![KeyValue {
                    key: "HAMI_TEST_POD_UID".into(),
                    value: pod.uid.clone(),
                }],
                mounts: vec![Mount {
                    destination: "/usr/local/vgpu".into(),
                    r#type: "bind".into(),
                    source: format!("/hook/vgpu/containers/{}_{}", pod.uid, container.name),
                    options: vec!["rbind".into(), "rw".into()],
                }],
            })
        };
        Box::pin(async move { r })
    }
}

/// The runtime's RegisterPlugin: hands each request to the test.
struct Register(mpsc::UnboundedSender<RegisterPluginRequest>);

#[async_trait::async_trait]
impl MethodHandler for Register {
    async fn handler(
        &self,
        _: TtrpcContext,
        req: ttrpc::Request,
    ) -> ttrpc::Result<ttrpc::Response> {
        let r =
            RegisterPluginRequest::decode(req.payload.as_slice()).expect("a RegisterPluginRequest");
        let _ = self.0.send(r);
        let mut res = ttrpc::Response::init_status(ttrpc::get_status(ttrpc::Code::OK, ""));
        ttrpc::proto::ResponseInit::set_payload(&mut res, Empty {}.encode_to_vec());
        Ok(res)
    }
}

/// One plugin connection as the runtime sees it.
struct Session {
    to_plugin: Client,
    _server: Server,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Accepts the plugin's connection, serves RegisterPlugin on connection 2
/// and returns the registration and a client of the plugin's service.
async fn accept(listener: &UnixListener) -> (RegisterPluginRequest, Session) {
    let (stream, _) = within("the plugin to connect", listener.accept())
        .await
        .unwrap();
    let conns = mux::split(stream);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut methods: HashMap<String, Box<dyn MethodHandler + Send + Sync>> = HashMap::new();
    methods.insert("RegisterPlugin".into(), Box::new(Register(tx)));
    let mut server = Server::new()
        .register_service(
            [(
                nri::RUNTIME_SERVICE.to_string(),
                Service {
                    methods,
                    streams: HashMap::new(),
                },
            )]
            .into(),
        )
        .add_listener(Listener::new(nri::one_connection(conns.runtime)));
    server.start().await.unwrap();
    let reg = within("RegisterPlugin", rx.recv()).await.unwrap();
    (
        reg,
        Session {
            to_plugin: Client::new(Socket::new(conns.plugin)),
            _server: server,
            done: conns.done,
        },
    )
}

async fn plugin_call<M: prost::Message, R: prost::Message + Default>(
    s: &Session,
    method: &str,
    m: &M,
) -> Result<R, String> {
    nri::call(&s.to_plugin, nri::PLUGIN_SERVICE, method, m).await
}

fn pod(uid: &str) -> PodSandbox {
    PodSandbox {
        id: format!("sandbox-{uid}"),
        name: "train".into(),
        uid: uid.into(),
        namespace: "team".into(),
        ..Default::default()
    }
}

fn container(name: &str) -> Container {
    Container {
        id: format!("ctr-{name}"),
        name: name.into(),
        ..Default::default()
    }
}

/// Configure (the subscription), Synchronize in two parts: what a runtime
/// does after registration.
async fn configure_and_sync(s: &Session, containers: usize) {
    let cfg: ConfigureResponse = plugin_call(
        s,
        "Configure",
        &ConfigureRequest {
            runtime_name: "fake".into(),
            runtime_version: "1".into(),
            registration_timeout: 5000,
            request_timeout: 2000,
            ..Default::default()
        },
    )
    .await
    .expect("Configure");
    assert_eq!(
        cfg.events,
        nri::event_bit(nri::EVENT_CREATE_CONTAINER),
        "subscribed to CreateContainer only"
    );
    let part: SynchronizeResponse = plugin_call(
        s,
        "Synchronize",
        &SynchronizeRequest {
            pods: vec![pod("a")],
            containers: vec![container("c0")],
            more: true,
        },
    )
    .await
    .expect("Synchronize, first part");
    assert!(
        part.more && part.update.is_empty(),
        "a part is answered `more`"
    );
    let rest: Vec<Container> = (1..containers)
        .map(|i| container(&format!("c{i}")))
        .collect();
    let last: SynchronizeResponse = plugin_call(
        s,
        "Synchronize",
        &SynchronizeRequest {
            pods: vec![pod("b")],
            containers: rest,
            more: false,
        },
    )
    .await
    .expect("Synchronize, last part");
    assert!(!last.more);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_syncs_adjusts_refuses_and_survives_a_runtime_restart() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nri.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let recorder = Arc::new(Recorder::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let plugin = tokio::spawn(nri::run(
        socket.clone(),
        Identity {
            name: "hami-node".into(),
            index: "10".into(),
        },
        recorder.clone(),
        async {
            let _ = stopped.await;
        },
    ));

    let (reg, s) = accept(&listener).await;
    assert_eq!(
        (reg.plugin_name.as_str(), reg.plugin_idx.as_str()),
        ("hami-node", "10")
    );
    configure_and_sync(&s, 3).await;
    assert_eq!(
        *recorder.synced.lock().unwrap(),
        vec![(2, 3)],
        "both parts, once"
    );

    // A container being created: the plugin's env and mount come back.
    let r: CreateContainerResponse = plugin_call(
        &s,
        "CreateContainer",
        &CreateContainerRequest {
            pod: Some(pod("u-1")),
            container: Some(container("main")),
        },
    )
    .await
    .expect("CreateContainer");
    let adjust = r.adjust.expect("an adjustment");
    assert_eq!(adjust.env[0].key, "HAMI_TEST_POD_UID");
    assert_eq!(adjust.env[0].value, "u-1");
    assert_eq!(adjust.mounts[0].source, "/hook/vgpu/containers/u-1_main");
    // One the plugin refuses: the runtime gets the reason as an error.
    let err = plugin_call::<_, CreateContainerResponse>(
        &s,
        "CreateContainer",
        &CreateContainerRequest {
            pod: Some(pod("u-1")),
            container: Some(container("unlimited")),
        },
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("pod team/train: no limits for unlimited"),
        "{err}"
    );

    // The runtime restarts: its end of the connection goes away. The
    // plugin connects again, registers again and is synchronized anew.
    s.done.abort();
    drop(s);
    let (reg, s) = accept(&listener).await;
    assert_eq!(reg.plugin_name, "hami-node");
    configure_and_sync(&s, 1).await;
    assert_eq!(
        *recorder.synced.lock().unwrap(),
        vec![(2, 3), (2, 1)],
        "synchronized again after the restart"
    );

    let _ = stop.send(());
    within("the plugin to stop", plugin).await.unwrap();
}
