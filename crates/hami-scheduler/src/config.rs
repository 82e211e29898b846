//! Command-line flags and the optional config file. A flag given on the
//! command line wins over the file, which wins over the default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use hami_api::policy::{GpuPolicy, NodePolicy};

/// The hami-rs scheduler extender and admission webhook.
///
/// Serves kube-scheduler's extender calls (POST /filter, /bind), the
/// mutating admission webhook (POST /webhook), /healthz, /readyz and
/// /metrics over HTTPS. Every flag may also be set in the file given by
/// --config (YAML, the flag names in camelCase, e.g. `bindAddress`).
/// HAMi's scheduler flag spellings (`--http_bind`, `--cert_file`,
/// `--key_file`, `--device-config-file`, `--node-lock-timeout` ...) are
/// accepted too, so HAMi's chart runs this binary unchanged.
#[derive(Debug, Clone, Parser, Default)]
#[command(name = "hami-scheduler", version)]
pub struct Args {
    /// YAML config file; keys are the flag names in camelCase.
    #[arg(long, env = "HAMI_SCHEDULER_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address and port of the HTTPS server [default: 0.0.0.0:443].
    /// /filter and /bind answer only callers on loopback (kube-scheduler in
    /// the same pod) or with a client certificate signed by
    /// --extender-client-ca-file.
    #[arg(long, alias = "http_bind", value_parser = parse_addr)]
    pub bind_address: Option<SocketAddr>,

    /// Optional plain-HTTP address serving only /metrics, /healthz and
    /// /readyz (for Prometheus without TLS, e.g. HAMi's `:9395`).
    #[arg(long, value_parser = parse_addr)]
    pub metrics_bind_address: Option<SocketAddr>,

    /// Plain-HTTP address of the dashboard (/ui) and its JSON API
    /// (/api/v1/...), or `off` [default: 127.0.0.1:9396]. On loopback in a
    /// pod, only `kubectl port-forward` reaches it, so Kubernetes RBAC
    /// (pods/portforward) decides who sees it.
    #[arg(long, value_parser = parse_optional_addr)]
    pub dashboard_bind_address: Option<Listen>,

    /// Label selector of the node monitor pods (hami-node) whose
    /// `/metrics` the dashboard reads for live card usage, e.g.
    /// `app.kubernetes.io/component=node,app.kubernetes.io/instance=hami`
    /// (the chart's). Unset: no live usage
    #[arg(long)]
    pub node_monitor_selector: Option<String>,

    /// Namespace of those pods [default: all namespaces]
    #[arg(long)]
    pub node_monitor_namespace: Option<String>,

    /// Port of the node monitors' plain-HTTP /metrics [default: 9394]
    #[arg(long)]
    pub node_monitor_port: Option<u16>,

    /// How often the node monitors are read, e.g. `10s` [default: 10s]
    #[arg(long, value_parser = parse_duration)]
    pub node_monitor_period: Option<Duration>,

    /// PEM certificate chain of the HTTPS server (re-read when it changes).
    #[arg(long, alias = "cert_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of the HTTPS server (re-read when it changes).
    #[arg(long, alias = "key_file")]
    pub tls_key_file: Option<PathBuf>,

    /// PEM CA bundle: a caller of /filter or /bind that is not on loopback
    /// must present a client certificate signed by it (kube-scheduler's
    /// extender `tlsConfig.certFile`). Unset: loopback callers only.
    #[arg(long)]
    pub extender_client_ca_file: Option<PathBuf>,

    /// kubeconfig to use; default: $KUBECONFIG, ~/.kube/config, then the
    /// in-cluster service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,

    /// Scheduler name the webhook gives GPU pods; Filter and Bind act only
    /// for pods with this schedulerName [default: hami-scheduler].
    #[arg(long)]
    pub scheduler_name: Option<String>,

