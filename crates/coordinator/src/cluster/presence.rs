//! Presence: each coordinator writes the sharers whose streams it holds into
//! their geographic shard and reads every shard's change feed into its own
//! index.
//!
//! A shard is the H3 cell (resolution 2, about 160 km across) of the point
//! a sharer is shown at; its keys share the hash tag `{p:CELL}`, so one
//! MULTI writes the presence hash, the expiry set and the feed together.
//! The feed (a Redis Stream, trimmed to about [`FEED_LEN`] entries) carries
//! `up` (the whole presence) and `down`. A reader starts from a snapshot
//! (the hash) and then follows the stream; every entry carries the owner's
//! write clock, so a replayed or reordered entry never wins over a newer one.
//! The janitor takes out what no owner refreshed (a coordinator killed
//! with its sharers) and says so on the feed.

use super::durable::unhex_key;
use super::{Cluster, Write, hex, next_seq, unix_ms};
use crate::State;
use crate::evidence;
use crate::registry::{Contact, Handle, Route};
use bandshare_core::DeviceKey;
use bandshare_matcher::SharerInfo;
use bandshare_proto::convert as cv;
use bandshare_proto::v1;
use prost::Message;
use redis::streams::StreamReadReply;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Entries a shard's feed keeps (approximately; older ones are trimmed).
const FEED_LEN: u64 = 100_000;
const SHARDS: &str = "bs:shards";

fn presence_key(shard: &str) -> String {
    format!("bs:{{p:{shard}}}:presence")
}
fn expiry_key(shard: &str) -> String {
    format!("bs:{{p:{shard}}}:expiry")
}
fn feed_key(shard: &str) -> String {
    format!("bs:{{p:{shard}}}:feed")
}

impl Cluster {
    /// The shard of a point.
    pub fn shard_of(&self, p: &bandshare_core::Position) -> String {
        h3o::LatLng::new(p.lat, p.lon)
            .map(|ll| ll.to_cell(self.shard_res).to_string())
            .unwrap_or_else(|_| "none".into())
    }

    /// The local sharer `key` changed (online, a report): write it.
    pub fn changed(&self, state: &State, key: &DeviceKey) {
        let Some(c) = state.registry().contact_of(key) else {
            return;
        };
        if !matches!(c.handle.route, Route::Local(_)) {
            return;
        }
        let seq = next_seq();
        let expires = unix_ms() + state.config().expire_after.as_millis() as u64;
        let shard = self.shard_of(&c.info.position);
        let presence = encode(&self.id, &c, seq, expires);
        if let Ok(mut w) = self.written.lock() {
            w.insert(*key, (shard.clone(), Instant::now(), seq));
        }
        self.queue(Write::Up {
            presence: Box::new(presence),
            shard,
        });
    }

    /// The local sharer `key` is alive (a ping): write it again when a
    /// third of the expiry has passed since the last write.
    pub fn refresh(&self, state: &State, key: &DeviceKey) {
        let due = self.written.lock().is_ok_and(|w| {
            w.get(key)
                .is_none_or(|(_, at, _)| at.elapsed() >= state.config().expire_after / 3)
        });
        if due {
            self.changed(state, key);
        }
    }

    /// The local sharer `key` went offline.
    pub fn gone(&self, key: &DeviceKey) {
        let seq = next_seq();
        if self
            .written
            .lock()
            .is_ok_and(|mut w| w.remove(key).is_some())
        {
            self.queue(Write::Down { key: *key, seq });
        }
    }
}

/// What the owner writes about one of its sharers.
pub fn encode(owner: &str, c: &Contact, seq: u64, expires_unix_ms: u64) -> v1::Presence {
    let i = &c.info;
    v1::Presence {
        key: c.handle.key.0.to_vec(),
        owner: owner.to_string(),
        seq,
        expires_unix_ms,
        name: i.name.to_string(),
        shown: Some(cv::fix_to_wire(&i.position)),
        location: Some(v1::Location {
            gnss: Some(cv::fix_to_wire(&i.exact)),
            wifi: i
                .fingerprint
                .observations()
                .iter()
                .map(|(b, r)| v1::WifiObservation {
                    bssid: bandshare_core::radio::format_bssid(*b),
                    rssi_dbm: i32::from(*r),
                })
                .collect(),
            anchor: Some(v1::Anchor {
                cell_id: i.cell.as_deref().unwrap_or_default().to_string(),
                router_id: i.router.as_deref().unwrap_or_default().to_string(),
            }),
            scene_hint: 0,
            heading_deg: i.heading_deg,
            speed_mps: i.speed_mps,
        }),
        services: cv::services_to_wire(i.services),
        network: cv::network_to_wire(i.network),
        security: cv::security_to_wire(i.security),
        link: Some(cv::link_to_wire(&i.link)),
        accepting: i.accepting,
        active_requesters: i.active_requesters,
        max_requesters: i.max_requesters,
        relay_endpoints: c.handle.relay_endpoints.clone(),
        relay_cert_sha256: c.handle.relay_cert_sha256.clone(),
    }
}

