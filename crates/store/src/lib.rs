//! The coordinator's durable state in one SQLite file (WAL): devices and
//! their keys, the coordinator's ticket-signing key, and the usage ledger.
//! Live state (positions, streams) never comes here.
//!
//! Synchronous on purpose: callers on an async runtime wrap calls in
//! `spawn_blocking`. Tested against real files in a temp dir.

use bandshare_core::DeviceKey;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub mod private;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored signing key is corrupt (expected 32 bytes, found {0})")]
    CorruptKey(usize),
    #[error("store lock poisoned")]
    Poisoned,
    #[error("no device key starts with {0:?} (see `bandshare admin list`)")]
    NoSuchDevice(String),
    #[error("{1} device keys start with {0:?}: give more hex digits")]
    Ambiguous(String, usize),
    #[error("{0:?} is not a device key: give hex digits (at least 8, or all 64)")]
    BadKeyText(String),
}

/// A ticket-signing seed and its key id.
pub type SigningSeed = (u8, Secret<[u8; 32]>);

/// An operator's decision about a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Approved,
    Revoked,
}

impl Decision {
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Approved => "approved",
            Decision::Revoked => "revoked",
        }
    }
}

/// One device as `bandshare admin list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRow {
    pub key: DeviceKey,
    pub name: String,
    pub role: String,
    pub first_seen: u64,
    pub last_seen: u64,
    /// `None`: never decided (pending in approval mode).
    pub decision: Option<Decision>,
}

/// A secret that never prints itself.
pub struct Secret<T>(pub T);

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Sharer,
    Requester,
}

impl Role {
    fn as_str(&self) -> &'static str {
        match self {
            Role::Sharer => "sharer",
            Role::Requester => "requester",
        }
    }
}

