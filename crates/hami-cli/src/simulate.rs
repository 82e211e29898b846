//! `hami simulate`: run a workload over a cluster with the engine, compare
//! policies side by side and optionally write an HTML report.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;

use hami_api::policy::{GpuPolicy, NodePolicy};
use hami_sched::sim::{self, ClusterSpec, SimReport, Workload};
use hami_sched::{Engine, Policies, Snapshot, pod_key};

use crate::input::{InputError, documents, load_config, parse_objects, read_text, typed};
use crate::schedule::Output;

/// The bundled defaults, so `hami simulate` runs anywhere.
const DEFAULT_CLUSTER: &str = include_str!("../../../examples/cluster.yaml");
const DEFAULT_WORKLOAD: &str = include_str!("../../../examples/workload.yaml");

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Cluster: the compact format of docs/simulate.md, or a `kubectl get nodes,pods -A -o yaml` dump.
    /// Default: the bundled examples/cluster.yaml.
    #[arg(long, value_name = "FILE")]
    pub cluster: Option<PathBuf>,
    /// Workload of pod groups. Default: the bundled examples/workload.yaml.
    #[arg(long, value_name = "FILE")]
    pub workload: Option<PathBuf>,
    /// device-config.yaml (or its ConfigMap); HAMi defaults when absent.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A policy pair to run, e.g. `node=binpack,gpu=spread`; repeat to compare several side by side.
    #[arg(long, value_name = "node=P,gpu=P", value_parser = parse_policy)]
    pub policy: Vec<Policies>,
    /// Write an HTML report with utilization charts (inline SVG, no network needed).
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// `table` for people, `json` for programs (stdout holds the JSON alone).
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
    /// No progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Parses `node=binpack,gpu=spread`; either half may be left out.
pub fn parse_policy(s: &str) -> Result<Policies, String> {
    let mut p = Policies::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some(("node", v)) => p.node = v.parse::<NodePolicy>()?,
            Some(("gpu", v)) => p.gpu = v.parse::<GpuPolicy>()?,
            _ => {
                return Err(format!(
                    "{part:?}: expected node=<binpack|spread> or gpu=<binpack|spread|topology-aware|mutex>"
                ));
            }
        }
    }
    Ok(p)
}

pub fn label(p: &Policies) -> String {
    format!("node={},gpu={}", p.node, p.gpu)
}

pub fn execute(args: SimulateArgs) -> Result<i32, InputError> {
    let config = load_config(args.config.as_deref())?;
    let (workload_file, workload_text) = source(
        args.workload.as_deref(),
        "examples/workload.yaml",
        DEFAULT_WORKLOAD,
    )?;
    let workload: Workload = single_document(&workload_file, &workload_text)?;
    let (cluster_file, cluster_text) = source(
        args.cluster.as_deref(),
        "examples/cluster.yaml",
        DEFAULT_CLUSTER,
    )?;
    let policies = if args.policy.is_empty() {
        vec![Policies::default()]
    } else {
        args.policy.clone()
    };

    let mut reports = Vec::new();
    let mut speeds = Vec::new();
    for p in &policies {
        let engine = Engine::from_config(&config, *p);
        let cluster = load_cluster(&engine, &cluster_file, &cluster_text)?;
        let label = label(p);
        let started = Instant::now();
        let mut progress = Progress::new(&label, args.quiet);
        let report = sim::simulate(&engine, &cluster, &workload, &label, &mut |done, total| {
            progress.update(done, total)
        })
        .map_err(|e| {
            let file = match e {
                sim::SimError::EmptyCluster => &cluster_file,
                sim::SimError::Group { .. } => &workload_file,
            };
            InputError::file(file, e.to_string())
        })?;
        progress.finish();
        let secs = started.elapsed().as_secs_f64();
        speeds.push(f64::from(report.pods) / secs.max(1e-9));
        reports.push(report);
    }
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&reports).expect("reports serialize")
        ),
        Output::Table => print_summary(&reports, &speeds, &cluster_file, &workload_file, &workload),
    }
    if let Some(path) = &args.report {
        let html = crate::report::render(&reports, &cluster_file, &workload_file, &workload);
        std::fs::write(path, html).map_err(|e| {
            InputError::file(
                &path.display().to_string(),
                format!("cannot write report: {e}"),
            )
        })?;
        if !args.quiet {
            eprintln!("report written to {}", path.display());
        }
    }
    Ok(0)
}