/// A presence read from Redis, checked as a hello would be.
pub fn decode(p: &v1::Presence) -> Result<(SharerInfo, Handle), String> {
    let key = DeviceKey::from_slice(&p.key).map_err(|e| e.to_string())?;
    let ev =
        evidence::evidence(&p.location.clone().unwrap_or_default()).map_err(|e| e.to_string())?;
    let exact = ev.fix.ok_or("presence without a fix")?;
    let shown = p
        .shown
        .as_ref()
        .map(cv::fix_from_wire)
        .transpose()
        .map_err(|e| e.to_string())?
        .unwrap_or(exact);
    bandshare_core::name::check_name(&p.name).map_err(|e| e.to_string())?;
    if p.relay_endpoints.is_empty() || p.relay_cert_sha256.len() != 32 || p.owner.is_empty() {
        return Err("presence without relay endpoint, pin or owner".into());
    }
    let mut link = p.link.as_ref().map(cv::link_from_wire).unwrap_or_default();
    link.network = cv::network_from_wire(p.network);
    let info = SharerInfo {
        name: p.name.as_str().into(),
        position: shown,
        exact,
        heading_deg: ev.heading_deg,
        speed_mps: ev.speed_mps,
        services: cv::services_from_wire(&p.services),
        network: cv::network_from_wire(p.network),
        security: cv::security_from_wire(p.security),
        link,
        accepting: p.accepting,
        active_requesters: p.active_requesters,
        max_requesters: p.max_requesters,
        fingerprint: ev.wifi,
        cell: ev.cell,
        router: ev.router,
    };
    let handle = Handle {
        key,
        relay_endpoints: p.relay_endpoints.clone(),
        relay_cert_sha256: p.relay_cert_sha256.clone(),
        route: Route::Remote {
            owner: p.owner.as_str().into(),
            seq: p.seq,
        },
        generation: 0,
        last_seen: Instant::now(),
        mac_key: Default::default(),
    };
    Ok((info, handle))
}

