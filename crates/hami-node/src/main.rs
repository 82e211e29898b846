//! `hami-node`: the node agent. It discovers the node's cards through
//! NVML (loaded at run time; `--sim` for sim-gpu's), registers them in the
//! node's `hami.io/node-nvidia-register` annotation and answers the
//! scheduler's handshake, serves the device plugin API on a unix socket in
//! the kubelet's device-plugin dir, registers with the kubelet, and hands
//! out devices with HAMi's Allocate protocol. See docs/node.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use hami_api::device::decode_devices;
use hami_api::node::AllocationMode;
use hami_api::{DeviceConfig, NvidiaConfig};
use hami_node::allocate::{Settings, SimDriver};
use hami_node::discovery::{self, CardSettings, Discovery, Fixed, Scan};
use hami_node::install;
use hami_node::monitor::{HostGpus, Monitor, NvmlGpus};
use hami_node::monitor_http;
use hami_node::pending::KubeStore;
use hami_node::plugin::{self, Plugin};
use hami_node::priority::Relay;
use hami_node::register::register;
use hami_node::registration::Registration;
use tokio::sync::watch;

#[derive(Debug, Parser)]
#[command(
    name = "hami-node",
    version,
    about = "hami-rs node agent: card discovery, node registration, kubelet device plugin, node monitor"
)]
struct Args {
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// kubeconfig file; default: $KUBECONFIG, ~/.kube/config, in-cluster.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// A fixed card list instead of NVML, as the JSON form of
    /// `hami.io/node-nvidia-register` (for tests).
    #[arg(long, conflicts_with_all = ["sim", "sim_devices"])]
    cards_file: Option<PathBuf>,
    /// The NVML library to load (path or name); default
    /// `libnvidia-ml.so.1` through the dynamic loader. Always wins over `--sim`.
    #[arg(long, env = "HAMI_NVML_LIB")]
    nvml_lib: Option<PathBuf>,
    /// Load sim-gpu's NVML (`libsim_gpu.so` next to this executable, else
    /// by name through the dynamic loader) instead of the driver's.
    #[arg(long)]
    sim: bool,
    /// sim-gpu's device file (sets `SIM_GPU_CONFIG`); implies `--sim`.
    #[arg(long)]
    sim_devices: Option<PathBuf>,
    /// HAMi's per-node `config.json` (`nodeconfig[]`): this node's entry
    /// overrides split count, scaling, log level; `filterdevices` drops cards.
    #[arg(long)]
    node_config: Option<PathBuf>,
    /// How often the cards are scanned again (patches only on change).
    #[arg(long, default_value = "30s", value_parser = parse_period)]
    rescan_period: Duration,
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
    /// The interposer library this agent carries (a path in its image):
    /// installed at start as `<hook>/vgpu/libvgpu.so.<version>-<hash>`,
    /// which Allocate then mounts. Without it, Allocate mounts
    /// `<hook>/vgpu/libvgpu.so.<version>` if present, else
    /// `<hook>/vgpu/libvgpu.so`.
    #[arg(long)]
    lib_source: Option<PathBuf>,
    /// Write the link scores between the cards (NVLinks, PCIe distance)
    /// into `hami.io/node-nvidia-score`, for the scheduler's topology-aware
    /// placement.
    #[arg(long)]
    topology_score: bool,
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
    /// Where the node monitor serves `/metrics` (HAMi's vgpu-monitor port;
    /// its chart exposes it as NodePort 31992); `off` runs no monitor.
    #[arg(long, default_value = "0.0.0.0:9394", value_parser = parse_listen)]
    monitor_address: Listen,
    /// How often the monitor reads the containers' regions.
    #[arg(long, default_value = "5s", value_parser = parse_period)]
    monitor_period: Duration,
    /// How long the dirs of a pod the API server no longer lists on this
    /// node are kept before the monitor removes them.
    #[arg(long, default_value = "60s", value_parser = parse_period)]
    monitor_cleanup_grace: Duration,
    /// Low-priority containers (`CUDA_TASK_PRIORITY` other than 0) resume
    /// once the high-priority containers on their card have launched
    /// nothing for this long (needs the monitor).
    #[arg(long, default_value = "100ms", value_parser = parse_period)]
    priority_idle: Duration,
    /// How a container is tied to its cards: `pod-resources` (the
    /// kubelet's PreStartContainer and PodResources API; binds take no
    /// node lock), `nri` (the runtime's NRI calls hami-node at each
    /// container's creation; no node lock) or `lock` (HAMi's protocol: one
    /// bind per node at a time, Allocate finds the pod through the node
    /// lock).
    /// `auto` (the default) takes `nri` when the runtime's NRI socket
    /// (`--nri-socket`) exists at start, else `pod-resources`.
    #[arg(long, default_value = "auto", value_parser = parse_mode)]
    allocation_mode: ModeArg,
    /// The runtime's NRI socket (`nri` mode).
    #[arg(long, default_value = hami_node::nri::DEFAULT_SOCKET)]
    nri_socket: PathBuf,
    /// The kubelet's PodResources socket (`pod-resources` mode).
    #[arg(long, default_value = hami_node::pod_resources::DEFAULT_SOCKET)]
    pod_resources_socket: PathBuf,
}

