//! The QoS map of a scaled-out service: one map, learned from the
//! observations every coordinator accepts.
//!
//! A coordinator applies the samples it accepts (already checked, the
//! device only a keyed hash) to its own map and appends them to the
//! samples feed (`bs:{qos}:samples`, a Redis Stream trimmed to about
//! [`FEED_LEN`]); every coordinator applies the others' from the feed. The
//! aggregates — never a sample — are saved to Redis (`bs:{qos}:cells`,
//! `bs:{qos}:routes`) with the feed id they include, and a coordinator
//! starting loads them and follows the feed from that id.

use super::Cluster;
use crate::State;
use crate::qos::Accepted;
use bandshare_qos::routes::{Edge, Transition};
use bandshare_qos::{Agg, Key, Sample};
use redis::streams::StreamReadReply;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

const SAMPLES: &str = "bs:{qos}:samples";
const CELLS: &str = "bs:{qos}:cells";
const ROUTES: &str = "bs:{qos}:routes";
const SNAPSHOT: &str = "bs:{qos}:snapshot";
/// Samples the feed keeps (approximately): minutes of a city's reports.
const FEED_LEN: u64 = 200_000;
/// Fields one HSET of a save carries at most.
const SAVE_CHUNK: usize = 1000;

fn sample_bytes(a: &Accepted) -> Vec<u8> {
    let s = &a.sample;
    let mut b: Vec<u8> = [s.t, s.lat, s.lon, s.duration_s, s.down_kbps]
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .chain(s.device.to_le_bytes())
        .collect();
    if !a.route {
        b.push(0);
    }
    b
}

/// A sample as the feed carries it (48 bytes; a 49th, 0, when it teaches
/// no route), or `None`.
pub fn bytes_sample(b: &[u8]) -> Option<Accepted> {
    let route = match b.len() {
        48 => true,
        49 if b[48] == 0 => false,
        _ => return None,
    };
    let f = |i: usize| {
        b.get(i * 8..i * 8 + 8)?
            .try_into()
            .ok()
            .map(f64::from_le_bytes)
    };
    let sample = Sample {
        t: f(0)?,
        lat: f(1)?,
        lon: f(2)?,
        duration_s: f(3)?,
        down_kbps: f(4)?,
        device: u64::from_le_bytes(b.get(40..48)?.try_into().ok()?),
    };
    Some(Accepted { sample, route })
}

fn floats_tags(fs: &[f64], tags: &[u64]) -> Vec<u8> {
    fs.iter()
        .flat_map(|f| f.to_le_bytes())
        .chain(tags.iter().flat_map(|t| t.to_le_bytes()))
        .collect()
}

fn split(b: &[u8], n: usize) -> Option<(Vec<f64>, Vec<u64>)> {
    if b.len() < n * 8 || !(b.len() - n * 8).is_multiple_of(8) {
        return None;
    }
    let words: Vec<[u8; 8]> = b
        .chunks_exact(8)
        .filter_map(|c| c.try_into().ok())
        .collect();
    let (fs, ts) = words.split_at(n);
    Some((
        fs.iter().map(|w| f64::from_le_bytes(*w)).collect(),
        ts.iter().map(|w| u64::from_le_bytes(*w)).collect(),
    ))
}

fn key_field((cell, hour): &Key) -> String {
    format!("{cell}:{}", hour.map_or(-1, i32::from))
}

fn field_key(s: &str) -> Option<Key> {
    let (c, h) = s.split_once(':')?;
    let h: i32 = h.parse().ok()?;
    Some((c.parse().ok()?, u8::try_from(h).ok().filter(|h| *h < 168)))
}

fn edge_field((a, b, c): &Edge) -> String {
    format!("{a}:{b}:{c}")
}