    /// Default node policy when a pod has no hami.io/node-scheduler-policy:
    /// binpack or spread [default: binpack].
    #[arg(long)]
    pub node_scheduler_policy: Option<NodePolicy>,

    /// Default GPU policy when a pod has no hami.io/gpu-scheduler-policy:
    /// binpack, spread, topology-aware or mutex [default: spread].
    #[arg(long)]
    pub gpu_scheduler_policy: Option<GpuPolicy>,

    /// device-config.yaml (or the whole hami-scheduler-device ConfigMap);
    /// default: the built-in NVIDIA defaults.
    #[arg(long, alias = "device-config-file")]
    pub device_config: Option<PathBuf>,

    /// Only nodes matching this label selector are considered (e.g.
    /// `gpu=on`); default: all nodes.
    #[arg(long)]
    pub node_label_selector: Option<String>,

    /// A node bind lock older than this may be taken over, e.g. `5m`
    /// [default: 5m].
    #[arg(long, alias = "node-lock-timeout", env = "HAMI_NODELOCK_EXPIRE", value_parser = parse_duration)]
    pub lock_timeout: Option<Duration>,

    /// How long a bind waits for a node lock held by another pod's bind
    /// [default: 20s].
    #[arg(long, alias = "node-lock-retry-timeout", value_parser = parse_duration)]
    pub lock_wait: Option<Duration>,

    /// kube-scheduler's extender `httpTimeout`: a bind may still run this
    /// long after kube-scheduler gave up on it, so a lock whose holder is
    /// still binding is not taken over before lock wait + this [default:
    /// 30s].
    #[arg(long, value_parser = parse_duration)]
    pub extender_http_timeout: Option<Duration>,

    /// A pod left in bind-phase=allocating (its device plugin never
    /// answered) longer than this is marked failed and its devices
    /// released [default: 2m].
    #[arg(long, value_parser = parse_duration)]
    pub allocating_timeout: Option<Duration>,

    /// Follow kube-scheduler's leader election: act as leader (bind, write
    /// handshakes and events) only while kube-scheduler's Lease names this
    /// pod. Off: this replica is always the leader [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub leader_elect: Option<bool>,

    /// Namespace of kube-scheduler's leader Lease [default: kube-system].
    #[arg(long, alias = "leader-elect-namespace")]
    pub leader_elect_resource_namespace: Option<String>,

    /// Name of kube-scheduler's leader Lease (its
    /// `leaderElection.resourceName`) [default: the scheduler name].
    #[arg(long, alias = "leader-elect-name")]
    pub leader_elect_resource_name: Option<String>,

    /// This pod's host name as kube-scheduler writes it in the Lease
    /// (`<hostname>_<uuid>`) [default: the kernel's host name].
    #[arg(long)]
    pub leader_elect_identity: Option<String>,

    /// Largest accepted request body, in bytes [default: 4194304; an
    /// AdmissionReview of the largest pod etcd stores fits].
    #[arg(long)]
    pub max_body_bytes: Option<usize>,

    /// How often node handshakes are re-judged and stuck binds swept
    /// [default: 15s].
    #[arg(long, value_parser = parse_duration)]
    pub resync_period: Option<Duration>,

    /// Open HTTPS connections served at once; more wait in the kernel's
    /// accept queue [default: 1024].
    #[arg(long)]
    pub max_connections: Option<usize>,

    /// A client that has not finished the TLS handshake, or sent a
    /// request's headers, within this is disconnected [default: 10s].
    #[arg(long, value_parser = parse_duration)]
    pub tls_handshake_timeout: Option<Duration>,

    /// A request whose body has not fully arrived within this is dropped
    /// [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    pub request_body_timeout: Option<Duration>,

    /// Binds running at once; a bind beyond this is refused at once (each
    /// holds a task and possibly a node lock) [default: 256].
    #[arg(long)]
    pub max_concurrent_binds: Option<usize>,

