//! Routed access requests: a coordinator asking a sharer whose stream is
//! on another coordinator pushes a [`v1::Routed`] request onto the owner's
//! inbox list (`bs:{c:ID}:inbox`); the owner asks the sharer down its
//! stream, under the same deadline, and pushes the answer onto the asker's
//! inbox. Each coordinator pops its inbox, oldest first and in batches
//! (BLMPOP), on a connection of its own. An inbox nobody pops (its
//! coordinator died) expires after a minute; a request past its deadline is
//! dropped unanswered.

use super::{Cluster, unix_ms};
use crate::State;
use crate::registry::Route;
use bandshare_core::DeviceKey;
use bandshare_proto::v1;
use prost::Message;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tracing::debug;

/// Messages one inbox holds at most (older ones are trimmed: a coordinator
/// that far behind has missed their deadlines anyway).
const INBOX_LEN: i64 = 10_000;

fn inbox_key(coordinator: &str) -> String {
    format!("bs:{{c:{coordinator}}}:inbox")
}

impl Cluster {
    /// Asks the sharer `key` on coordinator `owner` through Redis; `None`
    /// when no answer arrived within `deadline` (or Redis is unreachable).
    pub async fn ask(
        &self,
        owner: &str,
        key: &DeviceKey,
        request: v1::AccessRequest,
        deadline: Duration,
    ) -> Option<v1::AccessResponse> {
        let route_id = self.next_route.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.routes.lock().ok()?.insert(route_id, tx);
        let msg = v1::Routed {
            route_id,
            reply_to: self.id.to_string(),
            sharer_key: key.0.to_vec(),
            deadline_unix_ms: unix_ms() + deadline.as_millis() as u64,
            request: Some(request),
            response: None,
        };
        // The push and the answer within one deadline: an unreachable
        // Redis costs a share request no more than a silent sharer.
        let answer = tokio::time::timeout(deadline, async {
            if self.push(owner, &msg).await {
                rx.await.ok()
            } else {
                None
            }
        })
        .await
        .ok()
        .flatten();
        if let Ok(mut r) = self.routes.lock() {
            r.remove(&route_id);
        }
        answer
    }

    async fn push(&self, to: &str, msg: &v1::Routed) -> bool {
        let inbox = inbox_key(to);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("LPUSH")
            .arg(&inbox)
            .arg(msg.encode_to_vec())
            .ignore()
            .cmd("LTRIM")
            .arg(&inbox)
            .arg(0)
            .arg(INBOX_LEN - 1)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&inbox)
            .arg(60_000)
            .ignore();
        let r: redis::RedisResult<()> =
            match tokio::time::timeout(super::BATCH_TIMEOUT, pipe.query_async(&mut self.conn()))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
            };
        self.outcome("route", &r);
        r.is_ok()
    }
}

/// Pops this coordinator's inbox until `stop`: answers go to the waiting
/// share request, requests to the local sharer.
pub(crate) async fn inbox(
    cluster: Arc<Cluster>,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    let key = inbox_key(cluster.id());
    let mut backoff = Duration::from_millis(100);
    loop {
        let conn = tokio::select! {
            c = cluster.blocking.get_async_connection() => c,
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                cluster.outcome::<()>("inbox", &Err(e));
                if !super::pause(&mut backoff, &mut stop).await {
                    return;
                }
                continue;
            }
        };
        loop {
            // Oldest first (pushed on the left, popped on the right), up
            // to a batch at a time.
            let mut pop = redis::cmd("BLMPOP");
            pop.arg(1)
                .arg(1)
                .arg(&key)
                .arg("RIGHT")
                .arg("COUNT")
                .arg(POP_BATCH);
            let popped: redis::RedisResult<Option<(String, Vec<Vec<u8>>)>> = tokio::select! {
                r = pop.query_async(&mut conn) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            cluster.outcome("inbox", &popped);
            let batch = match popped {
                Ok(Some((_, b))) => b,
                Ok(None) => continue,
                Err(_) => break,
            };
            backoff = Duration::from_millis(100);
            for bytes in batch {
                deliver(&cluster, &state, &bytes);
            }
        }
        if !super::pause(&mut backoff, &mut stop).await {
            return;
        }
    }
}

/// Messages one pop takes at most.
const POP_BATCH: usize = 256;

/// An answer goes to the waiting share request, a request to the local
/// sharer (in a task of its own).
fn deliver(cluster: &Arc<Cluster>, state: &Arc<State>, bytes: &[u8]) {
    let Ok(msg) = v1::Routed::decode(bytes) else {
        debug!("malformed routed message dropped");
        return;
    };
    if let Some(resp) = msg.response {
        let waiting = cluster
            .routes
            .lock()
            .ok()
            .and_then(|mut r| r.remove(&msg.route_id));
        if let Some(tx) = waiting {
            let _ = tx.send(resp);
        }
    } else if let Some(req) = msg.request {
        tokio::spawn(serve(
            cluster.clone(),
            state.clone(),
            msg.route_id,
            msg.reply_to,
            msg.sharer_key,
            msg.deadline_unix_ms,
            req,
        ));
    }
}

/// Asks a local sharer on behalf of another coordinator and routes the
/// answer back; a sharer no longer here declines at once.
async fn serve(
    cluster: Arc<Cluster>,
    state: Arc<State>,
    route_id: u64,
    reply_to: String,
    sharer_key: Vec<u8>,
    deadline_unix_ms: u64,
    req: v1::AccessRequest,
) {
    let now = unix_ms();
    if deadline_unix_ms <= now || reply_to.is_empty() {
        return;
    }
    let left = Duration::from_millis(deadline_unix_ms - now).min(state.config().access_deadline);
    let contact = DeviceKey::from_slice(&sharer_key)
        .ok()
        .and_then(|k| state.registry().contact_of(&k));
    let response = match contact.as_ref().map(|c| (c, &c.handle.route)) {
        Some((c, Route::Local(tx))) => state.registry().ask_local(c, tx, req, left).await,
        _ => Some(v1::AccessResponse {
            request_id: 0,
            accept: false,
            reason: "not online at the coordinator it was routed to".into(),
            ..Default::default()
        }),
    };
    let Some(response) = response else { return };
    let msg = v1::Routed {
        route_id,
        reply_to: String::new(),
        sharer_key,
        deadline_unix_ms,
        request: None,
        response: Some(response),
    };
    cluster.push(&reply_to, &msg).await;
}
