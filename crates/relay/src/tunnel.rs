//! The requester's side of the data plane: one QUIC connection to a sharer's
//! relay, authenticated by the ticket and a proof of the requester's key,
//! carrying one bidirectional stream per proxied flow.

use crate::tls;
use crate::wire::{self, FlowHeader, Hello, WireError};
use ed25519_dalek::{Signer, SigningKey};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncReadExt;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot bind a local UDP socket: {0}")]
    Bind(std::io::Error),
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("connecting to relay {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("relay {0} timed out")]
    Timeout(SocketAddr),
    #[error("relay refused the ticket: {0}")]
    Refused(String),
    #[error("relay hello: {0}")]
    Wire(#[from] WireError),
}

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// The sharer answered with a non-zero reply code and its reason.
    #[error("sharer refused the flow ({}): {}", wire::reply::describe(*.0), .1)]
    Refused(u8, String),
    /// The tunnel itself failed: the sharer is gone or unreachable.
    #[error("tunnel lost: {0}")]
    Lost(String),
    #[error("bad flow target: {0}")]
    Target(#[from] WireError),
}

pub struct Tunnel {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
    /// The hello stream, kept as the probe channel until taken.
    probe: std::sync::Mutex<Option<(quinn::SendStream, quinn::RecvStream)>>,
    /// Further connections to the same relay that joined this one's
    /// admission ([`Tunnel::add_lanes`]); flows take turns over all.
    lanes: std::sync::Mutex<Vec<quinn::Connection>>,
    turn: std::sync::atomic::AtomicUsize,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

fn lost(e: &dyn std::fmt::Display) -> FlowError {
    FlowError::Lost(e.to_string())
}

impl Tunnel {
    pub async fn connect(
        addr: SocketAddr,
        pin: [u8; 32],
        ticket: &[u8],
        key: &SigningKey,
    ) -> Result<Tunnel, TunnelError> {
        let bind: SocketAddr = if addr.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        // Marked in whole-device mode, so it keeps the original routes.
        let socket = tls::quic_socket(bind).map_err(TunnelError::Bind)?;
        let mut endpoint = tls::endpoint(socket, None).map_err(TunnelError::Bind)?;
        endpoint.set_default_client_config(tls::client_config(pin)?);
        let attempt = async {
            let connecting = endpoint
                .connect(addr, "bandshare-relay")
                .map_err(|e| TunnelError::Connect(addr, e.to_string()))?;
            let conn = connecting
                .await
                .map_err(|e| TunnelError::Connect(addr, e.to_string()))?;
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| TunnelError::Connect(addr, e.to_string()))?;
            let proof = key.sign(&wire::hello_proof_message(ticket, &pin));
            let hello = Hello {
                ticket: ticket.to_vec(),
                requester_key: key.verifying_key().to_bytes(),
                proof: proof.to_bytes(),
            };
            send.write_all(&hello.encode())
                .await
                .map_err(|e| TunnelError::Connect(addr, e.to_string()))?;
            match wire::read_hello_reply(&mut recv).await? {
                wire::HelloReply::Accepted => Ok((conn, send, recv)),
                wire::HelloReply::Refused(reason) => Err(TunnelError::Refused(reason)),
            }
        };
        let (conn, send, recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt)
            .await
            .map_err(|_| TunnelError::Timeout(addr))??;
        Ok(Tunnel {
            conn,
            endpoint,
            probe: std::sync::Mutex::new(Some((send, recv))),
            lanes: std::sync::Mutex::default(),
            turn: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Opens `n` more connections ("lanes") to the same relay, joined to
    /// this one's admission with the token it gives (same ticket, quota
    /// and limits; they close with it). Each QUIC connection is driven by
    /// one task, so parallel bulk flows spread over lanes use more than one
    /// core on each side. Returns how many lanes the tunnel has.
    pub async fn add_lanes(&self, n: usize) -> Result<usize, TunnelError> {
        let addr = self.conn.remote_address();
        let c = |e: &dyn std::fmt::Display| TunnelError::Connect(addr, e.to_string());
        let join = async {
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| c(&e))?;
            send.write_all(&wire::LANE_REQUEST)
                .await
                .map_err(|e| c(&e))?;
            let _ = send.finish();
            let token = wire::read_lane_grant(&mut recv)
                .await?
                .map_err(TunnelError::Refused)?;
            for _ in 0..n {
                let conn = self
                    .endpoint
                    .connect(addr, "bandshare-relay")
                    .map_err(|e| c(&e))?
                    .await
                    .map_err(|e| c(&e))?;
                let (mut send, mut recv) = conn.open_bi().await.map_err(|e| c(&e))?;
                send.write_all(&wire::Opening::Lane(token).encode())
                    .await
                    .map_err(|e| c(&e))?;
                let _ = send.finish();
                match wire::read_hello_reply(&mut recv).await? {
                    wire::HelloReply::Accepted => {}
                    wire::HelloReply::Refused(reason) => return Err(TunnelError::Refused(reason)),
                }
                if let Ok(mut l) = self.lanes.lock() {
                    l.push(conn);
                }
            }
            Ok(self.lanes())
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, join)
            .await
            .map_err(|_| TunnelError::Timeout(addr))?
    }

    /// What quinn counted on each open lane.
    pub fn lane_stats(&self) -> Vec<quinn::ConnectionStats> {
        self.lanes.lock().map_or(vec![], |l| {
            l.iter()
                .filter(|c| c.close_reason().is_none())
                .map(|c| c.stats())
                .collect()
        })
    }

    /// Lanes open now (besides the first connection).
    pub fn lanes(&self) -> usize {
        self.lanes.lock().map_or(0, |mut l| {
            l.retain(|c| c.close_reason().is_none());
            l.len()
        })
    }

    /// The connection the next flow goes on: the first one and each open
    /// lane in turn.
    fn next_conn(&self) -> quinn::Connection {
        let Ok(mut lanes) = self.lanes.lock() else {
            return self.conn.clone();
        };
        lanes.retain(|c| c.close_reason().is_none());
        let turn = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % (lanes.len() + 1);
        match turn.checked_sub(1).and_then(|i| lanes.get(i)) {
            Some(lane) => lane.clone(),
            None => self.conn.clone(),
        }
    }

    /// Opens a flow to `target`. With `wait_reply` it returns once the
    /// sharer has dialled the target (the streams then carry raw bytes);
    /// without, it returns at once so the caller can send its first bytes
    /// right behind the header, saving a round trip, and must call
    /// [`Tunnel::read_reply`] before reading.
    pub async fn open_flow(
        &self,
        target: &FlowHeader,
        wait_reply: bool,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), FlowError> {
        let header = target.encode()?;
        // A lane that just failed leaves the flow to the first connection,
        // whose health the pool watches.
        let (mut send, mut recv) = match self.next_conn().open_bi().await {
            Ok(s) => s,
            Err(_) => self.conn.open_bi().await.map_err(|e| lost(&e))?,
        };
        send.write_all(&header).await.map_err(|e| lost(&e))?;
        if wait_reply {
            Tunnel::read_reply(&mut recv).await?;
        }
        Ok((send, recv))
    }

    /// Gives the connection a fresh ticket (and with it a new byte quota)
    /// without closing it.
    pub async fn renew(&self, ticket: &[u8]) -> Result<wire::HelloReply, FlowError> {
        let frame = wire::encode_renewal(ticket)?;
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| lost(&e))?;
        send.write_all(&frame).await.map_err(|e| lost(&e))?;
        let _ = send.finish();
        let answer =
            tokio::time::timeout(Duration::from_secs(5), wire::read_hello_reply(&mut recv))
                .await
                .map_err(|_| {
                    FlowError::Lost("no answer to a ticket renewal within 5 s".into())
                })??;
        Ok(answer)
    }

    /// Reads the flow's one-byte reply; `Ok` when the sharer connected.
    pub async fn read_reply(recv: &mut quinn::RecvStream) -> Result<(), FlowError> {
        let code = recv.read_u8().await.map_err(|e| lost(&e))?;
        if code != wire::reply::OK {
            let reason = tokio::time::timeout(Duration::from_secs(1), wire::read_flow_reason(recv))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
                .unwrap_or_else(|| wire::reply::describe(code).to_string());
            return Err(FlowError::Refused(code, reason));
        }
        Ok(())
    }

    /// The probe channel (once): write 8-byte frames, read their echoes.
    pub fn take_probe(&self) -> Option<(quinn::SendStream, quinn::RecvStream)> {
        self.probe.lock().ok()?.take()
    }

    /// Sends one UDP datagram through the sharer (see [`crate::datagram`]):
    /// in a DATAGRAM frame, or on a stream of its own when it does not fit
    /// one; never cut short. `Err` when the connection is gone.
    pub async fn send_udp(
        &self,
        d: &crate::datagram::Udp<'_>,
    ) -> Result<crate::udp::Sent, FlowError> {
        let bytes = d.encode()?;
        crate::udp::send_frame(&self.conn, bytes)
            .await
            .map_err(FlowError::Lost)
    }

    /// The next datagram frame from the sharer (decode it with
    /// [`crate::datagram::Udp::decode`]).
    pub async fn read_datagram(&self) -> Result<Vec<u8>, FlowError> {
        crate::udp::next_frame(&self.conn)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| lost(&e))
    }

    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// What quinn counted on the tunnel's connection: datagrams and bytes
    /// each way, packets lost, path MTU and black holes.
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }

    /// The largest UDP payload the tunnel sends now, as path MTU discovery
    /// found it (1,200 until the first probes succeed).
    pub fn mtu(&self) -> u16 {
        self.stats().path.current_mtu
    }

    pub fn remote(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Why the tunnel closed, if it has.
    pub fn close_reason(&self) -> Option<String> {
        self.conn.close_reason().map(|e| e.to_string())
    }

    /// Resolves when the tunnel closes for any reason.
    pub async fn closed(&self) -> String {
        self.conn.closed().await.to_string()
    }

    pub fn close(&self) {
        self.conn.close(0u32.into(), b"requester done");
        self.endpoint.close(0u32.into(), b"requester done");
    }
}