    /// With false, the webhook leaves a GPU pod that names
    /// default-scheduler (or no scheduler) with it, as HAMi does
    /// [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub force_overwrite_default_scheduler: Option<bool>,

    /// What the webhook does with environment variables that would switch
    /// the interposer's limits off in a GPU container: deny the pod or
    /// remove them [default: deny].
    #[arg(long)]
    pub protected_env: Option<ProtectedEnvMode>,

    /// Namespaces whose pods may set those variables (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub protected_env_allowed_namespaces: Option<Vec<String>>,

    /// HAMi flags with no meaning here, accepted so HAMi's chart and
    /// manifests run unchanged; each is logged once at start.
    #[command(flatten)]
    pub hami: HamiCompatFlags,
}

/// What the webhook does with interposer-disabling environment variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtectedEnvMode {
    #[default]
    Deny,
    Remove,
}

/// HAMi scheduler flags accepted and ignored (see [`Args::hami`]).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HamiCompatFlags {
    /// HAMi: client QPS (ignored: kube-rs has no client-side limiter).
    #[arg(long, hide = true)]
    pub kube_qps: Option<f32>,
    /// HAMi: client burst (ignored).
    #[arg(long, hide = true)]
    pub kube_burst: Option<u32>,
    /// HAMi: client timeout in seconds (ignored).
    #[arg(long, hide = true)]
    pub kube_timeout: Option<u32>,
    /// HAMi: pprof (ignored).
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub profiling: Option<bool>,
    /// HAMi: legacy metric names (ignored).
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub legacy_metrics: Option<bool>,
    /// HAMi: debug logging (use RUST_LOG=debug).
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub debug: Option<bool>,
    /// HAMi/klog verbosity (use RUST_LOG).
    #[arg(short = 'v', hide = true)]
    pub verbosity: Option<u8>,
    /// HAMi: Ascend devices (other vendors are not scheduled yet).
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub enable_ascend: Option<bool>,
    /// HAMi: Iluvatar devices (other vendors are not scheduled yet).
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub enable_iluvatar: Option<bool>,
}

impl HamiCompatFlags {
    /// One line per HAMi flag that was given and is ignored.
    pub fn notes(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut note = |given: bool, flag: &str, why: &str| {
            if given {
                v.push(format!(
                    "{flag} is accepted for HAMi compatibility and ignored: {why}"
                ));
            }
        };
        note(
            self.kube_qps.is_some(),
            "--kube-qps",
            "no client-side rate limiter",
        );
        note(
            self.kube_burst.is_some(),
            "--kube-burst",
            "no client-side rate limiter",
        );
        note(
            self.kube_timeout.is_some(),
            "--kube-timeout",
            "requests use kube-rs's timeouts",
        );
        note(self.profiling.is_some(), "--profiling", "no pprof server");
        note(
            self.legacy_metrics.is_some(),
            "--legacy-metrics",
            "only the current metric names exist",
        );
        note(
            self.debug.is_some() || self.verbosity.is_some(),
            "--debug/-v",
            "set RUST_LOG instead",
        );
        note(
            self.enable_ascend.is_some() || self.enable_iluvatar.is_some(),
            "--enable-ascend/--enable-iluvatar",
            "only NVIDIA devices are scheduled so far",
        );
        v
    }
}

/// The config file: the same settings as the flags, camelCase keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    pub bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub dashboard_bind_address: Option<String>,
    pub node_monitor_selector: Option<String>,
    pub node_monitor_namespace: Option<String>,
    pub node_monitor_port: Option<u16>,
    pub node_monitor_period: Option<String>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub extender_client_ca_file: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub scheduler_name: Option<String>,
    pub node_scheduler_policy: Option<String>,
    pub gpu_scheduler_policy: Option<String>,
    pub device_config: Option<PathBuf>,
    pub node_label_selector: Option<String>,
    pub lock_timeout: Option<String>,
    pub lock_wait: Option<String>,
    pub extender_http_timeout: Option<String>,
    pub allocating_timeout: Option<String>,
    pub leader_elect: Option<bool>,
    pub leader_elect_resource_namespace: Option<String>,
    pub leader_elect_resource_name: Option<String>,
    pub leader_elect_identity: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub resync_period: Option<String>,
    pub max_connections: Option<usize>,
    pub tls_handshake_timeout: Option<String>,
    pub request_body_timeout: Option<String>,
    pub max_concurrent_binds: Option<usize>,
    pub force_overwrite_default_scheduler: Option<bool>,
    pub protected_env: Option<ProtectedEnvMode>,
    pub protected_env_allowed_namespaces: Option<Vec<String>>,
}

