//! `hami-node`: the node agent. For now the kubelet device plugin: it
//! serves the device plugin API on a unix socket in the kubelet's
//! device-plugin dir, registers with the kubelet, and hands out devices
//! with HAMi's Allocate protocol. See docs/node.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use hami_api::device::decode_devices;
use hami_api::{DeviceConfig, NvidiaConfig};
use hami_node::allocate::Settings;
use hami_node::pending::KubeStore;
use hami_node::plugin::{self, Plugin};
use hami_node::register::register;
use tokio::sync::watch;

#[derive(Debug, Parser)]
#[command(
    name = "hami-node",
    version,
    about = "hami-rs node agent: kubelet device plugin"
)]
struct Args {
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// kubeconfig file; default: $KUBECONFIG, ~/.kube/config, in-cluster.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The node's cards, as the JSON form of `hami.io/node-nvidia-register`
    /// (a stand-in until NVML discovery exists).
    #[arg(long)]
    cards_file: PathBuf,
    /// `device-config.yaml` (the `hami-scheduler-device` ConfigMap's key):
    /// resource name, memory scaling, log level, disablecorelimit.
    #[arg(long)]
    device_config_file: Option<PathBuf>,
    /// Resource to advertise; default: the config's resourceCountName.
    #[arg(long)]
    resource_name: Option<String>,
    /// The kubelet's device-plugin dir.
    #[arg(long, default_value = "/var/lib/kubelet/device-plugins")]
    device_plugin_path: PathBuf,
    /// Socket file name of this plugin in that dir; default
    /// `nvidia-<resource>.sock` as HAMi (`nvidia-gpu.sock`).
    #[arg(long)]
    socket_name: Option<String>,
    /// The kubelet's registration socket; default `<device-plugin-path>/kubelet.sock`.
    #[arg(long)]
    kubelet_socket: Option<PathBuf>,
    /// HAMi's hook path: the interposer's files are under `<hook>/vgpu`.
    #[arg(long, env = "HOOK_PATH", default_value = "/usr/local")]
    hook_path: PathBuf,
    /// Report each card's NUMA node to the kubelet's topology manager.
    #[arg(long)]
    numa_topology: bool,
    /// Offer GetPreferredAllocation, steering the kubelet to slots of the
    /// cards the scheduler chose (HAMi's `enableGetPreferredAllocation`,
    /// off there by default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    preferred_allocation: bool,
    /// Let a container with `CUDA_DISABLE_CONTROL=true` go without the
    /// `/etc/ld.so.preload` mount (HAMi: always).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    allow_disable_control: bool,
}

fn nvidia_config(path: Option<&Path>) -> anyhow::Result<NvidiaConfig> {
    let Some(path) = path else {
        return Ok(NvidiaConfig::default());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (cfg, warnings) = DeviceConfig::from_yaml(&path.display().to_string(), &text)?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    Ok(cfg.nvidia)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = nvidia_config(args.device_config_file.as_deref())?;
    let text = std::fs::read_to_string(&args.cards_file)
        .with_context(|| format!("reading {}", args.cards_file.display()))?;
    let cards = decode_devices(&args.cards_file.display().to_string(), &text)?;
    let resource = args
        .resource_name
        .clone()
        .unwrap_or_else(|| cfg.resource_count_name.clone());
    let socket_name = args.socket_name.clone().unwrap_or_else(|| {
        let short = resource.rsplit('/').next().unwrap_or(&resource);
        format!("nvidia-{short}.sock")
    });
    let socket = args.device_plugin_path.join(&socket_name);
    let kubelet_socket = args
        .kubelet_socket
        .clone()
        .unwrap_or_else(|| args.device_plugin_path.join("kubelet.sock"));

    let client = hami_kube::client::connect(args.kubeconfig.as_deref()).await?;
    let mut settings = Settings::from_config(&args.hook_path, &cfg);
    let versioned = Settings::library_path(&args.hook_path, env!("CARGO_PKG_VERSION"), true);
    settings.library = Settings::library_path(
        &args.hook_path,
        env!("CARGO_PKG_VERSION"),
        versioned.exists(),
    );
    settings.allow_disable_control = args.allow_disable_control;
    let store = Arc::new(KubeStore::new(
        client,
        &args.node_name,
        Arc::new(hami_kube::SystemClock),
    ));
    // Discovery will own the sender and send a new list on health changes.
    let (_cards_tx, cards_rx) = watch::channel(cards);
    let make_plugin = || {
        Plugin::new(cards_rx.clone(), store.clone(), settings.clone())
            .with_numa_topology(args.numa_topology)
            .with_preferred_allocation(args.preferred_allocation)
    };

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    // One round per kubelet life: the kubelet removes every plugin socket
    // when it starts, so serve on a fresh socket and register again.
    loop {
        let plugin = make_plugin();
        let options = plugin.options();
        let listener = plugin::bind(&socket)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut server = tokio::spawn(plugin.serve(listener, async {
            let _ = stop_rx.await;
        }));
        let registered = async {
            loop {
                let seen = file_id(&kubelet_socket);
                match register(&kubelet_socket, &socket_name, &resource, options).await {
                    Ok(()) => return seen,
                    Err(e) => {
                        tracing::warn!("{e}; trying again in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        };
        let seen = tokio::select! {
            _ = &mut shutdown => return stop(stop_tx, &socket),
            r = &mut server => return server_ended(r, &socket),
            seen = registered => seen,
        };
        tracing::info!(
            resource,
            socket = %socket.display(),
            "serving and registered with {}",
            kubelet_socket.display()
        );
        tokio::select! {
            _ = &mut shutdown => return stop(stop_tx, &socket),
            r = &mut server => return server_ended(r, &socket),
            _ = kubelet_restarted(&kubelet_socket, &socket, seen) => {
                tracing::info!("the kubelet restarted: serving on a new socket and registering again");
                let _ = stop_tx.send(());
            }
        }
    }
}

/// Identity of a file: device, inode and change time (a socket the kubelet
/// recreates is a new file even if its inode number is reused).
fn file_id(path: &Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Resolves when the kubelet's registration socket is a different file
/// than `seen` (the kubelet restarted) or our socket is gone (a starting
/// kubelet removes it). Looks twice a second.
async fn kubelet_restarted(kubelet: &Path, ours: &Path, seen: Option<(u64, u64, i64, i64)>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let now = file_id(kubelet);
        if (now.is_some() && now != seen) || !ours.exists() {
            return;
        }
    }
}

fn stop(stop_tx: tokio::sync::oneshot::Sender<()>, socket: &Path) -> anyhow::Result<()> {
    tracing::info!("stopping");
    let _ = stop_tx.send(());
    let _ = std::fs::remove_file(socket);
    Ok(())
}

fn server_ended(
    r: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
    socket: &Path,
) -> anyhow::Result<()> {
    r.context("device plugin server task")?
        .with_context(|| format!("serving on {}", socket.display()))?;
    anyhow::bail!("the device plugin server on {} stopped", socket.display())
}