fn field_edge(s: &str) -> Option<Edge> {
    let mut it = s.split(':').map(|p| p.parse::<u64>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

/// The last word of a cell value that also holds pass counts (two floats
/// after the tags); values written before pass counts hold tags only.
const PASSES_MARK: u64 = 0x7061_7373_6573_0002;

/// A cell aggregate as saved: floats, tags, pass counts, the mark.
fn encode_cell(a: &Agg) -> Vec<u8> {
    let trailer = [a.passes.to_bits(), a.dip_passes.to_bits(), PASSES_MARK];
    let tags: Vec<u64> = a.tags.iter().copied().chain(trailer).collect();
    floats_tags(&[a.weight, a.kbps_s, a.weak_s, a.at], &tags)
}

/// A saved cell aggregate (`CELL:HOUR` → floats and tags), or `None`.
pub fn decode_cell(field: &str, value: &[u8]) -> Option<(Key, Agg)> {
    let (fs, mut tags) = split(value, 4)?;
    let (mut passes, mut dip_passes) = (0.0, 0.0);
    if tags.last() == Some(&PASSES_MARK) {
        let at = tags.len().checked_sub(3)?;
        let counts = tags.split_off(at);
        passes = f64::from_bits(counts[0]);
        dip_passes = f64::from_bits(counts[1]);
    }
    Some((
        field_key(field)?,
        Agg {
            weight: fs[0],
            kbps_s: fs[1],
            weak_s: fs[2],
            at: fs[3],
            tags,
            passes,
            dip_passes,
        },
    ))
}

/// A saved route transition (`FROM:HERE:NEXT` → floats and tags), or `None`.
pub fn decode_route(field: &str, value: &[u8]) -> Option<(Edge, Transition)> {
    let (fs, tags) = split(value, 3)?;
    Some((
        field_edge(field)?,
        Transition {
            weight: fs[0],
            dwell_w_s: fs[1],
            at: fs[2],
            tags,
        },
    ))
}

impl Cluster {
    /// A sample this coordinator accepted, for the others.
    pub(crate) fn share_sample(&self, s: &Accepted) {
        if self.samples_tx.try_send(*s).is_err() {
            self.dropped_writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Saves the map's aggregates with the feed id they include.
    pub async fn save_qos(
        &self,
        cells: &[(Key, Agg)],
        routes: &[(Edge, Transition)],
    ) -> Result<(), super::ClusterError> {
        let mut c = self.conn();
        for chunk in cells.chunks(SAVE_CHUNK) {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(CELLS);
            for (k, a) in chunk {
                cmd.arg(key_field(k)).arg(encode_cell(a));
            }
            cmd.query_async::<()>(&mut c).await?;
        }
        for chunk in routes.chunks(SAVE_CHUNK) {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(ROUTES);
            for (e, t) in chunk {
                cmd.arg(edge_field(e))
                    .arg(floats_tags(&[t.weight, t.dwell_w_s, t.at], &t.tags));
            }
            cmd.query_async::<()>(&mut c).await?;
        }
        let id = self
            .qos_applied
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        if !id.is_empty() {
            redis::cmd("SET")
                .arg(SNAPSHOT)
                .arg(id)
                .query_async::<()>(&mut c)
                .await?;
        }
        Ok(())
    }
}

/// Appends accepted samples to the feed, a batch per round trip.
pub(crate) async fn writer(
    cluster: Arc<Cluster>,
    mut rx: mpsc::Receiver<Accepted>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(512);
    loop {
        batch.clear();
        tokio::select! {
            n = rx.recv_many(&mut batch, 512) => if n == 0 { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        let mut pipe = redis::pipe();
        for s in &batch {
            pipe.cmd("XADD")
                .arg(SAMPLES)
                .arg("MAXLEN")
                .arg("~")
                .arg(FEED_LEN)
                .arg("*")
                .arg("o")
                .arg(cluster.id())
                .arg("s")
                .arg(sample_bytes(s))
                .ignore();
        }
        let r = match tokio::time::timeout(
            super::BATCH_TIMEOUT,
            pipe.query_async::<()>(&mut cluster.conn()),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
        };
        cluster.outcome("QoS samples", &r);
    }
}

/// Loads the saved aggregates, then applies the other coordinators'
/// samples from the feed, from the id the aggregates include.
pub(crate) async fn follow(
    cluster: Arc<Cluster>,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    let mut from: Option<String> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let r = tokio::select! {
            r = read(&cluster, &state, &mut from) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        cluster.outcome("QoS feed", &r);
        if !super::pause(&mut backoff, &mut stop).await {
            return;
        }
    }
}

async fn read(
    cluster: &Cluster,
    state: &State,
    from: &mut Option<String>,
) -> redis::RedisResult<()> {
    let mut conn = cluster.blocking.get_async_connection().await?;
    if from.is_none() {
        let snapshot: Option<String> = redis::cmd("GET")
            .arg(SNAPSHOT)
            .query_async(&mut conn)
            .await?;
        let cells: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(CELLS)
            .query_async(&mut conn)
            .await?;
        let routes: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(ROUTES)
            .query_async(&mut conn)
            .await?;
        let n = (cells.len(), routes.len());
        let _ = state.qos_book(|b| {
            for (k, a) in cells.iter().filter_map(|(f, v)| decode_cell(f, v)) {
                b.map.restore(k, a);
            }
            for (e, t) in routes.iter().filter_map(|(f, v)| decode_route(f, v)) {
                b.map.restore_route(e, t);
            }
        });
        if n.0 > 0 {
            info!(cells = n.0, routes = n.1, "QoS map loaded from Redis");
        }
        *from = Some(snapshot.unwrap_or_else(|| "0-0".into()));
    }
    loop {
        let at = from.clone().unwrap_or_else(|| "0-0".into());
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1024)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(SAMPLES)
            .arg(&at)
            .query_async(&mut conn)
            .await?;
        cluster.outcome::<()>("QoS feed", &Ok(()));
        let mut others = vec![];
        let mut last = None;
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for e in key.ids {
                let origin: Option<String> = e
                    .map
                    .get("o")
                    .and_then(|v| redis::from_redis_value_ref(v).ok());
                let bytes: Option<Vec<u8>> = e
                    .map
                    .get("s")
                    .and_then(|v| redis::from_redis_value_ref(v).ok());
                if origin.as_deref() != Some(cluster.id())
                    && let Some(s) = bytes.as_deref().and_then(bytes_sample)
                {
                    others.push(s);
                }
                last = Some(e.id);
            }
        }
        if !others.is_empty()
            && let Err(e) = state.qos_book(|b| b.apply_shared(&others))
        {
            warn!(error = %e, "QoS samples from the feed not applied");
        }
        if let Some(id) = last {
            if let Ok(mut a) = cluster.qos_applied.lock() {
                a.clone_from(&id);
            }
            *from = Some(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip_and_junk_is_refused() {
        let s = Sample {
            t: 1.7e9,
            lat: 59.9,
            lon: 10.7,
            duration_s: 1.0,
            down_kbps: 250.5,
            device: 42,
        };
        for route in [true, false] {
            let a = Accepted { sample: s, route };
            assert_eq!(bytes_sample(&sample_bytes(&a)), Some(a));
        }
        assert_eq!(bytes_sample(&[0; 47]), None);
        assert_eq!(bytes_sample(&[1; 49]), None);
        assert_eq!(field_key(&key_field(&(7, Some(3)))), Some((7, Some(3))));
        assert_eq!(field_key(&key_field(&(7, None))), Some((7, None)));
        assert_eq!(field_key("x:1"), None);
        assert_eq!(field_edge(&edge_field(&(1, 2, 3))), Some((1, 2, 3)));
        assert_eq!(field_edge("1:2"), None);
        let (fs, tags) = split(&floats_tags(&[1.0, 2.0, 3.0], &[9, 10]), 3).expect("split");
        assert_eq!((fs, tags), (vec![1.0, 2.0, 3.0], vec![9, 10]));
        assert!(split(&[0; 20], 3).is_none());
        // A cell with pass counts round-trips; one saved before pass
        // counts (tags only) still reads, with none; a mark without its
        // counts is refused.
        let a = Agg {
            weight: 10.0,
            kbps_s: 500.0,
            weak_s: 2.0,
            at: 1.7e9,
            tags: vec![9, 10, 11],
            passes: 4.5,
            dip_passes: 2.25,
        };
        let field = key_field(&(7, None));
        assert_eq!(
            decode_cell(&field, &encode_cell(&a)),
            Some(((7, None), a.clone()))
        );
        let old = floats_tags(&[10.0, 500.0, 2.0, 1.7e9], &[9, 10, 11]);
        let (_, read) = decode_cell(&field, &old).expect("old value");
        assert_eq!((read.tags, read.passes), (vec![9, 10, 11], 0.0));
        let short = floats_tags(&[10.0, 500.0, 2.0, 1.7e9], &[9, PASSES_MARK]);
        assert_eq!(decode_cell(&field, &short), None);
    }
}
