//! Durable state of a scaled-out service, in Redis instead of each
//! coordinator's SQLite: devices and their names, operators' decisions
//! (approve, revoke), ticket-signing seeds (see [`super::Cluster::signing_seeds`])
//! and the usage ledger.
//!
//! - Devices, names and decisions share the hash tag `{dev}`: binding a
//!   name checks its owner's decision in the same script, atomically.
//! - The ledger is per sharer (`bs:{u:SHARER}:batches|usage`): a batch id
//!   is recorded once (a sorted set, ids older than 30 days trimmed) and
//!   its rows are added to totals per requester. A batch is acknowledged
//!   only after `WAIT` says a replica has it (`[server] redis_ack_replicas`,
//!   default 1), so losing a master loses no acknowledged byte: an
//!   unacknowledged batch is re-sent by the sharer and recorded once.

use super::{Cluster, ClusterError, hex};
use bandshare_core::DeviceKey;
use bandshare_store::{Decision, DeviceRow, Role, UsageRecord};
use std::collections::HashMap;

const NAME: &str = "bs:{dev}:name";
const ROLE: &str = "bs:{dev}:role";
const FIRST: &str = "bs:{dev}:first";
const LAST: &str = "bs:{dev}:last";
const NAMES: &str = "bs:{dev}:names";
const DECISIONS: &str = "bs:{dev}:decisions";

fn batches_key(sharer: &DeviceKey) -> String {
    format!("bs:{{u:{}}}:batches", hex(&sharer.0))
}
fn usage_key(sharer: &DeviceKey) -> String {
    format!("bs:{{u:{}}}:usage", hex(&sharer.0))
}

/// Binds a folded name to a key unless another, unrevoked device holds it;
/// returns the owner's key (hex) when refused, "" when bound.
const BIND_NAME: &str = r"
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if owner and owner ~= ARGV[2] and redis.call('HGET', KEYS[2], owner) ~= 'revoked' then
  return owner
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return ''
";

/// Records a usage batch once: 1 when fresh, 0 when seen before.
const RECORD_BATCH: &str = r"
if redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1]) == 0 then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[2]) - 2592000)
for i = 3, #ARGV, 4 do
  redis.call('HINCRBY', KEYS[2], ARGV[i] .. ':up', ARGV[i + 1])
  redis.call('HINCRBY', KEYS[2], ARGV[i] .. ':down', ARGV[i + 2])
  redis.call('HINCRBY', KEYS[2], ARGV[i] .. ':flows', ARGV[i + 3])
  redis.call('HINCRBY', KEYS[2], 'total:up', ARGV[i + 1])
  redis.call('HINCRBY', KEYS[2], 'total:down', ARGV[i + 2])
end
return 1
";

pub(crate) fn unhex_key(s: &str) -> Option<DeviceKey> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(DeviceKey(out))
}

impl Cluster {
    /// Records a device seen (its name and role, first and last seen).
    pub async fn upsert_device(
        &self,
        key: &DeviceKey,
        name: &str,
        role: Role,
        now_unix: u64,
    ) -> Result<(), ClusterError> {
        let k = hex(&key.0);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(NAME)
            .arg(&k)
            .arg(name)
            .ignore()
            .cmd("HSET")
            .arg(ROLE)
            .arg(&k)
            .arg(role.as_str())
            .ignore()
            .cmd("HSETNX")
            .arg(FIRST)
            .arg(&k)
            .arg(now_unix)
            .ignore()
            .cmd("HSET")
            .arg(LAST)
            .arg(&k)
            .arg(now_unix)
            .ignore();
        let r = pipe.query_async::<()>(&mut self.conn()).await;
        self.outcome("device", &r);
        Ok(r?)
    }

    /// As [`bandshare_store::Store::bind_name`], for the whole service.
    pub async fn bind_name(
        &self,
        name: &str,
        key: &DeviceKey,
    ) -> Result<Result<(), DeviceKey>, ClusterError> {
        let r: redis::RedisResult<String> = redis::Script::new(BIND_NAME)
            .key(NAMES)
            .key(DECISIONS)
            .arg(name.to_lowercase())
            .arg(hex(&key.0))
            .invoke_async(&mut self.conn())
            .await;
        self.outcome("name", &r);
        let owner = r?;
        Ok(match unhex_key(&owner) {
            Some(o) => Err(o),
            None => Ok(()),
        })
    }

    pub async fn device_count(&self) -> Result<u64, ClusterError> {
        let r = redis::cmd("HLEN")
            .arg(FIRST)
            .query_async(&mut self.conn())
            .await;
        self.outcome("devices", &r);
        Ok(r?)
    }

    /// Approved and revoked devices.
    pub async fn decisions(&self) -> Result<(Vec<DeviceKey>, Vec<DeviceKey>), ClusterError> {
        let r: redis::RedisResult<HashMap<String, String>> = redis::cmd("HGETALL")
            .arg(DECISIONS)
            .query_async(&mut self.conn())
            .await;
        self.outcome("decisions", &r);
        let (mut approved, mut revoked) = (vec![], vec![]);
        for (k, d) in r? {
            match (unhex_key(&k), d.as_str()) {
                (Some(k), "approved") => approved.push(k),
                (Some(k), "revoked") => revoked.push(k),
                _ => {}
            }
        }
        Ok((approved, revoked))
    }

