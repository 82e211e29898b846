//! The dashboard in a real headless Chromium (playwright-core driving
//! Debian's chromium) against hami-scheduler on the e2e control plane: the
//! page shows the kwok GPU nodes and the pods placed on them, follows a pod
//! added later, shows why a pod waits, and renders in light and dark
//! without console errors. Screenshots are kept under target/ as artifacts.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use hami_e2e::{GpuNode, TestNs};
use serde_json::json;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Chromium and playwright-core as scripts/ui-tools.sh installs them, or
/// why they are missing.
fn browser() -> Result<(PathBuf, PathBuf), String> {
    let chromium = std::env::var_os("HAMI_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.is_file() {
        return Err(format!(
            "no Chromium at {} (run scripts/ui-tools.sh, or set HAMI_CHROMIUM)",
            chromium.display()
        ));
    }
    let modules = repo().join("target/tools/ui/node_modules");
    if !modules.join("playwright-core").is_dir() {
        return Err(format!(
            "no playwright-core in {} (run scripts/ui-tools.sh)",
            modules.display()
        ));
    }
    Ok((chromium, modules))
}

/// The driver (tests/ui/driver.mjs): one command per line, one answer.
struct Driver {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Driver {
    fn start(url: &str, chromium: &Path, modules: &Path) -> Driver {
        let mut child = Command::new("node")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/driver.mjs"))
            .arg(url)
            .env("HAMI_CHROMIUM", chromium)
            .env("HAMI_UI_NODE_MODULES", modules)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("running node");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut d = Driver {
            child,
            stdin,
            stdout,
        };
        let first = d.read();
        assert_eq!(first, "ready", "the page never rendered its data");
        d
    }

    fn read(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("reading the driver");
        line.trim().to_string()
    }

    /// Sends `cmd`; its answer after `ok` (panics on `fail`).
    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").expect("writing to the driver");
        let answer = self.read();
        match answer.strip_prefix("ok") {
            Some(rest) => rest.trim().to_string(),
            None => panic!("{cmd}: {answer}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_nodes_pods_and_pending_pods_in_chromium() {
    let Some(cluster) = hami_e2e::cluster(env!("CARGO_BIN_EXE_hami-scheduler")) else {
        return;
    };
    let (chromium, modules) = match browser() {
        Ok(b) => b,
        Err(why) if std::env::var("HAMI_E2E_REQUIRE").is_ok_and(|v| v == "1") => {
            panic!("HAMI_E2E_REQUIRE=1 but: {why}")
        }
        Err(why) => {
            eprintln!("SKIP dashboard: {why}");
            return;
        }
    };
    let mut ns: TestNs = cluster.namespace("ui").await;
    let a = ns
        .add_node(&GpuNode::new("a", 2, 16384, "NVIDIA-Tesla T4"))
        .await;
    let b = ns
        .add_node(&GpuNode::new("b", 1, 81920, "NVIDIA-A100"))
        .await;
    let first = ns.gpu_pod(
        "first",
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "4000", "nvidia.com/gpucores": "30"}),
        json!({}),
    );
    ns.create_pod(first).await.unwrap();
    ns.wait_bound("first", Duration::from_secs(60)).await;

    let url = format!(
        "http://127.0.0.1:{}/ui?interval=300",
        cluster.dashboard_port
    );
    let mut d = Driver::start(&url, &chromium, &modules);
    for n in [&a, &b] {
        d.ask(&format!("wait-testid node-{n} 20000"));
    }
    let first_id = format!("pod-{}/first", ns.name);
    d.ask(&format!("wait-testid {first_id} 20000"));
    let shown = d.ask(&format!("text {first_id}"));
    assert!(shown.contains("4000") || shown.contains("3.9"), "{shown}");

    // A pod added while the page is open appears without a reload.
    let second = ns.gpu_pod(
        "second",
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "2000"}),
        json!({}),
    );
    ns.create_pod(second).await.unwrap();
    ns.wait_bound("second", Duration::from_secs(60)).await;
    d.ask(&format!("wait-testid pod-{}/second 20000", ns.name));

    // A pod no card can hold is listed as pending with the engine's reason.
    let huge = ns.gpu_pod(
        "huge",
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "200000"}),
        json!({}),
    );
    ns.create_pod(huge).await.unwrap();
    let pending_id = format!("pending-{}/huge", ns.name);
    d.ask(&format!(
        "wait-text {pending_id} CardInsufficientMemory 30000"
    ));

    let out = repo().join("target/test-artifacts");
    std::fs::create_dir_all(&out).unwrap();
    for theme in ["light", "dark"] {
        d.ask(&format!("theme {theme}"));
        let shot = out.join(format!("dashboard-{theme}.png"));
        d.ask(&format!("screenshot {}", shot.display()));
        let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(size > 10_000, "{}: {size} bytes", shot.display());
    }
    assert_eq!(d.ask("console-errors"), "0", "the page logged errors");

    // Deleting a pod takes it off its card.
    ns.delete_pod("second").await;
    d.ask(&format!("wait-gone pod-{}/second 20000", ns.name));
}