fn source(
    path: Option<&Path>,
    bundled_name: &str,
    bundled: &str,
) -> Result<(String, String), InputError> {
    match path {
        Some(p) => Ok((p.display().to_string(), read_text(p)?)),
        None => Ok((format!("{bundled_name} (bundled)"), bundled.to_string())),
    }
}

fn single_document<T: serde::de::DeserializeOwned>(
    file: &str,
    text: &str,
) -> Result<T, InputError> {
    let mut docs = documents(file, text)?;
    match docs.len() {
        1 => {
            let (n, v) = docs.remove(0);
            typed(file, n, "", v)
        }
        0 => Err(InputError::file(file, "is empty")),
        n => Err(InputError::file(
            file,
            format!("holds {n} documents, expected 1"),
        )),
    }
}

/// A compact cluster description, or Kubernetes objects (anything with `kind`).
fn load_cluster(engine: &Engine, file: &str, text: &str) -> Result<Snapshot, InputError> {
    let docs = documents(file, text)?;
    if docs.iter().any(|(_, d)| d.get("kind").is_some()) {
        let objects = parse_objects(file, text)?;
        let mut snapshot = Snapshot::new();
        for node in &objects.nodes {
            if let Err(e) = engine.add_node(&mut snapshot, node) {
                eprintln!(
                    "warning: {file}: node {}: {e}; left out",
                    node.metadata.name.as_deref().unwrap_or("?")
                );
            }
        }
        for pod in &objects.pods {
            if let Ok(Some(record)) = engine.pod_record(pod) {
                snapshot.add_pod(&pod_key(pod), record);
            }
        }
        return Ok(snapshot);
    }
    let spec: ClusterSpec = single_document(file, text)?;
    Ok(sim::build_cluster(&spec, &engine.nvidia.config))
}

/// Progress on stderr for runs longer than a moment: a live line on a
/// terminal, a line per 10 % otherwise.
struct Progress {
    label: String,
    quiet: bool,
    tty: bool,
    started: Instant,
    last_decile: u64,
    shown: bool,
}