    /// An operator's decision (`bandshare admin --redis … approve|revoke`).
    pub async fn decide(&self, key: &DeviceKey, d: Decision) -> Result<(), ClusterError> {
        let r = redis::cmd("HSET")
            .arg(DECISIONS)
            .arg(hex(&key.0))
            .arg(d.as_str())
            .query_async::<()>(&mut self.conn())
            .await;
        Ok(r?)
    }

    /// Every device the service has seen, with its decision.
    pub async fn devices(&self) -> Result<Vec<DeviceRow>, ClusterError> {
        let mut c = self.conn();
        let get = |key: &'static str| {
            let mut c = c.clone();
            async move {
                redis::cmd("HGETALL")
                    .arg(key)
                    .query_async::<HashMap<String, String>>(&mut c)
                    .await
            }
        };
        let (names, roles, first, last, decisions) =
            futures::try_join!(get(NAME), get(ROLE), get(FIRST), get(LAST), get(DECISIONS))?;
        let _ = &mut c;
        let mut rows: Vec<DeviceRow> = names
            .iter()
            .filter_map(|(k, name)| {
                Some(DeviceRow {
                    key: unhex_key(k)?,
                    name: name.clone(),
                    role: roles.get(k).cloned().unwrap_or_default(),
                    first_seen: first.get(k).and_then(|v| v.parse().ok()).unwrap_or(0),
                    last_seen: last.get(k).and_then(|v| v.parse().ok()).unwrap_or(0),
                    decision: match decisions.get(k).map(String::as_str) {
                        Some("approved") => Some(Decision::Approved),
                        Some("revoked") => Some(Decision::Revoked),
                        _ => None,
                    },
                })
            })
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.last_seen));
        Ok(rows)
    }

    /// A new ticket-signing seed (`bandshare admin --redis … rotate-key`);
    /// every coordinator announces it within a second.
    pub async fn add_signing_seed(&self, seed: [u8; 32]) -> Result<u8, ClusterError> {
        let have = self.read_seeds().await?;
        let next = have.last().map_or(1, |(id, _)| id.wrapping_add(1).max(1));
        let r: i64 = redis::cmd("HSETNX")
            .arg(super::SEEDS)
            .arg(next)
            .arg(&seed[..])
            .query_async(&mut self.conn())
            .await?;
        if r == 0 {
            return Err(ClusterError::CorruptSeed(format!(
                "{next} (made at the same moment elsewhere; run it again)"
            )));
        }
        Ok(next)
    }

    /// Records a sharer's usage batch once, and returns only after
    /// `replicas` replicas hold it: `Ok(fresh)`.
    pub async fn record_usage_batch(
        &self,
        sharer: &DeviceKey,
        batch: u64,
        rows: &[UsageRecord],
        now_unix: u64,
        replicas: u32,
    ) -> Result<bool, ClusterError> {
        let mut eval = redis::cmd("EVAL");
        eval.arg(RECORD_BATCH)
            .arg(2)
            .arg(batches_key(sharer))
            .arg(usage_key(sharer))
            .arg(batch)
            .arg(now_unix);
        for r in rows {
            eval.arg(hex(&r.requester.0))
                .arg(r.bytes_up)
                .arg(r.bytes_down)
                .arg(r.flows);
        }
        let mut pipe = redis::pipe();
        pipe.add_command(eval);
        if replicas > 0 {
            // On the same node as the write (a pipeline goes to one node).
            pipe.cmd("WAIT").arg(replicas).arg(1000);
        }
        let r: redis::RedisResult<Vec<i64>> = pipe.query_async(&mut self.conn()).await;
        self.outcome("usage", &r);
        let r = r?;
        let fresh = r.first().copied() == Some(1);
        if replicas > 0 && r.get(1).copied().unwrap_or(0) < i64::from(replicas) {
            return Err(ClusterError::NotReplicated(replicas));
        }
        Ok(fresh)
    }

    /// A sharer's ledger: totals per `REQUESTER:up|down|flows` and
    /// `total:up|down`.
    pub async fn usage_of_sharer(
        &self,
        sharer: &DeviceKey,
    ) -> Result<HashMap<String, u64>, ClusterError> {
        Ok(redis::cmd("HGETALL")
            .arg(usage_key(sharer))
            .query_async(&mut self.conn())
            .await?)
    }

    /// Notes (for an hour) which sharers a requester was offered, so any
    /// coordinator of the service refreshes their tickets.
    pub fn remember_offered(
        self: &std::sync::Arc<Self>,
        requester: &DeviceKey,
        sharers: &[DeviceKey],
    ) {
        if sharers.is_empty() {
            return;
        }
        let key = offered_key(requester);
        let mut pipe = redis::pipe();
        pipe.cmd("SADD").arg(&key);
        for s in sharers {
            pipe.arg(hex(&s.0));
        }
        pipe.ignore().cmd("EXPIRE").arg(&key).arg(3600).ignore();
        let me = self.clone();
        tokio::spawn(async move {
            let r = pipe.query_async::<()>(&mut me.conn()).await;
            me.outcome("offered", &r);
        });
    }

    /// The sharers a requester was offered by any coordinator (the last hour).
    pub async fn offered_to(&self, requester: &DeviceKey) -> Vec<DeviceKey> {
        let r: redis::RedisResult<Vec<String>> = redis::cmd("SMEMBERS")
            .arg(offered_key(requester))
            .query_async(&mut self.conn())
            .await;
        self.outcome("offered", &r);
        r.unwrap_or_default()
            .iter()
            .filter_map(|k| unhex_key(k))
            .collect()
    }
}

fn offered_key(requester: &DeviceKey) -> String {
    format!("bs:{{o:{}}}:offered", hex(&requester.0))
}