/// One row of the usage ledger to append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRecord {
    pub sharer: DeviceKey,
    pub requester: DeviceKey,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub flows: u32,
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    key BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS signing_keys (
    id INTEGER PRIMARY KEY,
    seed BLOB NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    sharer BLOB NOT NULL,
    requester BLOB NOT NULL,
    bytes_up INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL,
    flows INTEGER NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_by_requester ON usage(requester, at);
CREATE TABLE IF NOT EXISTS enrollment (
    key BLOB PRIMARY KEY,
    decision TEXT NOT NULL,
    changed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS names (
    folded TEXT PRIMARY KEY,
    key BLOB NOT NULL,
    bound INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage_batches (
    sharer BLOB NOT NULL,
    batch INTEGER NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (sharer, batch)
);
";

impl Store {
    /// Opens (creating) `dir/bandshare.db` in WAL mode with the schema.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let dir_err = |e| StoreError::Dir(dir.to_path_buf(), e);
        private::private_dir(dir).map_err(dir_err)?;
        let path = dir.join("bandshare.db");
        private::private_file(&path).map_err(dir_err)?;
        let conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: an acknowledged ledger row survives a crash of the process
        // and of the machine.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(f(&conn)?)
    }

    /// The current ticket-signing seed and its id, made by `fresh` on first use.
    pub fn signing_seed(
        &self,
        now_unix: u64,
        fresh: impl FnOnce() -> [u8; 32],
    ) -> Result<(u8, Secret<[u8; 32]>), StoreError> {
        let found: Option<(i64, Vec<u8>)> = self.with(|c| {
            c.query_row(
                "SELECT id, seed FROM signing_keys ORDER BY id DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })?;
        let (id, seed) = match found {
            Some(row) => row,
            None => {
                let seed = fresh().to_vec();
                self.with(|c| {
                    c.execute(
                        "INSERT INTO signing_keys (id, seed, created) VALUES (1, ?1, ?2)",
                        params![seed, now_unix as i64],
                    )
                })?;
                (1, seed)
            }
        };
        let seed: [u8; 32] = seed
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::CorruptKey(seed.len()))?;
        Ok(((id & 0xff) as u8, Secret(seed)))
    }

    /// Every ticket-signing seed, oldest first, with its id. Made on first
    /// use by `fresh` when there is none.
    pub fn signing_seeds(
        &self,
        now_unix: u64,
        fresh: impl FnOnce() -> [u8; 32],
    ) -> Result<Vec<SigningSeed>, StoreError> {
        self.signing_seed(now_unix, fresh)?;
        let rows: Vec<(i64, Vec<u8>)> = self.with(|c| {
            let mut st = c.prepare("SELECT id, seed FROM signing_keys ORDER BY id")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        rows.into_iter()
            .map(|(id, seed)| {
                let seed: [u8; 32] = seed
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::CorruptKey(seed.len()))?;
                Ok(((id & 0xff) as u8, Secret(seed)))
            })
            .collect()
    }

    /// Adds a new ticket-signing seed (a key rotation); returns its id.
    pub fn add_signing_seed(&self, seed: [u8; 32], now_unix: u64) -> Result<u8, StoreError> {
        let id = self.with(|c| {
            c.execute(
                "INSERT INTO signing_keys (id, seed, created)
                 VALUES ((SELECT COALESCE(MAX(id), 0) + 1 FROM signing_keys), ?1, ?2)",
                params![seed.to_vec(), now_unix as i64],
            )?;
            c.query_row("SELECT MAX(id) FROM signing_keys", [], |r| {
                r.get::<_, i64>(0)
            })
        })?;
        Ok((id & 0xff) as u8)
    }

    /// Records an operator's decision about `key` (known or not yet seen).
    pub fn decide(&self, key: &DeviceKey, d: Decision, now_unix: u64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO enrollment (key, decision, changed) VALUES (?1, ?2, ?3)
                 ON CONFLICT(key) DO UPDATE SET decision = excluded.decision, changed = excluded.changed",
                params![key.0.as_slice(), d.as_str(), now_unix as i64],
            )
        })?;
        Ok(())
    }

    /// (approved, revoked) device keys.
    pub fn decisions(&self) -> Result<(Vec<DeviceKey>, Vec<DeviceKey>), StoreError> {
        let rows: Vec<(Vec<u8>, String)> = self.with(|c| {
            let mut st = c.prepare("SELECT key, decision FROM enrollment")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        let (mut approved, mut revoked) = (vec![], vec![]);
        for (k, d) in rows {
            let Ok(key) = DeviceKey::from_slice(&k) else {
                continue;
            };
            match d.as_str() {
                "approved" => approved.push(key),
                "revoked" => revoked.push(key),
                _ => {}
            }
        }
        Ok((approved, revoked))
    }

    /// Every device seen or decided, most recently seen first.
    pub fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        type Raw = (
            Vec<u8>,
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<String>,
        );
        let rows: Vec<Raw> = self.with(|c| {
            let mut st = c.prepare(
                "SELECT d.key, d.name, d.role, d.first_seen, d.last_seen, e.decision
                   FROM devices d LEFT JOIN enrollment e ON e.key = d.key
                 UNION ALL
                 SELECT e.key, NULL, NULL, NULL, NULL, e.decision
                   FROM enrollment e WHERE e.key NOT IN (SELECT key FROM devices)
                 ORDER BY 5 DESC",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?;
            rows.collect()
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(k, name, role, first, last, d)| {
                Some(DeviceRow {
                    key: DeviceKey::from_slice(&k).ok()?,
                    name: name.unwrap_or_else(|| "(not seen yet)".into()),
                    role: role.unwrap_or_default(),
                    first_seen: first.unwrap_or(0) as u64,
                    last_seen: last.unwrap_or(0) as u64,
                    decision: match d.as_deref() {
                        Some("approved") => Some(Decision::Approved),
                        Some("revoked") => Some(Decision::Revoked),
                        _ => None,
                    },
                })
            })
            .collect())
    }

    /// The device whose hex key starts with `prefix` (at least 8 digits);
    /// a whole 64-digit key is accepted even if never seen.
    pub fn find_device(&self, prefix: &str) -> Result<DeviceKey, StoreError> {
        let p = prefix.trim().to_ascii_lowercase();
        if p.len() < 8 || p.len() > 64 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::BadKeyText(prefix.to_string()));
        }
        if p.len() == 64 {
            let mut k = [0u8; 32];
            for (i, byte) in k.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&p[2 * i..2 * i + 2], 16)
                    .map_err(|_| StoreError::BadKeyText(prefix.to_string()))?;
            }
            return Ok(DeviceKey(k));
        }
        let found: Vec<DeviceKey> = self
            .devices()?
            .into_iter()
            .map(|d| d.key)
            .filter(|k| k.to_string().starts_with(&p))
            .collect();
        match found.len() {
            0 => Err(StoreError::NoSuchDevice(prefix.to_string())),
            1 => Ok(found[0]),
            n => Err(StoreError::Ambiguous(prefix.to_string(), n)),
        }
    }

    pub fn upsert_device(
        &self,
        key: &DeviceKey,
        name: &str,
        role: Role,
        now_unix: u64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO devices (key, name, role, first_seen, last_seen) VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT(key) DO UPDATE SET name = excluded.name, last_seen = excluded.last_seen",
                params![key.0.as_slice(), name, role.as_str(), now_unix as i64],
            )
        })?;
        Ok(())
    }

    /// Binds a sharer name (compared case-folded, so "Alpha" is "alpha") to
    /// `key` if it is free, already `key`'s, or held by a revoked device.
    /// `Ok(Err(owner))`: another device holds it.
    pub fn bind_name(
        &self,
        name: &str,
        key: &DeviceKey,
        now_unix: u64,
    ) -> Result<Result<(), DeviceKey>, StoreError> {
        let folded = name.to_lowercase();
        let mut conn = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        let tx = conn.transaction()?;
        let owner: Option<(Vec<u8>, Option<String>)> = tx
            .query_row(
                "SELECT n.key, e.decision FROM names n LEFT JOIN enrollment e ON e.key = n.key
                 WHERE n.folded = ?1",
                params![folded],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((owner, decision)) = owner
            && owner.as_slice() != key.0.as_slice()
            && decision.as_deref() != Some("revoked")
        {
            let owner =
                DeviceKey::from_slice(&owner).map_err(|_| StoreError::CorruptKey(owner.len()))?;
            return Ok(Err(owner));
        }
        tx.execute(
            "INSERT INTO names (folded, key, bound) VALUES (?1, ?2, ?3)
             ON CONFLICT(folded) DO UPDATE SET key = excluded.key, bound = excluded.bound
             WHERE names.key != excluded.key",
            params![folded, key.0.as_slice(), now_unix as i64],
        )?;
        tx.commit()?;
        Ok(Ok(()))
    }

    pub fn device_count(&self) -> Result<u64, StoreError> {
        self.with(|c| c.query_row("SELECT COUNT(*) FROM devices", [], |r| r.get::<_, i64>(0)))
            .map(|n| n as u64)
    }

    /// Appends usage rows in one transaction; returns once they are durable.
    pub fn record_usage(&self, rows: &[UsageRecord], now_unix: u64) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        let tx = conn.transaction()?;
        insert_usage(&tx, rows, now_unix)?;
        tx.commit()?;
        Ok(())
    }

    /// Records a sharer's usage batch once: a batch id seen before from the
    /// same sharer is ignored (`Ok(false)`), so a batch re-sent because its
    /// acknowledgement was lost is not counted twice. Returns once durable.
    pub fn record_usage_batch(
        &self,
        sharer: &DeviceKey,
        batch: u64,
        rows: &[UsageRecord],
        now_unix: u64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        let tx = conn.transaction()?;
        let fresh = tx.execute(
            "INSERT OR IGNORE INTO usage_batches (sharer, batch, at) VALUES (?1, ?2, ?3)",
            params![sharer.0.as_slice(), batch as i64, now_unix as i64],
        )? == 1;
        if fresh {
            insert_usage(&tx, rows, now_unix)?;
        }
        tx.commit()?;
        Ok(fresh)
    }

    /// Number of rows in the usage ledger.
    pub fn usage_rows(&self) -> Result<u64, StoreError> {
        self.with(|c| c.query_row("SELECT COUNT(*) FROM usage", [], |r| r.get::<_, i64>(0)))
            .map(|n| n as u64)
    }

    /// Total (bytes_up, bytes_down, flows) a requester used through all sharers.
    pub fn usage_of_requester(&self, requester: &DeviceKey) -> Result<(u64, u64, u64), StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT COALESCE(SUM(bytes_up),0), COALESCE(SUM(bytes_down),0), COALESCE(SUM(flows),0)
                 FROM usage WHERE requester = ?1",
                params![requester.0.as_slice()],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64)),
            )
        })
    }
}

