//! HTTPS serving: rustls (ring provider only) over tokio, hyper-util's
//! connection builder, the axum router as the service.
//!
//! The listener is reachable from the pod network (the API server calls
//! /webhook through the Service), so it defends itself: a bounded number
//! of connections, a deadline for the TLS handshake and for each request's
//! headers, and certificates re-read when their files change (a
//! cert-manager renewal or a rotated Secret is served without a restart).
//! Each request carries the [`Caller`] that sent it, so handlers can tell
//! kube-scheduler beside us (loopback, or a client certificate) from
//! anyone else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::error::Error;

/// Who sent a request: the peer address and whether it presented a client
/// certificate that the configured CA verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub peer: SocketAddr,
    pub client_certificate: bool,
}

impl Caller {
    /// May call the extender verbs: kube-scheduler in the same pod comes
    /// over loopback; one elsewhere must prove itself with a certificate.
    pub fn may_call_extender(&self) -> bool {
        // `to_canonical`: on a dual-stack listener IPv4 loopback arrives as
        // `::ffff:127.0.0.1`.
        self.peer.ip().to_canonical().is_loopback() || self.client_certificate
    }
}

/// Limits of the HTTPS server.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    pub max_connections: usize,
    /// For the TLS handshake, and for each request's headers.
    pub handshake_timeout: Duration,
    /// For each request's body.
    pub body_timeout: Duration,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(p: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(p).map_err(|e| Error::Tls(format!("{}: {e}", p.display())))
}

/// Loads a certificate chain and its key, checking that they belong
/// together.
fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, Error> {
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Tls(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{}: no certificate found",
            cert.display()
        )));
    }
    let der: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| Error::Tls(format!("{}: {e}", key.display())))?
        .ok_or_else(|| Error::Tls(format!("{}: no private key found", key.display())))?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| Error::Tls(format!("{}: {e}", key.display())))?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|e| {
        Error::Tls(format!(
            "{} does not belong to {}: {e}",
            key.display(),
            cert.display()
        ))
    })?;
    Ok(certified)
}

/// What identifies a version of a file: a rewrite or a Secret's symlink
/// swap changes one of these.
type FileStamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamp(p: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Serves the certificate in the files, re-reading them when they change
/// (looked at on each handshake: two `stat`s). A half-written pair that
/// does not load keeps the previous certificate until the next look.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    /// The stamps last loaded (or last tried, when that failed) and the
    /// certificate served.
    current: Mutex<(FileStamp, FileStamp, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    pub fn new(cert: &Path, key: &Path) -> Result<ReloadingCert, Error> {
        let (cs, ks) = (stamp(cert), stamp(key));
        let loaded = load_certified_key(cert, key)?;
        Ok(ReloadingCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: Mutex::new((cs, ks, Arc::new(loaded))),
        })
    }

    fn get(&self) -> Arc<CertifiedKey> {
        let (cs, ks) = (stamp(&self.cert), stamp(&self.key));
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if (cs, ks) != (cur.0, cur.1) {
            match load_certified_key(&self.cert, &self.key) {
                Ok(k) => {
                    tracing::info!(cert = %self.cert.display(), "serving certificate reloaded");
                    *cur = (cs, ks, Arc::new(k));
                }
                Err(e) => {
                    // Tried once per change of the files, not per handshake.
                    cur.0 = cs;
                    cur.1 = ks;
                    tracing::warn!(error = %e, "certificate files changed but do not load; serving the previous one");
                }
            }
        }
        cur.2.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// Builds the server TLS config: the serving certificate from PEM files
/// (reloaded on change) and, with `client_ca`, optional client
/// certificates verified against it.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerConfig, Error> {
    let resolver = Arc::new(ReloadingCert::new(cert, key)?);
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let pem = read(ca)?;
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut pem.as_slice()) {
                let c = c.map_err(|e| Error::Tls(format!("{}: {e}", ca.display())))?;
                roots
                    .add(c)
                    .map_err(|e| Error::Tls(format!("{}: {e}", ca.display())))?;
            }
            if roots.is_empty() {
                return Err(Error::Tls(format!("{}: no CA certificate", ca.display())));
            }
            // Optional: the API server calls /webhook without one.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| Error::Tls(format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves `router` over TLS on `listener` until the task is dropped.
pub async fn serve_tls(
    listener: TcpListener,
    config: ServerConfig,
    router: Router,
    limits: ServeLimits,
) {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        // Past the limit, new connections wait in the kernel's backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let caller = Caller {
                peer,
                client_certificate: tls.get_ref().1.peer_certificates().is_some(),
            };
            let service = tower::ServiceBuilder::new()
                // A body dribbled in slower than this holds a slot no longer.
                .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
                    limits.body_timeout,
                ))
                .map_request(move |mut req: axum::http::Request<_>| {
                    req.extensions_mut().insert(caller);
                    req
                })
                .service(router);
            // HTTP/1.1 only (ALPN offers nothing else): the header deadline
            // then runs from the first byte the connection may send, and no
            // protocol sniffing waits without one.
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.handshake_timeout);
            if let Err(e) = builder
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(service))
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
