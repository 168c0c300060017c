//! gRPC over TLS: the coordinator's certificate, self-signed on first start
//! and kept in the data directory (key file mode 0600), or one given as PEM
//! files. Agents pin its SHA-256 (`--server-pin`), so no CA is needed.
//!
//! [`incoming`] turns guarded TCP connections into a stream of finished TLS
//! connections for tonic; a handshake that stalls is dropped after
//! [`HANDSHAKE_TIMEOUT`] without holding up the others.

use crate::listen::Guarded;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tracing::debug;

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The name in a self-signed certificate (agents check the pin, not names).
pub const SERVER_NAME: &str = "bandshare-coordinator";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: {1}")]
    File(String, std::io::Error),
    #[error("{0}: {1}")]
    Pem(String, String),
    #[error("cannot make a certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A TLS acceptor and the SHA-256 of its certificate (the pin).
#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    pub pin: [u8; 32],
}

impl Tls {
    /// The pin as agents give it: 64 hex digits.
    pub fn pin_hex(&self) -> String {
        bandshare_core::DeviceKey(self.pin).to_string()
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn acceptor(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Result<Tls, TlsError> {
    let pin = sha256(&cert);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Tls {
        acceptor: TlsAcceptor::from(Arc::new(cfg)),
        pin,
    })
}

/// The certificate in `dir/tls/` (cert.der, key.der), made on first use.
pub fn self_signed(dir: &Path) -> Result<Tls, TlsError> {
    let tls_dir = dir.join("tls");
    let (cert_path, key_path) = (tls_dir.join("cert.der"), tls_dir.join("key.der"));
    fn io(p: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
        move |e| TlsError::File(p.display().to_string(), e)
    }
    if !cert_path.exists() || !key_path.exists() {
        let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])?;
        bandshare_store::private::private_dir(&tls_dir).map_err(io(&tls_dir))?;
        write_private(&key_path, &ck.signing_key.serialize_der()).map_err(io(&key_path))?;
        write_private(&cert_path, ck.cert.der()).map_err(io(&cert_path))?;
    }
    let cert = std::fs::read(&cert_path).map_err(io(&cert_path))?;
    let key = std::fs::read(&key_path).map_err(io(&key_path))?;
    acceptor(
        CertificateDer::from(cert),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
    )
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// A given certificate chain and key, as PEM files.
pub fn from_pem(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Pem(cert.display().to_string(), e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem(cert.display().to_string(), e.to_string()))?;
    let first = certs.into_iter().next().ok_or_else(|| {
        TlsError::Pem(
            cert.display().to_string(),
            "no certificate in the file".into(),
        )
    })?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Pem(key.display().to_string(), e.to_string()))?;
    acceptor(first, key)
}

/// One accepted TLS connection, as tonic serves it.
pub struct TlsConn(tokio_rustls::server::TlsStream<Guarded>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Option<std::net::SocketAddr>;
    fn connect_info(&self) -> Self::ConnectInfo {
        Some(self.0.get_ref().0.peer())
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Takes the guarded TCP connections of `incoming` and hands over those
/// whose handshake finished; runs until the receiver is dropped.
pub fn incoming(
    mut incoming: tokio_stream::wrappers::ReceiverStream<Result<Guarded, std::io::Error>>,
    tls: Tls,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, std::io::Error>> {
    use tokio_stream::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                c = incoming.next() => match c {
                    Some(Ok(c)) => c,
                    Some(Err(_)) => continue,
                    None => return,
                },
                _ = tx.closed() => return,
            };
            let from = tcp.peer();
            let (tx, acceptor) = (tx.clone(), tls.acceptor.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(TlsConn(s))).await;
                    }
                    Ok(Err(e)) => debug!(%from, error = %e, "tls handshake failed"),
                    Err(_) => debug!(%from, "tls handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
