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

#[test]
fn sigterm_to_hami_reaches_the_command_and_the_summary_still_prints() {
    let a = common::artifacts();
    let child = Command::new(env!("CARGO_BIN_EXE_hami"))
        .arg("run")
        .args(["--lib", a.vgpu.to_str().unwrap(), "--", "sleep", "30"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "the command was not ended"
    );
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("hami run: exit {} after", 128 + libc::SIGTERM)),
        "{stderr}"
    );
}
