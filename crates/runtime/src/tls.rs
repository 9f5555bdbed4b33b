//! TLS and mTLS for every gRPC server and client hop, from PEM files that are re-read when they
//! change (cert-manager rotates them in place), without dropping open streams.
//!
//! Servers: tonic's own `ServerTlsConfig` is fixed at start, so servers take connections through
//! [`ServerTls::incoming`], a rustls acceptor whose configuration is swapped when the files
//! change: connections made from then on get the new certificate; established connections (and
//! their streams) keep theirs. With a client CA the server requires and checks client
//! certificates (mTLS). Clients: [`ClientTls::tonic_config`] for tonic channels, read from the
//! files each time a channel is made.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How often the files are checked for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);
/// A client that has not finished its TLS handshake by then is dropped (it holds no stream).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// PEM files of one TLS endpoint. Servers: their certificate chain and key, and the CA that
/// client certificates must chain to (mTLS) if any. Clients: the CA that servers must chain to,
/// and their own certificate and key for servers that require one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Servers: the client CA (mTLS on). Clients: the server CA.
    pub ca: Option<PathBuf>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: format!("not a PEM certificate chain: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        reason: format!("no usable private key: {e}"),
    })
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c).map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let (Some(cert), Some(key_path)) = (&files.cert, &files.key) else {
        return Err(TlsError::Config(
            "a TLS server needs --tls-cert and --tls-key".into(),
        ));
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Config(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs(cert)?, key(key_path)?)
        .map_err(|e| {
            TlsError::Config(format!(
                "{} and {} do not make a certificate and its key: {e}",
                cert.display(),
                key_path.display()
            ))
        })?;
    // gRPC runs over HTTP/2 only.
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The newest modification time of the files (a rotation rewrites at least one).
fn stamp(files: &TlsFiles) -> Option<SystemTime> {
    [&files.cert, &files.key, &files.ca]
        .into_iter()
        .flatten()
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max()
}

/// A server's TLS: the current rustls configuration, rebuilt when its files change.
#[derive(Clone)]
pub struct ServerTls {
    files: TlsFiles,
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the files now: a bad file fails the server's start, with the file named.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let cfg = server_config(&files)?;
        Ok(Self {
            files,
            current: Arc::new(RwLock::new(Arc::new(cfg))),
        })
    }

    /// [`ServerTls::load`] when the server has TLS files, `None` (plaintext) when not.
    pub fn load_if(files: Option<&TlsFiles>) -> Result<Option<Self>, TlsError> {
        files.cloned().map(Self::load).transpose()
    }

    /// Whether clients must present a certificate (a client CA was given).
    pub fn requires_client_certs(&self) -> bool {
        self.files.ca.is_some()
    }

    fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the files if they changed since `seen`; a broken rotation (half-written files)
    /// keeps the previous configuration and is retried at the next change.
    fn reload_if_changed(&self, seen: &mut Option<SystemTime>) {
        let now = stamp(&self.files);
        if now == *seen {
            return;
        }
        match server_config(&self.files) {
            Ok(cfg) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(cfg);
                *seen = now;
                tracing::info!(files = ?self.files, "TLS certificates reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous ones")
            }
        }
    }

    /// TLS connections accepted on `listener`, for `serve_with_incoming_shutdown`. Handshakes
    /// run apart from the accept loop (a slow client delays nobody); failed ones are logged and
    /// dropped. The files are checked every [`RELOAD_EVERY`] while the stream lives.
    pub fn incoming(
        self,
        listener: TcpListener,
    ) -> Pin<
        Box<dyn tokio_stream::Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + Send>,
    > {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let reloader = self.clone();
        let reload = tokio::spawn(async move {
            let mut seen = stamp(&reloader.files);
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                reloader.reload_if_changed(&mut seen);
            }
        });
        tokio::spawn(async move {
            let _reload = AbortOnDrop(reload);
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(self.config());
                let sender = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = sender.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    break;
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A client's TLS for tonic channels: the CA its servers chain to, and its own certificate for
/// servers that require one (mTLS). Files are read each time a channel is configured, so a
/// rotated client certificate is used from the next connection on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub files: TlsFiles,
    /// The name the server's certificate must carry; `None`: the host of the URL.
    pub domain: Option<String>,
}

impl ClientTls {
    pub fn tonic_config(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let mut cfg = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &self.files.ca {
            cfg = cfg.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        } else {
            return Err(TlsError::Config(
                "a TLS client needs the CA its servers' certificates chain to (--tls-ca)".into(),
            ));
        }
        match (&self.files.cert, &self.files.key) {
            (Some(c), Some(k)) => {
                cfg = cfg.identity(tonic::transport::Identity::from_pem(read(c)?, read(k)?));
            }
            (None, None) => {}
            _ => {
                return Err(TlsError::Config(
                    "a client certificate needs both --tls-cert and --tls-key".into(),
                ))
            }
        }
        if let Some(d) = &self.domain {
            cfg = cfg.domain_name(d.clone());
        }
        Ok(cfg)
    }
}

/// Serves `router` on `listener` until `stop` resolves: over TLS (and mTLS when `tls` has a
/// client CA) when `tls` is set, plaintext otherwise. Plaintext clients of a TLS server fail
/// their handshake and never reach a service.
pub async fn serve(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    tls: Option<ServerTls>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    match tls {
        None => {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, stop).await
        }
        Some(t) => {
            router
                .serve_with_incoming_shutdown(t.incoming(listener), stop)
                .await
        }
    }
}

/// A tonic endpoint for `url` (`http://host:port` as routers and workers pass them around),
/// switched to `https` with `tls` when set.
pub fn endpoint(url: &str, tls: Option<&ClientTls>) -> Result<tonic::transport::Endpoint, String> {
    let Some(tls) = tls else {
        return tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| format!("invalid URL '{url}': {e}"));
    };
    let https = match url.strip_prefix("http://") {
        Some(rest) => format!("https://{rest}"),
        None if url.starts_with("https://") => url.to_owned(),
        None => format!("https://{url}"),
    };
    let cfg = tls.tonic_config().map_err(|e| e.to_string())?;
    tonic::transport::Endpoint::from_shared(https.clone())
        .map_err(|e| format!("invalid URL '{https}': {e}"))?
        .tls_config(cfg)
        .map_err(|e| format!("TLS for {https}: {e}"))
}
