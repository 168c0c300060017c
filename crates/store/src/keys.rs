//! The coordinator's ticket-signing seeds: the first made on first use,
//! more by `admin rotate-key`; the newest signs.

use crate::{Secret, SigningSeed, Store, StoreError};
use rusqlite::{OptionalExtension, params};

impl Store {
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
}