#[derive(Debug, Clone, Copy)]
enum ModeArg {
    Auto,
    Fixed(AllocationMode),
}

fn parse_mode(s: &str) -> Result<ModeArg, String> {
    if s == "auto" {
        return Ok(ModeArg::Auto);
    }
    AllocationMode::parse(s)
        .map(ModeArg::Fixed)
        .ok_or_else(|| format!("{s:?} is not `auto`, `nri`, `pod-resources` or `lock`"))
}

/// The allocation mode to run: `auto` takes NRI where the runtime serves
/// it (its socket exists), else the kubelet's PodResources.
fn allocation_mode(arg: ModeArg, nri_socket: &Path) -> AllocationMode {
    use std::os::unix::fs::FileTypeExt as _;
    match arg {
        ModeArg::Fixed(m) => m,
        ModeArg::Auto => {
            let nri = std::fs::metadata(nri_socket).is_ok_and(|m| m.file_type().is_socket());
            if nri {
                AllocationMode::Nri
            } else {
                tracing::info!(
                    "no NRI socket at {} (NRI off in the runtime, or another path: --nri-socket): allocating through the kubelet's PodResources",
                    nri_socket.display()
                );
                AllocationMode::PodResources
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Listen {
    Off,
    At(std::net::SocketAddr),
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen::Off);
    }
    s.parse()
        .map(Listen::At)
        .map_err(|e| format!("{s:?} is neither `off` nor an address like 0.0.0.0:9394: {e}"))
}

fn parse_period(s: &str) -> Result<Duration, String> {
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("{s:?} is not a duration like 30s or 500ms: {e}"))?;
    let d = Duration::try_from(d).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err("the period must be above 0".into());
    }
    Ok(d)
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

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a DaemonSet's log is a file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if let Some(file) = &args.sim_devices {
        // SAFETY: no other thread runs yet (the runtime starts below).
        unsafe {
            std::env::remove_var("SIM_GPU_DEVICES");
            std::env::set_var("SIM_GPU_CONFIG", file);
        }
    }
    if sim_mode(&args) && std::env::var_os(SIM_STATE_ENV).is_none_or(|v| v.is_empty()) {
        // The cards' state must be where the containers' mount finds it.
        // SAFETY: as above.
        unsafe {
            std::env::set_var(
                SIM_STATE_ENV,
                args.hook_path.join("vgpu").join(install::SIM_STATE_NAME),
            )
        };
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

/// sim-gpu's state dir variable.
const SIM_STATE_ENV: &str = "SIM_GPU_STATE_DIR";

fn sim_mode(args: &Args) -> bool {
    args.sim || args.sim_devices.is_some()
}

/// With `--sim` (or `--sim-devices`): what Allocate injects into GPU
/// containers, from the library NVML is loaded from (`--nvml-lib` names
/// sim-gpu's then) and sim-gpu's own settings.
fn sim_driver(args: &Args) -> anyhow::Result<Option<SimDriver>> {
    if !sim_mode(args) {
        return Ok(None);
    }
    let exe = std::env::current_exe().ok();
    let library = discovery::nvml_lib(args.nvml_lib.as_deref(), true, exe.as_deref());
    if !library.is_absolute() {
        tracing::warn!(
            "sim-gpu's library was found by name ({}), so containers do not get it: put libsim_gpu.so next to hami-node",
            library.display()
        );
        return Ok(None);
    }
    let devices = match (
        std::env::var("SIM_GPU_DEVICES"),
        std::env::var_os("SIM_GPU_CONFIG"),
    ) {
        (Ok(inline), _) => inline.replace(';', "\n"),
        (_, Some(file)) => std::fs::read_to_string(&file)
            .with_context(|| format!("reading sim-gpu's device file {}", file.to_string_lossy()))?,
        _ => String::new(),
    };
    let state_dir = PathBuf::from(std::env::var_os(SIM_STATE_ENV).unwrap_or_default());
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating sim-gpu's state dir {}", state_dir.display()))?;
    // Containers mount it from the host: install it under the hook dir
    // (the agent's own copy may be a path in its image).
    let installed = install::install_as(
        &library,
        &args.hook_path.join("vgpu"),
        install::SIM_LIBRARY_NAME,
        env!("CARGO_PKG_VERSION"),
    )?;
    Ok(Some(SimDriver {
        library: installed.path,
        devices,
        state_dir,
    }))
}

type SharedHostGpus = Arc<dyn HostGpus>;

/// The card source: `--cards-file`, else NVML (which also gives the
/// monitor's host metrics).
fn scanner(
    args: &Args,
    settings: CardSettings,
) -> anyhow::Result<(Box<dyn Scan>, Option<SharedHostGpus>)> {
    if let Some(path) = &args.cards_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cards = decode_devices(&path.display().to_string(), &text)?;
        return Ok((Box::new(Fixed(cards)), None));
    }
    let exe = std::env::current_exe().ok();
    let lib = discovery::nvml_lib(
        args.nvml_lib.as_deref(),
        args.sim || args.sim_devices.is_some(),
        exe.as_deref(),
    );
    let d = Discovery::open(lib.as_os_str(), settings)?.with_topology_score(args.topology_score);
    tracing::info!("NVML loaded from {}", lib.display());
    let host: Arc<dyn HostGpus> = Arc::new(NvmlGpus::new(d.nvml()));
    Ok((Box::new(d), Some(host)))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let cluster = nvidia_config(args.device_config_file.as_deref())?;
    let node = discovery::node_settings(cluster, args.node_config.as_deref(), &args.node_name)?;
    let cfg = node.config;
    let node_numa = node.numa_topology;
    let (mut scanner, host_gpus) = scanner(&args, node.cards)?;
    let cards = scanner.scan()?;
    tracing::info!(cards = cards.len(), "found the node's cards");
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

    let mut settings = Settings::from_config(&args.hook_path, &cfg);
    let version = env!("CARGO_PKG_VERSION");
    settings.library = match &args.lib_source {
        Some(source) => {
            let installed = install::install(source, &settings.vgpu_dir(), version)?;
            tracing::info!(
                written = installed.written,
                "interposer library {} installed as {}",
                source.display(),
                installed.path.display()
            );
            installed.path
        }
        None => {
            let versioned = Settings::library_path(&args.hook_path, version, true);
            Settings::library_path(&args.hook_path, version, versioned.exists())
        }
    };
    if install::write_preload(&settings.vgpu_dir())? {
        tracing::info!(
            "wrote {}",
            settings.vgpu_dir().join(install::PRELOAD_NAME).display()
        );
    }
    let client = hami_kube::client::connect(args.kubeconfig.as_deref()).await?;
    settings.allow_disable_control = args.allow_disable_control;
    settings.sim = sim_driver(&args)?;
    let store = Arc::new(KubeStore::new(
        client.clone(),
        &args.node_name,
        Arc::new(hami_kube::SystemClock),
    ));
    let numa_topology = args.numa_topology || node_numa == Some(true);
    // Registration owns the sender: each rescan sends the cards when they changed.
    let (cards_tx, cards_rx) = watch::channel(cards);
    let mode = allocation_mode(args.allocation_mode, &args.nri_socket);
    let owners: Option<Arc<dyn hami_node::pod_resources::DeviceOwners>> = match mode {
        AllocationMode::PodResources => {
            if !args.pod_resources_socket.exists() {
                tracing::warn!(
                    "the kubelet's PodResources socket {} does not exist (yet): containers cannot start until it does (--pod-resources-socket; --allocation-mode lock does without it)",
                    args.pod_resources_socket.display()
                );
            }
            Some(Arc::new(hami_node::pod_resources::PodResources::new(
                &args.pod_resources_socket,
            )))
        }
        _ => None,
    };
    tracing::info!(mode = mode.as_str(), "allocation mode");
    let plugin_resource = resource.clone();
    let registration = Registration::new(client.clone(), &args.node_name, cards_tx)
        .with_period(args.rescan_period)
        .with_allocation_mode(mode);
    let node_lock = registration.node_lock();
    let make_plugin = || {
        let p = Plugin::new(cards_rx.clone(), store.clone(), settings.clone())
            .with_numa_topology(numa_topology)
            .with_preferred_allocation(args.preferred_allocation);
        match (&owners, mode) {
            (Some(o), _) => p.with_pod_resources(
                o.clone(),
                &args.node_name,
                &plugin_resource,
                node_lock.clone(),
            ),
            (None, AllocationMode::Nri) => p.with_nri(),
            (None, _) => p,
        }
    };

    let (stop_all, stopping) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_all.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if mode == AllocationMode::Nri {
        let handler = Arc::new(hami_node::nri::node::NodeHandler {
            store: store.clone(),
            cards: cards_rx.clone(),
            settings: settings.clone(),
            node: args.node_name.clone(),
            node_lock: node_lock.clone(),
        });
        tokio::spawn(hami_node::nri::run(
            args.nri_socket.clone(),
            hami_node::nri::Identity {
                name: "hami-node".into(),
                index: "10".into(),
            },
            handler,
            stopped(stopping.clone()),
        ));
    }
    if let Listen::At(addr) = args.monitor_address {
        let shared = monitor_http::Shared::default();
        let (bound, server) = monitor_http::serve(addr, shared.clone()).await?;
        let (pods, watch) = monitor_http::pod_store(client.clone(), &args.node_name);
        tokio::spawn(watch);
        let monitor = Monitor::new(&settings.vgpu_dir(), args.monitor_cleanup_grace);
        let (plans, relay_plans) = std::sync::mpsc::channel();
        let relay = Relay::new(args.priority_idle);
        std::thread::Builder::new()
            .name("priority-relay".into())
            .spawn(move || relay.run(relay_plans))
            .context("starting the priority relay")?;
        tokio::spawn(monitor_http::run(
            monitor,
            pods,
            host_gpus,
            args.monitor_period,
            shared,
            Some(plans),
        ));
        tokio::spawn(server);
        tracing::info!("node monitor listening on {bound}");
    }
    let registration = tokio::spawn(registration.run(scanner, stopped(stopping.clone())));
    let result = serve(
        Sockets {
            resource,
            socket_name,
            socket,
            kubelet_socket,
        },
        make_plugin,
        stopped(stopping),
    )
    .await;
    // The registration loop removes the node's annotations before it ends.
    let _ = registration.await;
    // What this agent installed goes with it, unless a container still
    // uses it (a rolling update or a stop with GPU pods keeps it).
    if args.lib_source.is_some() || sim_mode(&args) {
        match install::remove_if_unused(&settings.vgpu_dir()) {
            Ok(Some(removed)) => tracing::info!(
                "removed {} file(s) from {}: no container uses them",
                removed.len(),
                settings.vgpu_dir().display()
            ),
            Ok(None) => tracing::info!(
                "kept {}: containers still use it",
                settings.vgpu_dir().display()
            ),
            Err(e) => tracing::warn!("cleaning up {}: {e}", settings.vgpu_dir().display()),
        }
    }
    result
}

struct Sockets {
    resource: String,
    socket_name: String,
    socket: PathBuf,
    kubelet_socket: PathBuf,
}

/// Serves the device plugin, registering with every kubelet life, until
/// `shutdown`.
async fn serve(
    sockets: Sockets,
    make_plugin: impl Fn() -> Plugin,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let Sockets {
        resource,
        socket_name,
        socket,
        kubelet_socket,
    } = sockets;
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