/// Writes presence in queue order, a batch at a time: each write is one
/// MULTI in its shard's slot; the batch is pipelined on the connections.
pub(crate) async fn writer(
    cluster: Arc<Cluster>,
    mut rx: mpsc::Receiver<Write>,
    mut stop: watch::Receiver<bool>,
) {
    let mut shards: HashSet<String> = HashSet::new();
    let mut last_shard: HashMap<DeviceKey, String> = HashMap::new();
    let mut batch = Vec::with_capacity(super::WRITE_BATCH);
    loop {
        batch.clear();
        tokio::select! {
            n = rx.recv_many(&mut batch, super::WRITE_BATCH) => if n == 0 { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        let mut pipes = vec![];
        for w in batch.drain(..) {
            let mut pipe = redis::pipe();
            pipe.atomic();
            match w {
                Write::Up { presence, shard } => {
                    let k = hex(&presence.key);
                    let key = DeviceKey::from_slice(&presence.key).ok();
                    // Moved to another shard: out of the old one first.
                    if let Some(old) = key
                        .and_then(|k| last_shard.get(&k))
                        .filter(|o| **o != shard)
                    {
                        let mut p = redis::pipe();
                        p.atomic();
                        down(&mut p, old, &k, presence.seq);
                        pipes.push(p);
                    }
                    if shards.insert(shard.clone()) {
                        let mut p = redis::pipe();
                        p.cmd("SADD").arg(SHARDS).arg(&shard).ignore();
                        pipes.push(p);
                    }
                    let bytes = presence.encode_to_vec();
                    pipe.cmd("HSET")
                        .arg(presence_key(&shard))
                        .arg(&k)
                        .arg(&bytes)
                        .ignore();
                    pipe.cmd("ZADD")
                        .arg(expiry_key(&shard))
                        .arg(presence.expires_unix_ms)
                        .arg(&k)
                        .ignore();
                    pipe.cmd("XADD")
                        .arg(feed_key(&shard))
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(FEED_LEN)
                        .arg("*")
                        .arg("op")
                        .arg("up")
                        .arg("k")
                        .arg(&k)
                        .arg("seq")
                        .arg(presence.seq)
                        .arg("p")
                        .arg(bytes)
                        .ignore();
                    if let Some(key) = key {
                        last_shard.insert(key, shard);
                    }
                }
                Write::Down { key, seq } => {
                    let Some(shard) = last_shard.remove(&key) else {
                        continue;
                    };
                    down(&mut pipe, &shard, &hex(&key.0), seq);
                }
            }
            pipes.push(pipe);
        }
        let conn = cluster.conn();
        let n = pipes.len();
        // Bounded, whatever the client does: a batch that never completes
        // is a failed one, and the writer goes on.
        let sent = tokio::time::timeout(
            super::BATCH_TIMEOUT,
            futures::future::join_all(pipes.iter().map(|p| {
                let mut c = conn.clone();
                async move { p.query_async::<()>(&mut c).await }
            })),
        )
        .await
        .unwrap_or_else(|_| {
            (0..n)
                .map(|_| {
                    Err(redis::RedisError::from(std::io::Error::from(
                        std::io::ErrorKind::TimedOut,
                    )))
                })
                .collect()
        });
        let ok = sent.iter().filter(|r| r.is_ok()).count() as u64;
        cluster
            .written_total
            .fetch_add(ok, std::sync::atomic::Ordering::Relaxed);
        match sent.into_iter().find(|r| r.is_err()) {
            Some(e) => {
                // Redis may have lost the shard list: name them again.
                shards.clear();
                cluster.outcome("presence write", &e)
            }
            None => cluster.outcome::<()>("presence write", &Ok(())),
        }
    }
}

fn down(pipe: &mut redis::Pipeline, shard: &str, k: &str, seq: u64) {
    pipe.cmd("HDEL").arg(presence_key(shard)).arg(k).ignore();
    pipe.cmd("ZREM").arg(expiry_key(shard)).arg(k).ignore();
    pipe.cmd("XADD")
        .arg(feed_key(shard))
        .arg("MAXLEN")
        .arg("~")
        .arg(FEED_LEN)
        .arg("*")
        .arg("op")
        .arg("down")
        .arg("k")
        .arg(k)
        .arg("seq")
        .arg(seq)
        .ignore();
}

/// Follows every shard: looks for new ones every second and starts a
/// reader for each.
pub(crate) async fn follow_shards(
    cluster: Arc<Cluster>,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    let mut following: HashSet<String> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let mut c = cluster.conn();
        let r: redis::RedisResult<Vec<String>> =
            redis::cmd("SMEMBERS").arg(SHARDS).query_async(&mut c).await;
        cluster.outcome("shard list", &r);
        for shard in r.unwrap_or_default() {
            if following.insert(shard.clone()) {
                debug!(%shard, "following presence shard");
                tokio::spawn(follow_shard(
                    cluster.clone(),
                    state.clone(),
                    shard,
                    stop.clone(),
                ));
            }
        }
    }
}

/// One shard: snapshot, then the feed from where the snapshot began; on a
/// Redis error, the same again after a pause.
async fn follow_shard(
    cluster: Arc<Cluster>,
    state: Arc<State>,
    shard: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let r = tokio::select! {
            r = read_shard(&cluster, &state, &shard) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        cluster.outcome("presence feed", &r);
        if !super::pause(&mut backoff, &mut stop).await {
            return;
        }
    }
}

async fn read_shard(cluster: &Cluster, state: &State, shard: &str) -> redis::RedisResult<()> {
    let mut conn = cluster.blocking.get_async_connection().await?;
    let feed = feed_key(shard);
    // Where the snapshot begins: entries after it are read again (the
    // write clock makes that harmless), none before it is missed.
    let last: Vec<(String, HashMap<String, redis::Value>)> = redis::cmd("XREVRANGE")
        .arg(&feed)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await?;
    let mut from = last.first().map_or("0-0".to_string(), |(id, _)| id.clone());
    let all: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
        .arg(presence_key(shard))
        .query_async(&mut conn)
        .await?;
    let now_ms = unix_ms();
    let mut loaded = 0;
    for bytes in all.values() {
        if let Ok(p) = v1::Presence::decode(bytes.as_slice())
            && p.expires_unix_ms > now_ms
            && apply_up(cluster, state, &p)
        {
            loaded += 1;
        }
    }
    if loaded > 0 {
        info!(%shard, sharers = loaded, "presence loaded from Redis");
    }
    cluster.outcome::<()>("presence snapshot", &Ok(()));
    loop {
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1024)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(&feed)
            .arg(&from)
            .query_async(&mut conn)
            .await?;
        cluster.outcome::<()>("presence feed", &Ok(()));
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for e in key.ids {
                apply_entry(cluster, state, &e.map);
                from = e.id;
            }
        }
    }
}

