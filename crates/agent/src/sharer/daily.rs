//! Today's relayed bytes, kept in the sharer's data directory so the daily
//! cap holds across restarts.

use std::path::Path;
use tracing::debug;

const DAILY_FILE: &str = "relayed-today";

/// Bytes relayed today as kept in `dir` ("DAY BYTES"); 0 for another day.
pub(super) fn load_daily_used(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join(DAILY_FILE)).unwrap_or_default();
    let mut parts = text.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(day)), Some(Ok(bytes))) if day == bandshare_relay::limits::today() => bytes,
        _ => 0,
    }
}

/// Keeps today's relayed bytes (written whole, then renamed into place).
pub(super) fn store_daily_used(dir: &Path, bytes: u64) {
    let tmp = dir.join(format!("{DAILY_FILE}.tmp"));
    let text = format!("{} {bytes}\n", bandshare_relay::limits::today());
    if std::fs::create_dir_all(dir).is_ok()
        && std::fs::write(&tmp, text).is_ok()
        && let Err(e) = std::fs::rename(&tmp, dir.join(DAILY_FILE))
    {
        debug!(error = %e, "cannot keep today's relayed bytes");
    }
}
