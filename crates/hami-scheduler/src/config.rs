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
#[derive(Debug, Clone, Parser, Default)]
#[command(name = "hami-scheduler", version)]
pub struct Args {
    /// YAML config file; keys are the flag names in camelCase.
    #[arg(long, env = "HAMI_SCHEDULER_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address and port of the HTTPS server [default: 0.0.0.0:443].
    #[arg(long)]
    pub bind_address: Option<SocketAddr>,

    /// Optional plain-HTTP address serving only /metrics, /healthz and
    /// /readyz (for Prometheus without TLS, e.g. HAMi's port 31993).
    #[arg(long)]
    pub metrics_bind_address: Option<SocketAddr>,

    /// PEM certificate chain of the HTTPS server.
    #[arg(long)]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of the HTTPS server.
    #[arg(long)]
    pub tls_key_file: Option<PathBuf>,

    /// kubeconfig to use; default: $KUBECONFIG, ~/.kube/config, then the
    /// in-cluster service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,

    /// Scheduler name the webhook gives GPU pods [default: hami-scheduler].
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
    #[arg(long)]
    pub device_config: Option<PathBuf>,

    /// Only nodes matching this label selector are considered (e.g.
    /// `gpu=on`); default: all nodes.
    #[arg(long)]
    pub node_label_selector: Option<String>,

    /// A node bind lock older than this may be taken over, e.g. `5m`
    /// [default: 5m].
    #[arg(long, value_parser = parse_duration)]
    pub lock_timeout: Option<Duration>,

    /// How long a bind waits for a node lock held by another pod's bind
    /// [default: 20s].
    #[arg(long, value_parser = parse_duration)]
    pub lock_wait: Option<Duration>,

    /// A pod left in bind-phase=allocating (its device plugin never
    /// answered) longer than this is marked failed and its devices
    /// released [default: 2m].
    #[arg(long, value_parser = parse_duration)]
    pub allocating_timeout: Option<Duration>,

    /// Elect a leader among replicas with a Lease; only the leader binds
    /// and writes annotations [default: false].
    #[arg(long)]
    pub leader_elect: Option<bool>,

    /// Namespace of the leader-election Lease [default: kube-system].
    #[arg(long)]
    pub leader_elect_namespace: Option<String>,

    /// Name of the leader-election Lease [default: hami-scheduler].
    #[arg(long)]
    pub leader_elect_name: Option<String>,

    /// This replica's identity in the Lease [default: $POD_NAME, else the
    /// host name].
    #[arg(long)]
    pub leader_elect_identity: Option<String>,

    /// Lease duration; a leader that fails to renew for this long is
    /// replaced [default: 15s].
    #[arg(long, value_parser = parse_duration)]
    pub leader_elect_lease_duration: Option<Duration>,

    /// Largest accepted request body, in bytes [default: 16777216].
    #[arg(long)]
    pub max_body_bytes: Option<usize>,

    /// How often node handshakes are re-judged and stuck binds swept
    /// [default: 15s].
    #[arg(long, value_parser = parse_duration)]
    pub resync_period: Option<Duration>,
}

/// The config file: the same settings as the flags, camelCase keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    pub bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub scheduler_name: Option<String>,
    pub node_scheduler_policy: Option<String>,
    pub gpu_scheduler_policy: Option<String>,
    pub device_config: Option<PathBuf>,
    pub node_label_selector: Option<String>,
    pub lock_timeout: Option<String>,
    pub lock_wait: Option<String>,
    pub allocating_timeout: Option<String>,
    pub leader_elect: Option<bool>,
    pub leader_elect_namespace: Option<String>,
    pub leader_elect_name: Option<String>,
    pub leader_elect_identity: Option<String>,
    pub leader_elect_lease_duration: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub resync_period: Option<String>,
}

/// Every setting resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bind_address: SocketAddr,
    pub metrics_bind_address: Option<SocketAddr>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub scheduler_name: String,
    pub node_policy: NodePolicy,
    pub gpu_policy: GpuPolicy,
    pub device_config: Option<PathBuf>,
    pub node_label_selector: Option<String>,
    pub lock_timeout: Duration,
    pub lock_wait: Duration,
    pub allocating_timeout: Duration,
    pub leader_elect: bool,
    pub leader_elect_namespace: String,
    pub leader_elect_name: String,
    pub leader_elect_identity: String,
    pub leader_elect_lease_duration: Duration,
    pub max_body_bytes: usize,
    pub resync_period: Duration,
}

