//! Each pool member's background tasks: probes over its probe channel
//! (answers and silences feed failover) and the ticket kept ahead of its
//! traffic.

use super::failover::Decision;
use super::pool::{DEAD_AFTER, Member, PROBE_EVERY, Pool};
use crate::probe::PingTracker;
use bandshare_relay::wire::HelloReply;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Pings the member over its probe channel and feeds failover its answers
/// and its silences (a silently cut link, a stopped or killed process).
pub(super) async fn probe(pool: Arc<Pool>, m: Arc<Member>) {
    let Some((mut send, mut recv)) = m.tunnel.take_probe() else {
        return;
    };
    let tracker = Arc::new(std::sync::Mutex::new(PingTracker::new(DEAD_AFTER)));
    let reader = {
        let (tracker, m, pool) = (tracker.clone(), m.clone(), pool.clone());
        tokio::spawn(async move {
            let mut frame = [0u8; bandshare_relay::wire::PROBE_REPLY_LEN];
            while recv.read_exact(&mut frame).await.is_ok() {
                let now = Instant::now();
                let (seq, uplink) = bandshare_relay::wire::decode_probe_reply(&frame);
                let (rtt, loss) = {
                    let Ok(mut t) = tracker.lock() else { break };
                    t.pong(seq, now);
                    (t.rtt().unwrap_or_default(), t.loss_permille(now))
                };
                let was_down = pool.failover().health(&m.key).map(|h| h.uplink.down);
                if was_down.is_some_and(|d| d != uplink.down) {
                    info!(sharer = %m.name, down = uplink.down, "sharer's uplink changed");
                }
                let d =
                    pool.failover()
                        .probe_answer(&m.key, rtt, loss.min(1000) as u16, uplink, now);
                pool.apply(d);
            }
        })
    };
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let Ok(seq) = tracker.lock().map(|mut t| t.ping(now)) else {
            break;
        };
        let d = pool.failover().tick(&m.key, now);
        let leaving = d.iter().any(|x| matches!(x, Decision::Drop { .. }));
        pool.apply(d);
        if leaving || send.write_all(&seq.to_be_bytes()).await.is_err() {
            break;
        }
    }
    reader.abort();
}

/// Keeps a member's ticket ahead of its traffic: once half the quota is
/// spent, a spare ticket (kept fresh by the maintainer) goes to the sharer
/// over the open connection and the quota starts over, so a long transfer
/// never meets "the ticket's byte quota is used up".
pub(super) async fn keep_ticket(pool: Arc<Pool>, m: Arc<Member>) {
    let mut tick = tokio::time::interval(RENEW_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if m.tunnel.close_reason().is_some() || !pool.contains(&m.key) {
            return;
        }
        if !m.ticket_half_spent() {
            continue;
        }
        let Some(ticket) = pool.take_spare(&m.key) else {
            // The maintainer fetches one (throttled); ask again soon.
            pool.changed.notify_one();
            continue;
        };
        let quota = bandshare_core::Ticket::decode(&ticket).map_or(0, |(t, _)| t.quota_bytes);
        let at = m.bytes();
        match m.tunnel.renew(&ticket).await {
            Ok(HelloReply::Accepted) => {
                m.renewed_at_bytes.store(at, Ordering::Relaxed);
                m.ticket_quota.store(quota, Ordering::Relaxed);
                if let Ok(mut t) = m.ticket.lock() {
                    *t = ticket;
                }
                info!(sharer = %m.name, moved = at, quota, "ticket renewed on the open connection");
            }
            Ok(HelloReply::Refused(reason)) => {
                warn!(sharer = %m.name, %reason, "sharer refused the renewed ticket")
            }
            Err(e) => warn!(sharer = %m.name, error = %e, "cannot renew the ticket"),
        }
        pool.changed.notify_one();
    }
}

/// How often each member's ticket use is checked.
const RENEW_CHECK: Duration = Duration::from_millis(250);
