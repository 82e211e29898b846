//! Test support: builds the interposer, the simulated driver and the probe
//! (once per test binary, in their own target dir so the outer `cargo test`
//! lock is never needed), and runs the probe under them.
//!
//! Set `HAMI_TEST_ARTIFACTS` to a directory holding `libvgpu.so`,
//! `libsim_gpu.so` and `cuda-probe` to skip the build (CI can prebuild them).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

pub struct Artifacts {
    pub vgpu: PathBuf,
    pub sim: PathBuf,
    pub probe: PathBuf,
    /// Holds `libcuda.so.1` and `libnvidia-ml.so.1` pointing at the simulation.
    pub sim_dir: PathBuf,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/<name> lies two levels below the workspace")
        .to_path_buf()
}

fn build() -> PathBuf {
    if let Some(dir) = std::env::var_os("HAMI_TEST_ARTIFACTS") {
        return PathBuf::from(dir);
    }
    let root = workspace_root();
    let target = root.join("target").join("hami-cdylibs");
    let status = Command::new(env!("CARGO"))
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target)
        .args([
            "build",
            "-j2",
            "--release",
            "-p",
            "hami-core",
            "-p",
            "sim-gpu",
        ])
        .status()
        .expect("run cargo to build libvgpu.so and sim-gpu");
    assert!(status.success(), "building libvgpu.so and sim-gpu failed");
    target.join("release")
}