/// Appends ledger rows inside the caller's transaction.
fn insert_usage(
    tx: &rusqlite::Transaction<'_>,
    rows: &[UsageRecord],
    now_unix: u64,
) -> rusqlite::Result<()> {
    let mut st = tx.prepare_cached(
        "INSERT INTO usage (sharer, requester, bytes_up, bytes_down, flows, at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for r in rows {
        st.execute(params![
            r.sharer.0.as_slice(),
            r.requester.0.as_slice(),
            r.bytes_up as i64,
            r.bytes_down as i64,
            r.flows,
            now_unix as i64
        ])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persists_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (k1, s1) = {
            let st = Store::open(dir.path()).expect("open");
            st.upsert_device(&DeviceKey([1; 32]), "alice", Role::Sharer, 10)
                .expect("upsert");
            st.upsert_device(&DeviceKey([1; 32]), "alice2", Role::Sharer, 11)
                .expect("upsert");
            st.record_usage(
                &[UsageRecord {
                    sharer: DeviceKey([1; 32]),
                    requester: DeviceKey([2; 32]),
                    bytes_up: 100,
                    bytes_down: 2000,
                    flows: 3,
                }],
                12,
            )
            .expect("record");
            st.signing_seed(10, || [7; 32]).expect("seed")
        };
        let st = Store::open(dir.path()).expect("reopen");
        assert_eq!(st.device_count().expect("count"), 1);
        let row = UsageRecord {
            sharer: DeviceKey([1; 32]),
            requester: DeviceKey([2; 32]),
            bytes_up: 1,
            bytes_down: 1,
            flows: 1,
        };
        assert!(
            st.record_usage_batch(&DeviceKey([1; 32]), 77, std::slice::from_ref(&row), 13)
                .expect("batch")
        );
        assert!(
            !st.record_usage_batch(&DeviceKey([1; 32]), 77, std::slice::from_ref(&row), 14)
                .expect("again")
        );
        assert_eq!(
            st.usage_of_requester(&DeviceKey([2; 32])).expect("usage"),
            (101, 2001, 4),
            "a batch sent twice counts once"
        );
        assert!(
            st.record_usage_batch(&DeviceKey([3; 32]), 77, &[row], 14)
                .expect("other sharer")
        );

        let (k2, s2) = st.signing_seed(20, || [9; 32]).expect("seed");
        assert_eq!((k1, s1.0), (k2, s2.0), "the key is made once and kept");
        assert_eq!(format!("{s2:?}"), "***");
        // Rotation keeps the old seed; the newest signs.
        let id = st.add_signing_seed([5; 32], 30).expect("rotate");
        assert_eq!(id, 2);
        let seeds = st.signing_seeds(31, || [0; 32]).expect("seeds");
        let ids: Vec<(u8, u8)> = seeds.iter().map(|(i, s)| (*i, s.0[0])).collect();
        assert_eq!(ids, vec![(1, 7), (2, 5)]);
    }

    #[test]
    fn a_name_belongs_to_its_first_device_until_that_is_revoked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = Store::open(dir.path()).expect("open");
        let (a, b) = (DeviceKey([1; 32]), DeviceKey([2; 32]));
        assert_eq!(st.bind_name("alpha", &a, 1).expect("bind"), Ok(()));
        assert_eq!(st.bind_name("alpha", &a, 2).expect("again"), Ok(()));
        assert_eq!(st.bind_name("alpha", &b, 3).expect("clash"), Err(a));
        assert_eq!(st.bind_name("ALPHA", &b, 3).expect("case"), Err(a));
        assert_eq!(st.bind_name("beta", &b, 3).expect("other"), Ok(()));
        st.decide(&a, Decision::Revoked, 4).expect("revoke");
        assert_eq!(st.bind_name("alpha", &b, 5).expect("freed"), Ok(()));
        assert_eq!(st.bind_name("alpha", &a, 6).expect("taken"), Err(b));
        drop(st);
        let st = Store::open(dir.path()).expect("reopen");
        assert_eq!(st.bind_name("Alpha", &a, 7).expect("durable"), Err(b));
    }

    #[test]
    fn decisions_and_lookup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = Store::open(dir.path()).expect("open");
        let a = DeviceKey([0xab; 32]);
        let b = DeviceKey([0xac; 32]);
        st.upsert_device(&a, "alice", Role::Sharer, 10).expect("a");
        st.upsert_device(&b, "bob", Role::Requester, 11).expect("b");
        assert_eq!(st.find_device("abababab").expect("prefix"), a);
        assert!(matches!(
            st.find_device("abab"),
            Err(StoreError::BadKeyText(_))
        ));
        assert!(matches!(
            st.find_device("ffffffff"),
            Err(StoreError::NoSuchDevice(_))
        ));
        let c = DeviceKey([0xcd; 32]);
        assert_eq!(st.find_device(&c.to_string()).expect("whole key"), c);
        st.decide(&a, Decision::Approved, 12).expect("approve");
        st.decide(&c, Decision::Approved, 12).expect("pre-approve");
        st.decide(&a, Decision::Revoked, 13).expect("revoke");
        let (approved, revoked) = st.decisions().expect("decisions");
        assert_eq!((approved, revoked), (vec![c], vec![a]));
        let list = st.devices().expect("list");
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].name, "bob");
        assert_eq!(list[0].decision, None);
        assert!(
            list.iter()
                .any(|d| d.key == a && d.decision == Some(Decision::Revoked))
        );
        assert!(
            list.iter()
                .any(|d| d.key == c && d.name == "(not seen yet)")
        );
    }
}