/// Every setting resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bind_address: SocketAddr,
    pub metrics_bind_address: Option<SocketAddr>,
    pub dashboard_bind_address: Option<SocketAddr>,
    pub node_monitor_selector: Option<String>,
    pub node_monitor_namespace: Option<String>,
    pub node_monitor_port: u16,
    pub node_monitor_period: Duration,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub extender_client_ca_file: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub scheduler_name: String,
    pub node_policy: NodePolicy,
    pub gpu_policy: GpuPolicy,
    pub device_config: Option<PathBuf>,
    pub node_label_selector: Option<String>,
    pub lock_timeout: Duration,
    pub lock_wait: Duration,
    pub extender_http_timeout: Duration,
    pub allocating_timeout: Duration,
    pub leader_elect: bool,
    pub leader_elect_resource_namespace: String,
    pub leader_elect_resource_name: String,
    pub leader_elect_identity: String,
    pub max_body_bytes: usize,
    pub resync_period: Duration,
    pub max_connections: usize,
    pub tls_handshake_timeout: Duration,
    pub request_body_timeout: Duration,
    pub max_concurrent_binds: usize,
    pub force_overwrite_default_scheduler: bool,
    pub protected_env: ProtectedEnvMode,
    pub protected_env_allowed_namespaces: Vec<String>,
}

/// Parses a duration as Go writes them: `500ms`, `20s`, `5m`, `1h`,
/// `1m30s`, or a bare number of seconds. Negative values are refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let bad = || format!("{text:?} is not a duration (e.g. 500ms, 20s, 5m, 1m30s, 1h)");
    if text.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = text.parse::<f64>() {
        return secs(n).ok_or_else(bad);
    }
    let mut total = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let n: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            u => return Err(format!("{text:?}: unknown unit {u:?} (ms, s, m or h)")),
        };
        total += n * scale;
        rest = &rest[unit_len..];
    }
    secs(total).ok_or_else(bad)
}

fn secs(n: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(n).ok()
}

/// Parses `host:port`, or Go's `:port` for every interface.
/// Where the dashboard listens unless told otherwise.
pub const DEFAULT_DASHBOARD: &str = "127.0.0.1:9396";

/// An address to listen on, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    At(SocketAddr),
    Off,
}

impl Listen {
    pub fn address(self) -> Option<SocketAddr> {
        match self {
            Listen::At(a) => Some(a),
            Listen::Off => None,
        }
    }
}

/// `off`, or an address as [`parse_addr`] takes it.
pub fn parse_optional_addr(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen::Off);
    }
    parse_addr(s).map(Listen::At)
}

pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let full = match s.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => s.to_string(),
    };
    full.parse()
        .map_err(|e| format!("{s:?} is not an address:port ({e})"))
}

fn file_parsed<T>(
    file: &Path,
    key: &str,
    v: Option<String>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    v.map(|s| parse(&s).map_err(|e| format!("{}: {key}: {e}", file.display())))
        .transpose()
}

fn parse_policy<P: std::str::FromStr<Err = String>>(s: &str) -> Result<P, String> {
    s.parse()
}