pub fn artifacts() -> &'static Artifacts {
    static A: OnceLock<Artifacts> = OnceLock::new();
    A.get_or_init(|| {
        let dir = build();
        let sim = dir.join("libsim_gpu.so");
        // Several test binaries may get here at once: each link is made
        // under a private name and renamed into place (atomic).
        let sim_dir = dir.join("sim-lib");
        std::fs::create_dir_all(&sim_dir).unwrap();
        for name in ["libcuda.so.1", "libnvidia-ml.so.1"] {
            let tmp = sim_dir.join(format!("{name}.{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&sim, &tmp).unwrap();
            std::fs::rename(&tmp, sim_dir.join(name)).unwrap();
        }
        let a = Artifacts {
            vgpu: dir.join("libvgpu.so"),
            sim,
            probe: dir.join("cuda-probe"),
            sim_dir,
        };
        for p in [&a.vgpu, &a.sim, &a.probe] {
            assert!(p.exists(), "{} was not built", p.display());
        }
        a
    })
}

/// A scratch directory for one test: its shared region and limits file.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("hami-core-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }
    pub fn region(&self) -> PathBuf {
        self.dir.join("vgpu.cache")
    }
    pub fn limits(&self) -> PathBuf {
        self.dir.join("hami-limits")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The probe under the interposer (unless `preload` is false).
pub fn probe_cmd(scratch: &Scratch, env: &[(&str, &str)], args: &[&str], preload: bool) -> Command {
    let a = artifacts();
    let mut c = Command::new(&a.probe);
    c.args(args)
        .env_remove("CUDA_DEVICE_MEMORY_LIMIT")
        .env_remove("CUDA_DEVICE_SM_LIMIT")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("LIBCUDA_LOG_LEVEL")
        .env("LD_LIBRARY_PATH", &a.sim_dir)
        .env(
            "SIM_GPU_DEVICES",
            "4g 80 GPU-11111111-2222-3333-4444-555555555555 NVIDIA Sim 4GB",
        )
        // Processes of one test share their simulated card; tests never
        // share one with each other.
        .env("SIM_GPU_STATE_DIR", scratch.dir.join("sim-gpu"))
        .env_remove("SIM_GPU_PID_OFFSET")
        .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", scratch.region())
        .env("HAMI_LIMITS_FILE", scratch.limits())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if preload {
        c.env("LD_PRELOAD", &a.vgpu);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Runs the probe to completion; panics with its output if it failed.
pub fn probe(scratch: &Scratch, env: &[(&str, &str)], args: &[&str]) -> Lines {
    let out = probe_cmd(scratch, env, args, true).output().unwrap();
    Lines::from_output(&out)
}

pub fn spawn(scratch: &Scratch, env: &[(&str, &str)], args: &[&str]) -> Child {
    probe_cmd(scratch, env, args, true).spawn().unwrap()
}

/// The probe's output: one `<command> <CUresult> [values]` line per command.
pub struct Lines {
    pub lines: Vec<Vec<String>>,
    pub stderr: String,
}

impl Lines {
    pub fn from_output(out: &Output) -> Lines {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "probe failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        );
        Lines {
            lines: stdout
                .lines()
                .map(|l| l.split_whitespace().map(str::to_owned).collect())
                .collect(),
            stderr,
        }
    }

    /// The CUresult of the `i`-th command.
    pub fn rc(&self, i: usize) -> i32 {
        self.field(i, 1)
    }

    pub fn field<T: std::str::FromStr>(&self, i: usize, f: usize) -> T
    where
        T::Err: std::fmt::Debug,
    {
        let line = self
            .lines
            .get(i)
            .unwrap_or_else(|| panic!("no line {i} in {:?}", self.lines));
        line.get(f)
            .unwrap_or_else(|| panic!("no field {f} in {line:?}"))
            .parse()
            .unwrap()
    }

    /// Return codes of all commands, for compact assertions.
    pub fn rcs(&self) -> Vec<i32> {
        (0..self.lines.len()).map(|i| self.rc(i)).collect()
    }
}

pub const MIB: u64 = 1 << 20;
pub const OOM: i32 = 2;

/// Reads a spawned probe's stdout up to and including its `ready` line;
/// returns the lines before it.
pub fn until_ready(child: &mut Child) -> Vec<String> {
    use std::io::Read;
    let out = child.stdout.as_mut().unwrap();
    let mut seen = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = out.read(&mut b).unwrap();
        assert_eq!(
            n,
            1,
            "probe ended before ready: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.push(b[0]);
        if b[0] == b'\n' {
            let text = String::from_utf8_lossy(&seen).into_owned();
            let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
            if lines.last().is_some_and(|l| l.starts_with("ready ")) {
                lines.pop();
                return lines;
            }
        }
    }
}

/// Kills a child that is still running after `limit`: a watchdog against a
/// deadlock, not a timing assertion (the caller checks how it ended). The
/// caller disarms it once its wait for the child has returned; the
/// watchdog waits for that message, not on a clock of its own.
pub struct Watchdog {
    disarm: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Watchdog {
    pub fn disarm(self) {
        let _ = self.disarm.send(());
        self.thread.join().unwrap();
    }
}

pub fn watchdog(child: &Child, limit: std::time::Duration) -> Watchdog {
    let pid = child.id() as i32;
    let (disarm, disarmed) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = disarmed.recv_timeout(limit) {
            // SAFETY: our own child, wedged (not yet reaped: the caller is
            // still waiting for it).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    Watchdog { disarm, thread }
}

/// A spawned probe whose output the test follows while it runs: reader
/// threads forward its stdout and stderr line by line, so the test can wait
/// for a line (an event) with an overall bound instead of sleeping, and
/// write its go-ahead to the probe's stdin (the probe's `await` command).
pub struct Running {
    child: Option<Child>,
    stdin: Option<std::process::ChildStdin>,
    rx: std::sync::mpsc::Receiver<(bool, Option<String>)>,
    /// Lines seen so far.
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    /// Streams not ended yet.
    open: usize,
}

/// How long a test waits for an event before it calls the run wedged.
pub const EVENT_BOUND: std::time::Duration = std::time::Duration::from_secs(30);

impl Running {
    pub fn spawn(scratch: &Scratch, env: &[(&str, &str)], args: &[&str]) -> Running {
        use std::io::BufRead;
        let mut child = probe_cmd(scratch, env, args, true)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let forward = |is_err: bool, r: Box<dyn std::io::Read + Send>| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in std::io::BufReader::new(r).lines() {
                    let Ok(l) = l else { break };
                    if tx.send((is_err, Some(l))).is_err() {
                        return;
                    }
                }
                let _ = tx.send((is_err, None));
            });
        };
        forward(false, Box::new(out));
        forward(true, Box::new(err));
        Running {
            stdin: child.stdin.take(),
            child: Some(child),
            rx,
            stdout: Vec::new(),
            stderr: Vec::new(),
            open: 2,
        }
    }

    /// Takes one forwarded line (or end of stream) into `stdout`/`stderr`;
    /// false when nothing came within `timeout`.
    fn take(&mut self, timeout: std::time::Duration) -> bool {
        match self.rx.recv_timeout(timeout) {
            Ok((is_err, Some(l))) => {
                if is_err {
                    self.stderr.push(l);
                } else {
                    self.stdout.push(l);
                }
                true
            }
            Ok((_, None)) => {
                self.open -= 1;
                true
            }
            Err(_) => false,
        }
    }

    /// Waits until a line of stdout (`stderr` false) or stderr satisfies
    /// `what`, and returns it. Panics, with everything seen, if the probe
    /// ends first or nothing matches within [`EVENT_BOUND`].
    pub fn wait_for(&mut self, stderr: bool, what: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + EVENT_BOUND;
        let mut checked = 0;
        loop {
            let lines = if stderr { &self.stderr } else { &self.stdout };
            if let Some(l) = lines[checked..].iter().find(|l| what(l)) {
                return l.clone();
            }
            checked = lines.len();
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                self.open > 0 && self.take(left),
                "the awaited line never came ({}):\nstdout:\n{}\nstderr:\n{}",
                if self.open == 0 {
                    "the probe ended"
                } else {
                    "timed out"
                },
                self.stdout.join("\n"),
                self.stderr.join("\n")
            );
        }
    }

    /// Collects the lines already forwarded, without waiting.
    pub fn drain(&mut self) {
        while self.take(std::time::Duration::ZERO) {}
    }

    /// Whether the probe is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Sends the probe's `await` its go-ahead.
    pub fn go(&mut self) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the probe to end (within [`EVENT_BOUND`], else it is
    /// killed) and returns all its output; panics if it failed.
    pub fn finish(mut self) -> Lines {
        self.stdin.take();
        let mut child = self.child.take().unwrap();
        let dog = watchdog(&child, EVENT_BOUND);
        while self.open > 0 {
            self.take(std::time::Duration::from_secs(3600));
        }
        let status = child.wait().unwrap();
        dog.disarm();
        let (stdout, stderr) = (self.stdout.join("\n"), self.stderr.join("\n"));
        assert!(
            status.success(),
            "probe failed: {status:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
        Lines {
            lines: self
                .stdout
                .iter()
                .map(|l| l.split_whitespace().map(str::to_owned).collect())
                .collect(),
            stderr,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
