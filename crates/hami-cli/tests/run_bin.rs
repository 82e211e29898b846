//! The real `hami` binary: `hami run` is wired, passes the exit code
//! through, and prints its summary on stderr.

#[path = "../../hami-core/tests/common/mod.rs"]
mod common;

use std::process::Command;

fn hami_run(extra: &[&str], command: &[&str]) -> std::process::Output {
    let a = common::artifacts();
    Command::new(env!("CARGO_BIN_EXE_hami"))
        .arg("run")
        .args([
            "--lib",
            a.vgpu.to_str().unwrap(),
            "--sim",
            "--sim-lib",
            a.sim.to_str().unwrap(),
        ])
        .args(extra)
        .arg("--")
        .args(command)
        .output()
        .unwrap()
}

#[test]
fn limits_reach_the_command_and_the_summary_is_printed() {
    let a = common::artifacts();
    let out = hami_run(
        &["--gpumem", "1G"],
        &[
            a.probe.to_str().unwrap(),
            "init",
            "alloc",
            "700m",
            "alloc",
            "400m",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("alloc 0 0\nalloc 2 0"), "{stdout}");
    assert!(stderr.contains("hami run: exit 0 after "), "{stderr}");
    assert!(
        stderr.contains("gpu0: peak 0.68 GiB of 1.00 GiB"),
        "{stderr}"
    );
}

#[test]
fn the_exit_code_is_the_commands() {
    let out = hami_run(&[], &["sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let out = hami_run(&["--gpumem", "0"], &["true"]);
    assert_ne!(out.status.code(), Some(0), "a bad flag value is an error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--gpumem"));
}

/// Ends `hami run` with SIGTERM once `ready` says so, and checks that the
/// command got it and the summary still came.
fn sigterm_reaches_the_command(script: &str, ready: impl FnOnce(&mut dyn std::io::BufRead, u32)) {
    use std::io::BufReader;
    use std::process::Stdio;
    let a = common::artifacts();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hami"))
        .arg("run")
        .args(["--lib", a.vgpu.to_str().unwrap(), "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    ready(&mut stdout, child.id());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGTERM),
        "hami itself was killed: {:?}",
        out.status
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("hami run: exit {} after", 128 + libc::SIGTERM)),
        "{stderr}"
    );
}

#[test]
fn sigterm_to_hami_reaches_the_command_and_the_summary_still_prints() {
    // The command says it runs; only then is hami signalled.
    sigterm_reaches_the_command("echo ready; exec sleep 30", |stdout, hami| {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "ready\n");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(hami as i32, libc::SIGTERM) };
    });
}

#[test]
fn a_sigterm_right_after_the_command_starts_is_not_lost() {
    // The command signals hami the moment it starts, racing hami's own
    // return from starting it: forwarding must already be in place.
    sigterm_reaches_the_command("kill -TERM $PPID; exec sleep 30", |_, _| {});
}
