//! Devices: who has been seen (and as what), operators' decisions
//! (approved, revoked), key lookup by prefix, and sharer names bound to the
//! first device that used them.

use crate::{Decision, DeviceRow, Role, Store, StoreError};
use bandshare_core::DeviceKey;
use rusqlite::{OptionalExtension, params};

const UPSERT_DEVICE: &str =
    "INSERT INTO devices (key, name, role, first_seen, last_seen) VALUES (?1, ?2, ?3, ?4, ?4)
     ON CONFLICT(key) DO UPDATE SET name = excluded.name, last_seen = excluded.last_seen";

impl Store {
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

    /// Records many devices as seen at `now_unix`, in one transaction (one
    /// sync to disk however many there are).
    pub fn upsert_devices(
        &self,
        seen: &[(DeviceKey, String, Role)],
        now_unix: u64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        let tx = conn.transaction()?;
        {
            let mut st = tx.prepare_cached(UPSERT_DEVICE)?;
            for (key, name, role) in seen {
                st.execute(params![
                    key.0.as_slice(),
                    name,
                    role.as_str(),
                    now_unix as i64
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every bound name (case-folded) with its device.
    pub fn name_bindings(&self) -> Result<Vec<(String, DeviceKey)>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT folded, key FROM names")?;
            st.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })?
        .into_iter()
        .map(|(n, k)| {
            DeviceKey::from_slice(&k)
                .map(|k| (n, k))
                .map_err(|_| StoreError::CorruptKey(k.len()))
        })
        .collect()
    }

    pub fn upsert_device(
        &self,
        key: &DeviceKey,
        name: &str,
        role: Role,
        now_unix: u64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.prepare_cached(UPSERT_DEVICE)?.execute(params![
                key.0.as_slice(),
                name,
                role.as_str(),
                now_unix as i64
            ])
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
}
