//! hami-certgen: the webhook's certificate for installs without
//! cert-manager (the Helm chart's hook Jobs). See `hami_scheduler::certgen`.

use std::net::IpAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hami_scheduler::certgen;

#[derive(Parser)]
#[command(
    version,
    about = "Creates hami-scheduler's webhook certificate and wires it into the cluster"
)]
struct Cli {
    /// kubeconfig file; default: $KUBECONFIG, ~/.kube/config, then in-cluster
    #[arg(long, global = true)]
    kubeconfig: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Writes a CA and a serving certificate into a kubernetes.io/tls Secret
    /// (tls.crt, tls.key, ca.crt), unless the Secret already holds one for
    /// the same hosts that is not about to expire.
    Create {
        #[arg(long)]
        namespace: String,
        /// The Secret's name
        #[arg(long)]
        secret: String,
        /// DNS names of the certificate (comma-separated or repeated)
        #[arg(long, value_delimiter = ',')]
        dns: Vec<String>,
        /// IP addresses of the certificate (kube-scheduler calls the
        /// extender on 127.0.0.1)
        #[arg(long, value_delimiter = ',')]
        ip: Vec<IpAddr>,
        /// Validity in days
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Puts the Secret's CA into the MutatingWebhookConfiguration's
    /// webhooks, and makes the Deployment own the Secret (so uninstalling the
    /// release removes it).
    Patch {
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        secret: String,
        /// The MutatingWebhookConfiguration to patch (none: only the owner)
        #[arg(long)]
        mutating_webhook: Option<String>,
        /// The Deployment (in --namespace) to own the Secret
        #[arg(long)]
        owner_deployment: Option<String>,
    },
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = hami_kube::client::connect(cli.kubeconfig.as_deref()).await?;
    match cli.command {
        Command::Create {
            namespace,
            secret,
            dns,
            ip,
            days,
        } => {
            let done = certgen::create(client, &namespace, &secret, &dns, &ip, days).await?;
            match done {
                certgen::Created::Kept => {
                    println!(
                        "Secret {namespace}/{secret} already holds a fitting certificate; kept"
                    )
                }
                certgen::Created::Created => println!("created Secret {namespace}/{secret}"),
                certgen::Created::Replaced(why) => {
                    println!("replaced Secret {namespace}/{secret}: {why}")
                }
            }
        }
        Command::Patch {
            namespace,
            secret,
            mutating_webhook,
            owner_deployment,
        } => {
            let n = certgen::patch(
                client,
                &namespace,
                &secret,
                mutating_webhook.as_deref(),
                owner_deployment.as_deref(),
            )
            .await?;
            if let Some(w) = &mutating_webhook {
                println!("put the CA of {namespace}/{secret} into {n} webhook(s) of {w}");
            }
            if let Some(d) = &owner_deployment {
                println!("Deployment {d} owns Secret {namespace}/{secret}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    hami_scheduler::tool::main("hami-certgen", run(cli))
}
