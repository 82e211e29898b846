//! The `hami-node` binary end to end on its sockets: it reads its cards,
//! binds `nvidia-gpu.sock` in the device-plugin dir, registers with the
//! registration socket there (served by the test's kubelet-side peer),
//! lists its devices, serves and registers again when the peer restarts
//! as a kubelet does, and on SIGTERM stops with status 0 and removes its
//! socket. A kubeconfig pointing nowhere does: the registration loop's
//! patches fail (logged, tried again) and the plugin serves regardless.

mod peer;
use peer::{serve_registration, within};

use std::path::Path;
use std::process::{Command, Stdio};

use hami_node::proto;
use hami_node::proto::device_plugin_client::DevicePluginClient;
use hami_node::register::unix_channel;
use tokio::sync::mpsc;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Dials the plugin's socket and checks its first device list.
async fn assert_lists_the_cards(socket: &Path) {
    let mut client = DevicePluginClient::new(
        within("dialing hami-node", unix_channel(socket))
            .await
            .unwrap(),
    );
    let mut stream = within("ListAndWatch", client.list_and_watch(proto::Empty {}))
        .await
        .unwrap()
        .into_inner();
    let list = within("the device list", stream.message())
        .await
        .unwrap()
        .unwrap();
    let devices: Vec<(&str, &str)> = list
        .devices
        .iter()
        .map(|d| (d.id.as_str(), d.health.as_str()))
        .collect();
    assert_eq!(
        devices,
        [
            ("GPU-0-0", "Healthy"),
            ("GPU-0-1", "Healthy"),
            ("GPU-1-0", "Unhealthy"),
            ("GPU-1-1", "Unhealthy"),
        ]
    );
}

#[tokio::test]
async fn binary_registers_serves_its_cards_registers_again_after_a_kubelet_restart_and_stops_on_sigterm()
 {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("device-plugins");
    std::fs::create_dir(&plugins).unwrap();
    let cards = dir.path().join("cards.json");
    std::fs::write(
        &cards,
        r#"[{"id":"GPU-0","count":2,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","health":true},
            {"id":"GPU-1","index":1,"count":2,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4"}]"#,
    )
    .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:9'}\nusers:\n- name: u\n  user: {token: t}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n",
    )
    .unwrap();

    let lib = dir.path().join("image-libvgpu.so");
    std::fs::write(&lib, b"the interposer this agent carries").unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let registration_socket = plugins.join("kubelet.sock");
    let peer = serve_registration(&registration_socket, tx.clone());

    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_hami-node"))
            .arg("--node-name=node-a")
            .arg(format!("--cards-file={}", cards.display()))
            .arg(format!("--device-plugin-path={}", plugins.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--hook-path={}", dir.path().join("hook").display()))
            .arg(format!("--lib-source={}", lib.display()))
            .arg("--monitor-address=127.0.0.1:0")
            .arg("--allocation-mode=pod-resources")
            .stdin(Stdio::null())
            .spawn()
            .expect("starting hami-node"),
    );

    let req = within("hami-node's registration", rx.recv()).await.unwrap();
    assert_eq!(req.version, "v1beta1");
    assert_eq!(req.resource_name, "nvidia.com/gpu");
    assert_eq!(req.endpoint, "nvidia-gpu.sock");
    let options = req.options.expect("options");
    // The pod-resources allocation mode needs PreStartContainer and has no
    // preference to give before it.
    assert!(!options.get_preferred_allocation_available);
    assert!(options.pre_start_required);
    let socket = plugins.join(&req.endpoint);
    assert_lists_the_cards(&socket).await;
    // The library was installed before the plugin registered.
    let installed = dir.path().join(format!(
        "hook/vgpu/{}",
        hami_node::install::versioned_name(
            env!("CARGO_PKG_VERSION"),
            b"the interposer this agent carries"
        )
    ));
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        b"the interposer this agent carries"
    );

    // The peer restarts as a kubelet does: its registration socket is a
    // new file and every plugin socket in the dir is removed. hami-node
    // serves on a fresh socket and registers again.
    peer.abort();
    let _ = peer.await;
    std::fs::remove_file(&registration_socket).unwrap();
    std::fs::remove_file(&socket).unwrap();
    let _peer = serve_registration(&registration_socket, tx);
    let again = within("hami-node's second registration", rx.recv())
        .await
        .unwrap();
    assert_eq!(again.endpoint, "nvidia-gpu.sock");
    assert_lists_the_cards(&socket).await;

    let pid = i32::try_from(child.0.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(sent, 0, "SIGTERM to hami-node");
    let status = within(
        "hami-node to exit",
        tokio::task::spawn_blocking(move || child.0.wait()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "{} left behind", socket.display());
}

#[test]
fn a_missing_library_to_install_stops_the_binary_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let cards = dir.path().join("cards.json");
    std::fs::write(
        &cards,
        r#"[{"id":"GPU-0","count":2,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","health":true}]"#,
    )
    .unwrap();
    let missing = dir.path().join("image/libvgpu.so");
    let out = Command::new(env!("CARGO_BIN_EXE_hami-node"))
        .arg("--node-name=node-a")
        .arg(format!("--cards-file={}", cards.display()))
        .arg(format!("--hook-path={}", dir.path().join("hook").display()))
        .arg(format!("--lib-source={}", missing.display()))
        .stdin(Stdio::null())
        .output()
        .expect("running hami-node");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "reading the interposer library to install, {}: ",
            missing.display()
        )),
        "{stderr}"
    );
    assert!(
        !dir.path().join("hook/vgpu").exists()
            || std::fs::read_dir(dir.path().join("hook/vgpu"))
                .unwrap()
                .next()
                .is_none()
    );
}
