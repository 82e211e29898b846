//! The HTTPS server on a real socket: who the caller is (loopback, client
//! certificate), deadlines for slow clients, the connection limit, and
//! certificates rotated without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::{Extension, Router};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use hami_e2e::certs::{Pem, Pki};
use hami_scheduler::tls::{self, Caller, ServeLimits};

/// Generous bound for events that must happen; never a sleep.
const WITHIN: Duration = Duration::from_secs(20);

struct Server {
    addr: std::net::SocketAddr,
    dir: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_pair(dir: &Path, pem: &Pem) {
    std::fs::write(dir.join("tls.crt"), &pem.cert).unwrap();
    std::fs::write(dir.join("tls.key"), &pem.key).unwrap();
}

/// A server whose one route answers with the [`Caller`] it was given.
async fn serve(pki: &Pki, client_ca: bool, limits: ServeLimits, tag: &str) -> Server {
    hami_kube::client::install_crypto_provider();
    let dir = std::env::temp_dir().join(format!("hami-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_pair(&dir, &pki.scheduler);
    std::fs::write(dir.join("ca.crt"), &pki.ca.cert).unwrap();
    let ca = dir.join("ca.crt");
    let config = tls::server_config(
        &dir.join("tls.crt"),
        &dir.join("tls.key"),
        client_ca.then_some(ca.as_path()),
    )
    .unwrap();
    let router = Router::new()
        .route(
            "/who",
            get(|Extension(c): Extension<Caller>| async move {
                format!("{} {}", c.peer.ip(), c.client_certificate)
            }),
        )
        .route(
            "/echo",
            axum::routing::post(|body: axum::body::Bytes| async move { body.len().to_string() }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(tls::serve_tls(listener, config, router, limits));
    Server { addr, dir, task }
}

fn der(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn connector(cas: &[&Pki], client: Option<&Pem>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for p in cas {
        for c in der(&p.ca.cert) {
            roots.add(c).unwrap();
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut pem.key.as_bytes())
                .unwrap()
                .unwrap();
            builder.with_client_auth_cert(der(&pem.cert), key).unwrap()
        }
    };
    // Every connection does a full handshake: a resumed session would show
    // the certificate of the session, not the one served now.
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

/// GET /who over a fresh TLS connection: the body and the certificate the
/// server presented.
async fn who(server: &Server, tls: &TlsConnector) -> (String, CertificateDer<'static>) {
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut s = tls.connect(name, tcp).await.unwrap();
    let served = s.get_ref().1.peer_certificates().unwrap()[0].clone();
    s.write_all(b"GET /who HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (body, served)
}

fn limits(max_connections: usize, timeout_ms: u64) -> ServeLimits {
    ServeLimits {
        max_connections,
        handshake_timeout: Duration::from_millis(timeout_ms),
        body_timeout: Duration::from_millis(timeout_ms),
    }
}

/// Waits until the server closes `s` (a read returns end of file or an
/// error), failing after [`WITHIN`].
async fn closed_by_server<S: AsyncReadExt + Unpin>(s: &mut S, what: &str) {
    let mut buf = [0u8; 256];
    let done = tokio::time::timeout(WITHIN, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(done.is_ok(), "{what}: the server kept the connection open");
}

#[tokio::test]
async fn the_caller_is_known_by_address_and_client_certificate() {
    let pki = Pki::generate().unwrap();
    let server = serve(&pki, true, limits(16, 5000), "caller").await;
    let (body, _) = who(&server, &connector(&[&pki], None)).await;
    assert_eq!(body, "127.0.0.1 false");
    let (body, _) = who(&server, &connector(&[&pki], Some(&pki.client))).await;
    assert_eq!(body, "127.0.0.1 true");
    // A certificate from another CA is refused at the handshake.
    let other = Pki::generate().unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let rejected = async {
        let mut s = connector(&[&pki], Some(&other.client))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        s.write_all(b"GET /who HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok::<String, std::io::Error>(out)
    }
    .await;
    assert!(rejected.is_err(), "{rejected:?}");
}

async fn handshaken(
    server: &Server,
    tls: &TlsConnector,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    tls.connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn clients_silent_after_the_handshake_or_slow_with_a_body_are_cut_off() {
    let pki = Pki::generate().unwrap();
    let server = serve(&pki, false, limits(3, 500), "quiet").await;
    let tls = connector(&[&pki], None);
    // Says nothing at all once the handshake is done (not even a request
    // line): no protocol sniffing may wait for it without a deadline.
    let mut quiet = handshaken(&server, &tls).await;
    // Sends the start of an HTTP/2 preface.
    let mut preface = handshaken(&server, &tls).await;
    preface.write_all(b"PRI * HTTP/2.0").await.unwrap();
    // Sends headers, then a body far shorter than it announced.
    let mut body = handshaken(&server, &tls).await;
    body.write_all(
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\nonly this",
    )
    .await
    .unwrap();
    closed_by_server(&mut quiet, "a client silent after the handshake").await;
    closed_by_server(&mut preface, "a client that sent part of an HTTP/2 preface").await;
    closed_by_server(&mut body, "a client that never finished its body").await;
    let (answer, _) = who(&server, &tls).await;
    assert_eq!(answer, "127.0.0.1 false");
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_do_not_hold_the_server() {
    let pki = Pki::generate().unwrap();
    let server = serve(&pki, false, limits(2, 500), "slow").await;
    let tls = connector(&[&pki], None);
    // Slowloris at the handshake: connects and never says a word.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // And after it: a handshake, then headers that never end.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut dribble = tls
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    dribble
        .write_all(b"GET /who HTTP/1.1\r\nHost: loc")
        .await
        .unwrap();
    // Both slots are taken by them; a real client still gets its answer
    // once the deadlines free the slots.
    let (body, _) = tokio::time::timeout(WITHIN, who(&server, &tls))
        .await
        .expect("a normal request waited behind slow clients forever");
    assert_eq!(body, "127.0.0.1 false");
    closed_by_server(&mut silent, "a client silent at the handshake").await;
    closed_by_server(&mut dribble, "a client that never finished its headers").await;
}

#[tokio::test]
async fn rotated_certificates_are_served_without_a_restart() {
    let first = Pki::generate().unwrap();
    let second = Pki::generate().unwrap();
    let server = serve(&first, false, limits(16, 5000), "rotate").await;
    let tls = connector(&[&first, &second], None);
    let (_, served) = who(&server, &tls).await;
    assert_eq!(served, der(&first.scheduler.cert)[0]);
    // A half-written pair (new certificate, old key) keeps the old one.
    std::fs::write(server.dir.join("tls.crt"), &second.scheduler.cert).unwrap();
    let (_, served) = who(&server, &tls).await;
    assert_eq!(served, der(&first.scheduler.cert)[0]);
    write_pair(&server.dir, &second.scheduler);
    let (_, served) = who(&server, &tls).await;
    assert_eq!(served, der(&second.scheduler.cert)[0]);
}