fn field<T: redis::FromRedisValue>(m: &HashMap<String, redis::Value>, f: &str) -> Option<T> {
    redis::from_redis_value_ref(m.get(f)?).ok()
}

fn apply_entry(cluster: &Cluster, state: &State, m: &HashMap<String, redis::Value>) {
    match field::<String>(m, "op").as_deref() {
        Some("up") => {
            if let Some(p) =
                field::<Vec<u8>>(m, "p").and_then(|b| v1::Presence::decode(b.as_slice()).ok())
            {
                apply_up(cluster, state, &p);
            }
        }
        Some("down") => {
            let key = field::<String>(m, "k").and_then(|k| unhex_key(&k));
            let seq = field::<u64>(m, "seq").unwrap_or(0);
            if let Some(key) = key
                && let Some(name) = state.registry().remove_remote(&key, seq)
            {
                debug!(sharer = %name, "remote sharer offline");
            }
        }
        _ => {}
    }
}

/// Puts a presence from another coordinator into the index.
fn apply_up(cluster: &Cluster, state: &State, p: &v1::Presence) -> bool {
    if p.owner == cluster.id() {
        return false;
    }
    match decode(p) {
        Ok((info, handle)) => {
            cluster
                .applied
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            state.registry().upsert_remote(info, handle, Instant::now())
        }
        Err(e) => {
            warn!(error = %e, "presence from Redis refused");
            false
        }
    }
}

/// Takes out of every shard what its owner stopped refreshing (a
/// coordinator that died with its sharers), atomically per shard, and
/// says so on the shard's feed.
const JANITOR: &str = r"
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 512)
for _, k in ipairs(dead) do
  redis.call('ZREM', KEYS[2], k)
  redis.call('HDEL', KEYS[1], k)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'op', 'down', 'k', k, 'seq', 0)
end
return #dead
";

pub(crate) async fn janitor(cluster: Arc<Cluster>, mut stop: watch::Receiver<bool>) {
    let script = redis::Script::new(JANITOR);
    // Spread the coordinators' sweeps over the period.
    let mut tick = tokio::time::interval(Duration::from_millis(1000 + fastrand::u64(0..1000)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let mut c = cluster.conn();
        let shards: Vec<String> = match redis::cmd("SMEMBERS").arg(SHARDS).query_async(&mut c).await
        {
            Ok(s) => s,
            Err(_) => continue,
        };
        // A grace second past the expiry: an owner's refresh in flight wins.
        let cutoff = unix_ms().saturating_sub(1000);
        for shard in shards {
            let r: redis::RedisResult<u64> = script
                .key(presence_key(&shard))
                .key(expiry_key(&shard))
                .key(feed_key(&shard))
                .arg(cutoff)
                .arg(FEED_LEN)
                .invoke_async(&mut c)
                .await;
            if let Ok(n) = r
                && n > 0
            {
                info!(%shard, sharers = n, "expired presence removed (its coordinator stopped refreshing it)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_junk_is_refused() {
        let k = DeviceKey([7u8; 32]);
        assert_eq!(unhex_key(&hex(&k.0)), Some(k));
        assert_eq!(unhex_key("zz"), None);
        assert_eq!(unhex_key(&"g".repeat(64)), None);
        let bad = v1::Presence::default();
        assert!(decode(&bad).is_err());
    }
}