/// Parses `500ms`, `20s`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 20s, 5m, 1h)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn file_duration(file: &Path, key: &str, v: Option<String>) -> Result<Option<Duration>, String> {
    v.map(|s| parse_duration(&s).map_err(|e| format!("{}: {key}: {e}", file.display())))
        .transpose()
}

fn file_policy<P: std::str::FromStr<Err = String>>(
    file: &Path,
    key: &str,
    v: Option<String>,
) -> Result<Option<P>, String> {
    v.map(|s| {
        s.parse()
            .map_err(|e| format!("{}: {key}: {e}", file.display()))
    })
    .transpose()
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
        let identity = self
            .leader_elect_identity
            .clone()
            .or(file.leader_elect_identity)
            .or_else(|| std::env::var("POD_NAME").ok())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("hami-scheduler-{}", std::process::id()));
        Ok(Settings {
            bind_address: self
                .bind_address
                .or(file.bind_address)
                .unwrap_or_else(|| "0.0.0.0:443".parse().expect("valid address")),
            metrics_bind_address: self.metrics_bind_address.or(file.metrics_bind_address),
            tls_cert_file: self.tls_cert_file.clone().or(file.tls_cert_file),
            tls_key_file: self.tls_key_file.clone().or(file.tls_key_file),
            kubeconfig: self.kubeconfig.clone().or(file.kubeconfig),
            scheduler_name: self
                .scheduler_name
                .clone()
                .or(file.scheduler_name)
                .unwrap_or_else(|| hami_api::annotations::SCHEDULER_NAME.to_string()),
            node_policy: match self.node_scheduler_policy {
                Some(v) => v,
                None => file_policy(p, "nodeSchedulerPolicy", file.node_scheduler_policy)?
                    .unwrap_or_default(),
            },
            gpu_policy: match self.gpu_scheduler_policy {
                Some(v) => v,
                None => file_policy(p, "gpuSchedulerPolicy", file.gpu_scheduler_policy)?
                    .unwrap_or_default(),
            },
            device_config: self.device_config.clone().or(file.device_config),
            node_label_selector: self
                .node_label_selector
                .clone()
                .or(file.node_label_selector)
                .filter(|s| !s.is_empty()),
            lock_timeout: self
                .lock_timeout
                .or(file_duration(p, "lockTimeout", file.lock_timeout)?)
                .unwrap_or(Duration::from_secs(300)),
            lock_wait: self
                .lock_wait
                .or(file_duration(p, "lockWait", file.lock_wait)?)
                .unwrap_or(Duration::from_secs(20)),
            allocating_timeout: self
                .allocating_timeout
                .or(file_duration(
                    p,
                    "allocatingTimeout",
                    file.allocating_timeout,
                )?)
                .unwrap_or(Duration::from_secs(120)),
            leader_elect: self.leader_elect.or(file.leader_elect).unwrap_or(false),
            leader_elect_namespace: self
                .leader_elect_namespace
                .clone()
                .or(file.leader_elect_namespace)
                .unwrap_or_else(|| "kube-system".into()),
            leader_elect_name: self
                .leader_elect_name
                .clone()
                .or(file.leader_elect_name)
                .unwrap_or_else(|| "hami-scheduler".into()),
            leader_elect_identity: identity,
            leader_elect_lease_duration: self
                .leader_elect_lease_duration
                .or(file_duration(
                    p,
                    "leaderElectLeaseDuration",
                    file.leader_elect_lease_duration,
                )?)
                .unwrap_or(Duration::from_secs(15)),
            max_body_bytes: self
                .max_body_bytes
                .or(file.max_body_bytes)
                .unwrap_or(16 << 20),
            resync_period: self
                .resync_period
                .or(file_duration(p, "resyncPeriod", file.resync_period)?)
                .unwrap_or(Duration::from_secs(15)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
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
}
