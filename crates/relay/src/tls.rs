//! TLS for the QUIC relay: a self-signed certificate made at start, whose
//! SHA-256 travels in offers as a pin, and a client verifier that accepts
//! exactly the pinned certificate (no CA, no names). The same verifier pins
//! the coordinator's gRPC certificate (`--server-pin`).

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use std::sync::Arc;
use std::time::Duration;

pub const ALPN: &[u8] = b"bandshare/1";

/// Largest UDP payload path MTU discovery will try. quinn sends up to
/// ten datagrams in one `sendmsg` with segmentation offload (GSO), and the
/// kernel refuses a batch larger than one IP datagram (64 KiB) with
/// EMSGSIZE, which quinn-udp drops in silence: ten of these must fit, or
/// every full batch is lost and a bulk flow stalls.
pub const MTU_UPPER_BOUND: u16 = 6_500;
/// quinn-proto 0.11's largest GSO batch, in datagrams.
const GSO_BATCH: usize = 10;
// IPv4 or IPv6 with its UDP header: 65,535 bytes at most.
const _: () = assert!(MTU_UPPER_BOUND as usize * GSO_BATCH + 48 <= 65_535);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot make the relay certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("quic crypto configuration: {0}")]
    Quic(String),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    // A silent peer is declared dead after this; the pool probes faster.
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(10)) {
        t.max_idle_timeout(Some(idle));
    }
    t.max_concurrent_bidi_streams(1024u32.into());
    // Let path MTU discovery go well past Ethernet's 1500: where the path
    // allows (loopback, jumbo frames) each datagram carries more, so fewer
    // packets cost fewer syscalls and less per-packet crypto; elsewhere the
    // probes fail and the MTU stays where the path puts it.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    // Losses under congestion can look like a black hole to quinn, which
    // then drops to 1,200 bytes; probe again soon rather than after the
    // default minute.
    mtu.black_hole_cooldown(Duration::from_secs(5));
    t.mtu_discovery_config(Some(mtu));
    t.stream_receive_window((4u32 << 20).into());
    t.receive_window((16u32 << 20).into());
    t.send_window(16 << 20);
    t
}

/// A QUIC endpoint on `socket` (see [`quic_socket`]) for either end of a
/// relay connection; a relay passes its `server` config. The largest UDP
/// payload an endpoint accepts is sent to the peer as a transport
/// parameter, and the peer's path MTU discovery never probes past it:
/// quinn's default (1,472) would cap [`MTU_UPPER_BOUND`] there on every
/// path, loopback and jumbo frames included.
pub fn endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let mut c = quinn::EndpointConfig::default();
    // MTU_UPPER_BOUND is within quinn's accepted range (1200..=65527).
    let _ = c.max_udp_payload_size(MTU_UPPER_BOUND);
    quinn::Endpoint::new(c, server, socket, Arc::new(quinn::TokioRuntime))
}

/// Socket buffers asked for on a relay's UDP socket. The kernel's default
/// (about 208 KiB) drops datagrams at a few Gbit/s; the kernel caps what
/// is asked at `net.core.rmem_max`/`wmem_max`.
const UDP_BUFFER: usize = 4 << 20;

/// A UDP socket for a QUIC endpoint on `addr`: marked (see
/// [`crate::mark`]), with room for bursts.
pub fn quic_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = crate::mark::udp_bind(addr)?;
    let r = socket2::SockRef::from(&s);
    // Best effort: a smaller buffer only costs throughput.
    let _ = r.set_recv_buffer_size(UDP_BUFFER);
    let _ = r.set_send_buffer_size(UDP_BUFFER);
    Ok(s)
}

/// A fresh self-signed certificate, the server config using it, and its pin.
pub fn server_config() -> Result<(quinn::ServerConfig, [u8; 32]), TlsError> {
    let ck = rcgen::generate_simple_self_signed(vec!["bandshare-relay".to_string()])?;
    let cert = ck.cert.der().clone();
    let pin = sha256(&cert);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport()));
    Ok((cfg, pin))
}

/// A client config that trusts only the certificate whose SHA-256 is `pin`.
pub fn client_config(pin: [u8; 32]) -> Result<quinn::ClientConfig, TlsError> {
    let tls = pinned_client(
        pin,
        vec![ALPN.to_vec()],
        "relay certificate does not match the pin in the offer",
    )?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport()));
    Ok(cfg)
}

/// A TLS 1.3 client config that trusts exactly the certificate whose SHA-256
/// is `pin` (no CA, no names), offering `alpn`; `mismatch` is the error a
/// different certificate gets.
pub fn pinned_client(
    pin: [u8; 32],
    alpn: Vec<Vec<u8>>,
    mismatch: &'static str,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinVerifier {
            pin,
            provider,
            mismatch,
        }))
        .with_no_client_auth();
    tls.alpn_protocols = alpn;
    Ok(tls)
}

#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    mismatch: &'static str,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if sha256(end_entity) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(self.mismatch.into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