/// A duration setting that must be more than zero: an error names the
/// flag and the file key.
fn positive(value: Duration, flag: &str, key: &str) -> Result<Duration, String> {
    if value.is_zero() {
        return Err(format!(
            "--{flag} ({key} in the config file) must be more than 0"
        ));
    }
    Ok(value)
}

impl Args {
    /// Resolves flags over the config file over defaults.
    pub fn settings(&self) -> Result<Settings, String> {
        let (path, file) = match &self.config {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
                let f: FileConfig = if text.trim().is_empty() {
                    FileConfig::default()
                } else {
                    serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?
                };
                (p.clone(), f)
            }
            None => (PathBuf::from("(no config file)"), FileConfig::default()),
        };
        let p = path.as_path();
        let duration = |flag: Option<Duration>,
                        key: &str,
                        file_value: Option<String>,
                        default: Duration|
         -> Result<Duration, String> {
            let v = match flag {
                Some(v) => v,
                None => file_parsed(p, key, file_value, parse_duration)?.unwrap_or(default),
            };
            let flag_name: String = key
                .chars()
                .flat_map(|c| {
                    if c.is_ascii_uppercase() {
                        vec!['-', c.to_ascii_lowercase()]
                    } else {
                        vec![c]
                    }
                })
                .collect();
            positive(v, &flag_name, key)
        };
        let identity = self
            .leader_elect_identity
            .clone()
            .or(file.leader_elect_identity)
            .or_else(hami_kube::leader::host_name)
            .unwrap_or_default();
        let scheduler_name = self
            .scheduler_name
            .clone()
            .or(file.scheduler_name)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| hami_api::annotations::SCHEDULER_NAME.to_string());
        let leader_elect = self.leader_elect.or(file.leader_elect).unwrap_or(false);
        if leader_elect && identity.is_empty() {
            return Err(
                "--leader-elect: this pod's host name is unknown; set --leader-elect-identity"
                    .into(),
            );
        }
        let positive_count = |v: usize, flag: &str| {
            if v == 0 {
                Err(format!("--{flag} must be more than 0"))
            } else {
                Ok(v)
            }
        };
        Ok(Settings {
            bind_address: match self.bind_address {
                Some(a) => a,
                None => file_parsed(p, "bindAddress", file.bind_address, parse_addr)?
                    .unwrap_or_else(|| "0.0.0.0:443".parse().expect("valid address")),
            },
            metrics_bind_address: match self.metrics_bind_address {
                Some(a) => Some(a),
                None => file_parsed(
                    p,
                    "metricsBindAddress",
                    file.metrics_bind_address,
                    parse_addr,
                )?,
            },
            dashboard_bind_address: match self.dashboard_bind_address {
                Some(a) => a.address(),
                None => file_parsed(
                    p,
                    "dashboardBindAddress",
                    file.dashboard_bind_address,
                    parse_optional_addr,
                )?
                .unwrap_or_else(|| Listen::At(DEFAULT_DASHBOARD.parse().expect("valid address")))
                .address(),
            },
            tls_cert_file: self.tls_cert_file.clone().or(file.tls_cert_file),
            tls_key_file: self.tls_key_file.clone().or(file.tls_key_file),
            extender_client_ca_file: self
                .extender_client_ca_file
                .clone()
                .or(file.extender_client_ca_file),
            kubeconfig: self.kubeconfig.clone().or(file.kubeconfig),
            leader_elect_resource_name: self
                .leader_elect_resource_name
                .clone()
                .or(file.leader_elect_resource_name)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| scheduler_name.clone()),
            scheduler_name,
            node_policy: match self.node_scheduler_policy {
                Some(v) => v,
                None => file_parsed(
                    p,
                    "nodeSchedulerPolicy",
                    file.node_scheduler_policy,
                    parse_policy,
                )?
                .unwrap_or_default(),
            },
            gpu_policy: match self.gpu_scheduler_policy {
                Some(v) => v,
                None => file_parsed(
                    p,
                    "gpuSchedulerPolicy",
                    file.gpu_scheduler_policy,
                    parse_policy,
                )?
                .unwrap_or_default(),
            },
            device_config: self.device_config.clone().or(file.device_config),
            node_label_selector: self
                .node_label_selector
                .clone()
                .or(file.node_label_selector)
                .filter(|s| !s.is_empty()),
            node_monitor_selector: self
                .node_monitor_selector
                .clone()
                .or(file.node_monitor_selector)
                .filter(|s| !s.is_empty()),
            node_monitor_namespace: self
                .node_monitor_namespace
                .clone()
                .or(file.node_monitor_namespace)
                .filter(|s| !s.is_empty()),
            node_monitor_port: self
                .node_monitor_port
                .or(file.node_monitor_port)
                .unwrap_or(9394),
            node_monitor_period: duration(
                self.node_monitor_period,
                "nodeMonitorPeriod",
                file.node_monitor_period,
                Duration::from_secs(10),
            )?,
            lock_timeout: duration(
                self.lock_timeout,
                "lockTimeout",
                file.lock_timeout,
                Duration::from_secs(300),
            )?,
            lock_wait: duration(
                self.lock_wait,
                "lockWait",
                file.lock_wait,
                Duration::from_secs(20),
            )?,
            extender_http_timeout: duration(
                self.extender_http_timeout,
                "extenderHttpTimeout",
                file.extender_http_timeout,
                Duration::from_secs(30),
            )?,
            allocating_timeout: duration(
                self.allocating_timeout,
                "allocatingTimeout",
                file.allocating_timeout,
                Duration::from_secs(120),
            )?,
            leader_elect,
            leader_elect_resource_namespace: self
                .leader_elect_resource_namespace
                .clone()
                .or(file.leader_elect_resource_namespace)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "kube-system".into()),
            leader_elect_identity: identity,
            max_body_bytes: positive_count(
                self.max_body_bytes
                    .or(file.max_body_bytes)
                    .unwrap_or(4 << 20),
                "max-body-bytes",
            )?,
            resync_period: duration(
                self.resync_period,
                "resyncPeriod",
                file.resync_period,
                Duration::from_secs(15),
            )?,
            max_connections: positive_count(
                self.max_connections
                    .or(file.max_connections)
                    .unwrap_or(1024),
                "max-connections",
            )?,
            tls_handshake_timeout: duration(
                self.tls_handshake_timeout,
                "tlsHandshakeTimeout",
                file.tls_handshake_timeout,
                Duration::from_secs(10),
            )?,
            request_body_timeout: duration(
                self.request_body_timeout,
                "requestBodyTimeout",
                file.request_body_timeout,
                Duration::from_secs(30),
            )?,
            max_concurrent_binds: positive_count(
                self.max_concurrent_binds
                    .or(file.max_concurrent_binds)
                    .unwrap_or(256),
                "max-concurrent-binds",
            )?,
            force_overwrite_default_scheduler: self
                .force_overwrite_default_scheduler
                .or(file.force_overwrite_default_scheduler)
                .unwrap_or(true),
            protected_env: self
                .protected_env
                .or(file.protected_env)
                .unwrap_or_default(),
            protected_env_allowed_namespaces: self
                .protected_env_allowed_namespaces
                .clone()
                .or(file.protected_env_allowed_namespaces)
                .unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(parse_duration("1e300").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn flags_win_over_file_over_defaults() {
        let dir = std::env::temp_dir().join(format!("hami-sched-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.yaml");
        std::fs::write(
            &f,
            "lockTimeout: 1m\nnodeSchedulerPolicy: spread\nschedulerName: from-file\n",
        )
        .unwrap();
        let args = Args::parse_from([
            "hami-scheduler",
            "--config",
            f.to_str().unwrap(),
            "--scheduler-name",
            "from-flag",
        ]);
        let s = args.settings().unwrap();
        assert_eq!(s.scheduler_name, "from-flag");
        assert_eq!(s.lock_timeout, Duration::from_secs(60));
        assert_eq!(s.node_policy, NodePolicy::Spread);
        assert_eq!(s.allocating_timeout, Duration::from_secs(120));
        std::fs::write(&f, "lockTimeot: 1m\n").unwrap();
        let e = args.settings().unwrap_err();
        assert!(e.contains("lockTimeot"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The scheduler arguments of HAMi's chart (templates/scheduler/
    /// deployment.yaml, with its default values) parse as they are.
    #[test]
    fn hami_chart_arguments_are_accepted() {
        let args = Args::try_parse_from([
            "scheduler",
            "--http_bind=0.0.0.0:443",
            "--cert_file=/tls/tls.crt",
            "--key_file=/tls/tls.key",
            "--scheduler-name=hami-scheduler",
            "--metrics-bind-address=:9395",
            "--node-scheduler-policy=binpack",
            "--gpu-scheduler-policy=spread",
            "--force-overwrite-default-scheduler=false",
            "--device-config-file=/device-config.yaml",
            "--leader-elect=true",
            "--leader-elect-resource-name=hami-scheduler",
            "--leader-elect-resource-namespace=hami-system",
            "--node-label-selector=gpu=on",
            "--node-lock-timeout=5m",
            "--legacy-metrics=true",
            "--debug",
            "-v=4",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let s = args.settings().unwrap();
        assert_eq!(s.bind_address, "0.0.0.0:443".parse().unwrap());
        assert_eq!(
            s.metrics_bind_address,
            Some("0.0.0.0:9395".parse().unwrap())
        );
        assert_eq!(s.tls_cert_file.as_deref(), Some(Path::new("/tls/tls.crt")));
        assert_eq!(
            s.device_config.as_deref(),
            Some(Path::new("/device-config.yaml"))
        );
        assert!(!s.force_overwrite_default_scheduler);
        assert!(s.leader_elect);
        assert_eq!(s.leader_elect_resource_name, "hami-scheduler");
        assert_eq!(s.leader_elect_resource_namespace, "hami-system");
        assert_eq!(s.lock_timeout, Duration::from_secs(300));
        assert_eq!(args.hami.notes().len(), 2, "{:?}", args.hami.notes());
    }

    #[test]
    fn zero_durations_are_errors_naming_the_setting() {
        let e = Args::parse_from(["hami-scheduler", "--lock-wait=0s"])
            .settings()
            .unwrap_err();
        assert!(e.contains("--lock-wait") && e.contains("lockWait"), "{e}");
        let e = Args::parse_from(["hami-scheduler", "--resync-period=0"])
            .settings()
            .unwrap_err();
        assert!(e.contains("--resync-period"), "{e}");
        let e = Args::parse_from(["hami-scheduler", "--max-concurrent-binds=0"])
            .settings()
            .unwrap_err();
        assert!(e.contains("--max-concurrent-binds"), "{e}");
        assert!(Args::try_parse_from(["hami-scheduler", "--lock-timeout=-1s"]).is_err());
        let dir = std::env::temp_dir().join(format!("hami-sched-cfg0-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.yaml");
        std::fs::write(&f, "allocatingTimeout: 0ms\n").unwrap();
        let e = Args::parse_from(["hami-scheduler", "--config", f.to_str().unwrap()])
            .settings()
            .unwrap_err();
        assert!(e.contains("allocatingTimeout"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_leader_lease_defaults_to_the_scheduler_name() {
        let s = Args::parse_from([
            "hami-scheduler",
            "--scheduler-name=gpu-sched",
            "--leader-elect",
            "--leader-elect-identity=pod-a",
        ])
        .settings()
        .unwrap();
        assert_eq!(s.leader_elect_resource_name, "gpu-sched");
        assert_eq!(s.leader_elect_resource_namespace, "kube-system");
        assert_eq!(s.leader_elect_identity, "pod-a");
    }
}
