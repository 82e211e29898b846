//! hami-uninstall: the Helm chart's pre-delete hook. Deletes the node
//! agents' DaemonSet in the foreground and waits until its pods are gone,
//! so that every hami-node, stopping, removes its node's annotations and
//! the files it installed while its RBAC still exists (`helm uninstall`
//! deletes the RBAC objects together with the DaemonSet, long before the
//! agents get their SIGTERM).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::Api;
use kube::api::DeleteParams;

#[derive(Parser)]
#[command(
    version,
    about = "Stops hami-rs's node agents (deletes their DaemonSet and waits for its pods) before an uninstall"
)]
struct Cli {
    /// kubeconfig file; default: $KUBECONFIG, ~/.kube/config, then in-cluster
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    #[arg(long)]
    namespace: String,
    /// The node agents' DaemonSet
    #[arg(long)]
    daemonset: String,
    /// How long to wait for the agents to stop, e.g. `3m`
    #[arg(long, default_value = "3m", value_parser = hami_scheduler::config::parse_duration)]
    timeout: Duration,
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = hami_kube::client::connect(cli.kubeconfig.as_deref()).await?;
    let api: Api<DaemonSet> = Api::namespaced(client, &cli.namespace);
    let name = &cli.daemonset;
    // Foreground: the DaemonSet stays until the garbage collector has
    // deleted its pods, i.e. until every agent has stopped.
    match api.delete(name, &DeleteParams::foreground()).await {
        Ok(_) => println!(
            "deleting DaemonSet {}/{name}; waiting for its pods",
            cli.namespace
        ),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            println!("DaemonSet {}/{name} is already gone", cli.namespace);
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    let deadline = Instant::now() + cli.timeout;
    let mut last = None;
    loop {
        match api.get_opt(name).await? {
            None => {
                println!("the node agents have stopped");
                return Ok(());
            }
            Some(ds) => {
                let left = ds.status.map(|s| s.current_number_scheduled).unwrap_or(0);
                if last != Some(left) {
                    println!("{left} agent pod(s) still stopping");
                    last = Some(left);
                }
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the node agents did not stop within {:?}",
            cli.timeout
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    hami_scheduler::tool::main("hami-uninstall", run(cli))
}
