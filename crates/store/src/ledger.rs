//! The usage ledger: rows appended in one transaction, batches recorded
//! once however often a sharer re-sends them, totals per requester.

use crate::{Store, StoreError, UsageRecord};
use bandshare_core::DeviceKey;
use rusqlite::params;

impl Store {
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
