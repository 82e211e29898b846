//! Child processes that cannot outlive the test binary.
//!
//! Every child is started from one long-lived supervisor thread with
//! `PR_SET_PDEATHSIG = SIGKILL` (the signal fires when the *thread* that
//! started the child ends, so that thread must live as long as the process),
//! and is registered for an `atexit` hook that stops it and deletes the
//! cluster's directory when the test binary exits normally, whether or not
//! its tests panicked.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

type Job = (Command, mpsc::Sender<std::io::Result<Child>>);

static SUPERVISOR: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
static CLEANUP: Mutex<Cleanup> = Mutex::new(Cleanup {
    pids: Vec::new(),
    dirs: Vec::new(),
    keep: Vec::new(),
    first: Vec::new(),
    registered: false,
});

type Hook = Box<dyn FnOnce() + Send>;

struct Cleanup {
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
    /// Dirs (or dirs below them) that must not be removed.
    keep: Vec<PathBuf>,
    /// Run before the children are stopped, last registered first.
    first: Vec<Hook>,
    registered: bool,
}

extern "C" fn at_exit() {
    let hooks = match CLEANUP.lock() {
        Ok(mut c) => std::mem::take(&mut c.first),
        Err(_) => return,
    };
    for h in hooks.into_iter().rev() {
        h();
    }
    let Ok(mut c) = CLEANUP.lock() else { return };
    let pids = std::mem::take(&mut c.pids);
    for &pid in pids.iter().rev() {
        // SAFETY: kill(2) with a pid we started; no memory is touched.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for &pid in &pids {
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child, status is a valid pointer.
            let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
            if r != 0 || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
            libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG);
        }
    }
    if std::env::var_os("HAMI_E2E_KEEP").is_none() {
        let keep = std::mem::take(&mut c.keep);
        for d in c.dirs.drain(..) {
            if !keep.iter().any(|k| k.starts_with(&d)) {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

/// Runs `hook` when the test binary exits, before its children are
/// stopped and its dirs removed (for teardown that needs them alive).
pub fn at_exit_first(hook: Hook) {
    let mut c = CLEANUP.lock().unwrap_or_else(|e| e.into_inner());
    register_at_exit(&mut c);
    c.first.push(hook);
}

/// Never removes `dir` nor a registered dir above it at exit.
pub fn keep_dir(dir: &std::path::Path) {
    let mut c = CLEANUP.lock().unwrap_or_else(|e| e.into_inner());
    c.keep.push(dir.to_path_buf());
}

fn register_at_exit(c: &mut Cleanup) {
    if !c.registered {
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe {
            libc::atexit(at_exit);
        }
        c.registered = true;
    }
}

/// Removes `dir` when the test binary exits (unless HAMI_E2E_KEEP is set).
pub fn remove_at_exit(dir: PathBuf) {
    let mut c = CLEANUP.lock().unwrap_or_else(|e| e.into_inner());
    register_at_exit(&mut c);
    c.dirs.push(dir);
}

/// Starts `cmd` so that it dies with the test binary.
pub fn spawn(mut cmd: Command) -> std::io::Result<Child> {
    // SAFETY: prctl is async-signal-safe and touches no Rust state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let sender = SUPERVISOR.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("hami-e2e-supervisor".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The channel lives in a static, so this thread never ends.
                loop {
                    std::thread::park();
                }
            })
            .expect("starting the supervisor thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| std::io::Error::other("supervisor thread gone"))?;
    let child = reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("supervisor thread gone"))??;
    let mut c = CLEANUP.lock().unwrap_or_else(|e| e.into_inner());
    register_at_exit(&mut c);
    c.pids.push(child.id());
    Ok(child)
}

/// Stops a child now (SIGKILL) and reaps it.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
    let mut c = CLEANUP.lock().unwrap_or_else(|e| e.into_inner());
    c.pids.retain(|&p| p != child.id());
}
