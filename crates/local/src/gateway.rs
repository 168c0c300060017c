//! [`Gateway`]: a loopback stand-in for what the own link's probes reach.
//! While up it answers connects; when cut it goes silent the way a dead
//! link does — its accept queue is full, so the kernel drops new SYNs and
//! connects time out — without root, namespaces or firewall rules.

use std::net::SocketAddr;
use std::sync::Mutex;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

pub struct Gateway {
    pub addr: SocketAddr,
    listener: std::sync::Arc<TcpListener>,
    accepting: Mutex<Option<JoinHandle<()>>>,
    /// Connections that fill the accept queue while cut.
    held: Mutex<Vec<TcpStream>>,
}

impl Gateway {
    /// Listens on 127.0.0.1 (port 0) with the smallest accept queue; up.
    pub async fn start() -> anyhow::Result<Gateway> {
        let s = TcpSocket::new_v4()?;
        s.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let listener = std::sync::Arc::new(s.listen(1)?);
        let g = Gateway {
            addr: listener.local_addr()?,
            listener,
            accepting: Mutex::new(None),
            held: Mutex::new(vec![]),
        };
        g.restore();
        Ok(g)
    }

    /// Answers again: accepts (and drops) every connection, the held ones
    /// included.
    pub fn restore(&self) {
        if let Ok(mut held) = self.held.lock() {
            held.clear();
        }
        let l = self.listener.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        if let Ok(mut a) = self.accepting.lock()
            && let Some(old) = a.replace(task)
        {
            old.abort();
        }
    }

    /// Goes silent: stops accepting and fills the accept queue, so new
    /// connects hang until they time out.
    pub async fn cut(&self) -> anyhow::Result<()> {
        if let Some(t) = self.accepting.lock().ok().and_then(|mut a| a.take()) {
            t.abort();
            let _ = t.await;
        }
        // Connect until one hangs: the queue is full (a backlog of 1 holds
        // two completed connections, some may be queued already).
        let mut fill = vec![];
        for _ in 0..8 {
            match tokio::time::timeout(
                std::time::Duration::from_millis(200),
                TcpStream::connect(self.addr),
            )
            .await
            {
                Ok(Ok(s)) => fill.push(s),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    if let Ok(mut held) = self.held.lock() {
                        held.extend(fill);
                    }
                    return Ok(());
                }
            }
        }
        anyhow::bail!("the accept queue never filled")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(t) = self.accepting.lock().ok().and_then(|mut a| a.take()) {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn cut_connects_time_out_and_restore_answers() {
        let g = Gateway::start().await.expect("gateway");
        let try_once =
            || tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(g.addr));
        assert!(matches!(try_once().await, Ok(Ok(_))), "up answers");
        g.cut().await.expect("cut");
        assert!(try_once().await.is_err(), "cut: the connect hangs");
        g.restore();
        let mut answered = false;
        for _ in 0..20 {
            if matches!(try_once().await, Ok(Ok(_))) {
                answered = true;
                break;
            }
        }
        assert!(answered, "restored answers again");
    }
}
