//! The coordinator's durable state in one SQLite file (WAL): devices and
//! their keys, the coordinator's ticket-signing key, the usage ledger, and
//! the QoS map's aggregates (never raw samples).
//! Live state (positions, streams) never comes here.
//!
//! Synchronous on purpose: callers on an async runtime wrap calls in
//! `spawn_blocking`. Tested against real files in a temp dir.

use bandshare_core::DeviceKey;
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

mod devices;
mod keys;
mod ledger;
mod qos;

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
    pub fn as_str(&self) -> &'static str {
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
CREATE TABLE IF NOT EXISTS qos_cells (
    cell INTEGER NOT NULL,
    hour INTEGER NOT NULL,
    weight REAL NOT NULL,
    kbps_s REAL NOT NULL,
    weak_s REAL NOT NULL,
    at REAL NOT NULL,
    tags BLOB NOT NULL,
    passes REAL NOT NULL DEFAULT 0,
    dip_passes REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (cell, hour)
);
CREATE TABLE IF NOT EXISTS qos_routes (
    came_from INTEGER NOT NULL,
    here INTEGER NOT NULL,
    next INTEGER NOT NULL,
    weight REAL NOT NULL,
    dwell_w_s REAL NOT NULL,
    at REAL NOT NULL,
    tags BLOB NOT NULL,
    PRIMARY KEY (came_from, here, next)
);
CREATE TABLE IF NOT EXISTS usage_batches (
    sharer BLOB NOT NULL,
    batch INTEGER NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (sharer, batch)
);
";

/// Brings a database made by an older build up to [`SCHEMA`]: columns
/// added since, with their defaults.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has = |table: &str, column: &str| -> rusqlite::Result<bool> {
        let mut q = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let names = q.query_map([], |r| r.get::<_, String>(1))?;
        for n in names {
            if n? == column {
                return Ok(true);
            }
        }
        Ok(false)
    };
    for column in ["passes", "dip_passes"] {
        if !has("qos_cells", column)? {
            conn.execute_batch(&format!(
                "ALTER TABLE qos_cells ADD COLUMN {column} REAL NOT NULL DEFAULT 0"
            ))?;
        }
    }
    Ok(())
}

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
        migrate(&conn)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let conn = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(f(&conn)?)
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
        let mut bound = st.name_bindings().expect("bindings");
        bound.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(bound, vec![("alpha".into(), b), ("beta".into(), b)]);
    }

    #[test]
    fn devices_seen_together_are_written_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = Store::open(dir.path()).expect("open");
        let seen: Vec<_> = (0..500u32)
            .map(|i| {
                let mut k = [0u8; 32];
                k[..4].copy_from_slice(&i.to_le_bytes());
                (DeviceKey(k), format!("s{i}"), Role::Sharer)
            })
            .collect();
        st.upsert_devices(&seen, 10).expect("first batch");
        st.upsert_devices(&seen[..10], 20).expect("seen again");
        assert_eq!(st.device_count().expect("count"), 500);
        let rows = st.devices().expect("rows");
        let first = rows.iter().find(|d| d.key == seen[0].0).expect("row");
        assert_eq!((first.first_seen, first.last_seen), (10, 20));
        let last = rows.iter().find(|d| d.key == seen[499].0).expect("row");
        assert_eq!((last.name.as_str(), last.last_seen), ("s499", 10));
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
