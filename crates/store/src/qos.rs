//! The QoS map's aggregates: cells (H3 cell × hour of week) and learned
//! route transitions, each with at most k cell-keyed device tags. No raw
//! sample and no device id is ever written here.

use crate::{Store, StoreError};
use bandshare_qos::routes::{Edge, Transition};
use bandshare_qos::{Agg, Key, Map};
use rusqlite::params;

fn tags_blob(tags: &[u64]) -> Vec<u8> {
    tags.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn blob_tags(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
        .collect()
}

/// Hour of week stored as -1 for "any hour".
fn hour_col(h: Option<u8>) -> i64 {
    h.map_or(-1, i64::from)
}

impl Store {
    /// Writes (replacing) these aggregates in one transaction.
    pub fn save_qos(
        &self,
        cells: &[(Key, Agg)],
        routes: &[(Edge, Transition)],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        let tx = conn.transaction()?;
        {
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO qos_cells (cell, hour, weight, kbps_s, weak_s, at, tags, passes, dip_passes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for ((cell, hour), a) in cells {
                put.execute(params![
                    *cell as i64,
                    hour_col(*hour),
                    a.weight,
                    a.kbps_s,
                    a.weak_s,
                    a.at,
                    tags_blob(&a.tags),
                    a.passes,
                    a.dip_passes
                ])?;
            }
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO qos_routes (came_from, here, next, weight, dwell_w_s, at, tags)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for ((from, here, next), t) in routes {
                put.execute(params![
                    *from as i64,
                    *here as i64,
                    *next as i64,
                    t.weight,
                    t.dwell_w_s,
                    t.at,
                    tags_blob(&t.tags)
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Fills `map` with every stored aggregate; returns (cells, routes).
    pub fn load_qos(&self, map: &mut Map) -> Result<(usize, usize), StoreError> {
        self.with(|c| {
            let mut q = c.prepare(
                "SELECT cell, hour, weight, kbps_s, weak_s, at, tags, passes, dip_passes FROM qos_cells",
            )?;
            let cells = q
                .query_map([], |r| {
                    let hour: i64 = r.get(1)?;
                    Ok((
                        (
                            r.get::<_, i64>(0)? as u64,
                            u8::try_from(hour).ok().filter(|h| *h < 168),
                        ),
                        Agg {
                            weight: r.get(2)?,
                            kbps_s: r.get(3)?,
                            weak_s: r.get(4)?,
                            at: r.get(5)?,
                            tags: blob_tags(&r.get::<_, Vec<u8>>(6)?),
                            passes: r.get(7)?,
                            dip_passes: r.get(8)?,
                        },
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut q = c.prepare(
                "SELECT came_from, here, next, weight, dwell_w_s, at, tags FROM qos_routes",
            )?;
            let routes = q
                .query_map([], |r| {
                    Ok((
                        (
                            r.get::<_, i64>(0)? as u64,
                            r.get::<_, i64>(1)? as u64,
                            r.get::<_, i64>(2)? as u64,
                        ),
                        Transition {
                            weight: r.get(3)?,
                            dwell_w_s: r.get(4)?,
                            at: r.get(5)?,
                            tags: blob_tags(&r.get::<_, Vec<u8>>(6)?),
                        },
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let n = (cells.len(), routes.len());
            for (k, a) in cells {
                map.restore(k, a);
            }
            for (e, t) in routes {
                map.restore_route(e, t);
            }
            Ok(n)
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::Store;
    use bandshare_qos::{Config, Map, Sample};

    #[test]
    fn the_map_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = Map::new(Config::default()).expect("map");
        for d in 1..=3u64 {
            let mut trail = None;
            for i in 0..40 {
                m.observe(
                    &Sample {
                        t: 1e9 + (d * 100 + i) as f64,
                        lat: 59.9,
                        lon: 10.7 + i as f64 * 0.0005,
                        duration_s: 1.0,
                        down_kbps: 100.0 * i as f64,
                        device: d,
                    },
                    &mut trail,
                )
                .expect("observe");
            }
        }
        let cells: Vec<_> = m.cells().map(|(k, a)| (*k, a.clone())).collect();
        let routes: Vec<_> = m.routes().iter().map(|(e, t)| (*e, t.clone())).collect();
        assert!(!routes.is_empty());
        {
            let s = Store::open(dir.path()).expect("open");
            s.save_qos(&cells, &routes).expect("save");
            s.save_qos(&cells, &routes).expect("saving again replaces");
        }
        let s = Store::open(dir.path()).expect("reopen");
        let mut back = Map::new(Config::default()).expect("map");
        let n = s.load_qos(&mut back).expect("load");
        assert_eq!(n, (cells.len(), routes.len()));
        assert_eq!(back.published(), m.published());
        assert!(!back.published().is_empty());
        assert_eq!(back.newest(), m.newest());
        // Every aggregate as it was, its pass counts (passes, passes with a dip) included.
        let saved: std::collections::HashMap<_, _> = cells.into_iter().collect();
        let loaded: std::collections::HashMap<_, _> =
            back.cells().map(|(k, a)| (*k, a.clone())).collect();
        assert_eq!(loaded, saved);
        assert!(loaded.values().any(|a| a.dip_passes > 2.9));
    }

    /// A database written before cells counted passes opens, gains the
    /// columns, and keeps its cells (with no passes counted yet).
    #[test]
    fn a_database_from_before_pass_counts_is_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let c = rusqlite::Connection::open(dir.path().join("bandshare.db")).expect("db");
            c.execute_batch(
                "CREATE TABLE qos_cells (cell INTEGER NOT NULL, hour INTEGER NOT NULL,
                 weight REAL NOT NULL, kbps_s REAL NOT NULL, weak_s REAL NOT NULL,
                 at REAL NOT NULL, tags BLOB NOT NULL, PRIMARY KEY (cell, hour));
                 INSERT INTO qos_cells VALUES (622236750694711295, -1, 10.0, 5000.0, 1.0, 1e9, x'0100000000000000');",
            )
            .expect("old schema");
        }
        let s = Store::open(dir.path()).expect("open migrates");
        let mut m = Map::new(Config::default()).expect("map");
        assert_eq!(s.load_qos(&mut m).expect("load"), (1, 0));
        let (_, a) = m.cells().next().expect("the old cell");
        assert_eq!(
            (a.tags.clone(), a.passes, a.dip_passes),
            (vec![1], 0.0, 0.0)
        );
        s.save_qos(&[((622236750694711295, None), a.clone())], &[])
            .expect("saves with the new column");
        drop(s);
        Store::open(dir.path()).expect("opens again, already migrated");
    }
}