impl Progress {
    fn new(label: &str, quiet: bool) -> Progress {
        Progress {
            label: label.to_string(),
            quiet,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            last_decile: 0,
            shown: false,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        if self.quiet || total == 0 || self.started.elapsed().as_millis() < 500 {
            return;
        }
        let pct = done * 100 / total;
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(
                err,
                "\rsimulating {}: {pct:>3}% ({done}/{total} events)",
                self.label
            );
            self.shown = true;
        } else if pct / 10 > self.last_decile {
            self.last_decile = pct / 10;
            let _ = writeln!(
                err,
                "simulating {}: {pct}% ({done}/{total} events, {:.1}s)",
                self.label,
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    fn finish(&mut self) {
        if self.shown {
            let _ = writeln!(std::io::stderr());
        }
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn wait(s: f64) -> String {
    sim::Seconds(s.round() as u64).to_string()
}

fn print_summary(
    reports: &[SimReport],
    speeds: &[f64],
    cluster: &str,
    workload_file: &str,
    workload: &Workload,
) {
    println!("cluster:  {cluster}");
    println!(
        "workload: {workload_file} ({} groups, horizon {})",
        workload.groups.len(),
        workload.horizon
    );
    println!();
    let mut rows = summary_rows(reports);
    rows.push((
        "simulation speed (pods/s)".into(),
        speeds.iter().map(|s| format!("{s:.0}")).collect(),
    ));
    let header: Vec<String> = reports.iter().map(|r| r.label.clone()).collect();
    rows.insert(0, (String::new(), header));
    print_grid(&rows);
    println!();
    println!("per group (placed / never placed / mean wait):");
    let mut group_rows: Vec<(String, Vec<String>)> = vec![(
        String::new(),
        reports.iter().map(|r| r.label.clone()).collect(),
    )];
    for (gi, g) in workload.groups.iter().enumerate() {
        group_rows.push((
            format!("{} ({} pods)", g.name, g.count),
            reports
                .iter()
                .map(|r| {
                    let o = &r.groups[gi];
                    format!(
                        "{} / {} / {}",
                        o.placed,
                        o.never_placed,
                        wait(o.mean_wait_s)
                    )
                })
                .collect(),
        ));
    }
    print_grid(&group_rows);
    println!();
    println!(
        "fragmentation: share of free memory on cards where the median request no longer fits."
    );
}

/// The summary, one row per measure and one column per report; the table
/// and the HTML report show the same rows.
pub fn summary_rows(reports: &[SimReport]) -> Vec<(String, Vec<String>)> {
    let row = |name: &str, f: &dyn Fn(&SimReport) -> String| {
        (name.to_string(), reports.iter().map(f).collect())
    };
    vec![
        row("pods", &|r| r.pods.to_string()),
        row("placed", &|r| {
            format!(
                "{} ({})",
                r.placed,
                pct(f64::from(r.placed) / f64::from(r.pods.max(1)))
            )
        }),
        row("placed on arrival", &|r| r.placed_on_arrival.to_string()),
        row("never placed (pending at end)", &|r| {
            r.never_placed.to_string()
        }),
        row("max pending", &|r| r.max_pending.to_string()),
        row("pods that waited", &|r| r.waited.to_string()),
        row("mean wait (all placed)", &|r| wait(r.mean_wait_s)),
        row("p95 wait", &|r| wait(r.p95_wait_s as f64)),
        row("slot utilization (mean)", &|r| pct(r.mean_slots())),
        row("memory utilization (mean)", &|r| pct(r.mean_memory())),
        row("memory utilization (peak)", &|r| pct(r.peak_memory())),
        row("compute utilization (mean)", &|r| pct(r.mean_cores())),
        row("fragmentation (mean)", &|r| pct(r.mean_fragmentation())),
    ]
}

fn print_grid(rows: &[(String, Vec<String>)]) {
    let first = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let cols = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.1.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (name, cells) in rows {
        let mut line = format!("{name:<first$}");
        for (c, cell) in cells.iter().enumerate() {
            line.push_str(&format!("  {cell:>w$}", w = widths[c]));
        }
        println!("{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_flag() {
        let p = parse_policy("node=spread,gpu=binpack").unwrap();
        assert_eq!((p.node, p.gpu), (NodePolicy::Spread, GpuPolicy::Binpack));
        let p = parse_policy("gpu=topology-aware").unwrap();
        assert_eq!(
            (p.node, p.gpu),
            (NodePolicy::Binpack, GpuPolicy::TopologyAware)
        );
        assert!(parse_policy("node=fill").is_err());
        assert!(parse_policy("binpack").is_err());
        assert_eq!(label(&p), "node=binpack,gpu=topology-aware");
    }

    #[test]
    fn bundled_examples_parse() {
        let w: Workload = single_document("w", DEFAULT_WORKLOAD).unwrap();
        assert!(w.groups.len() >= 3);
        let engine = Engine::default();
        let c = load_cluster(&engine, "c", DEFAULT_CLUSTER).unwrap();
        let types: std::collections::BTreeSet<_> = c
            .nodes()
            .iter()
            .flat_map(|n| n.devices.iter().map(|d| d.info.device_type.clone()))
            .collect();
        assert!(types.len() >= 3, "{types:?}");
    }
}
