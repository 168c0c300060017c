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
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Dir(dir.to_path_buf(), e))?;
        let path = dir.join("bandshare.db");
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

    pub fn device_count(&self) -> Result<u64, StoreError> {
        self.with(|c| c.query_row("SELECT COUNT(*) FROM devices", [], |r| r.get::<_, i64>(0)))
            .map(|n| n as u64)
    }

    /// Appends usage rows in one transaction; returns once they are durable.
    pub fn record_usage(&self, rows: &[UsageRecord], now_unix: u64) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        let tx = conn.transaction()?;
        {
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
        }
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
    }
}
