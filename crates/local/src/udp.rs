//! A UDP relay on loopback between requesters and a sharer's QUIC relay,
//! which can be switched to drop everything: a link that silently stops
//! carrying packets, without network namespaces.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::UdpSocket;

pub struct UdpRelay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UdpRelay {
    /// Relays datagrams between clients and `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<UdpRelay> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let c = cut.clone();
        let task = tokio::spawn(async move {
            let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                if c.load(Ordering::Relaxed) {
                    continue;
                }
                let back = match backs.get(&from) {
                    Some(b) => b.clone(),
                    None => {
                        let Ok(b) = UdpSocket::bind("127.0.0.1:0").await else {
                            continue;
                        };
                        if b.connect(upstream).await.is_err() {
                            continue;
                        }
                        let b = Arc::new(b);
                        let (front, b2, c2) = (front.clone(), b.clone(), c.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 65_536];
                            while let Ok(n) = b2.recv(&mut buf).await {
                                if !c2.load(Ordering::Relaxed) {
                                    let _ = front.send_to(&buf[..n], from).await;
                                }
                            }
                        });
                        backs.insert(from, b.clone());
                        b
                    }
                };
                let _ = back.send(&buf[..n]).await;
            }
        });
        Ok(UdpRelay { addr, cut, task })
    }

    /// Drops every datagram from now on (or relays again).
    pub fn cut(&self, on: bool) {
        self.cut.store(on, Ordering::Relaxed);
    }
}
