//! The one reading of the wall clock the crates share, for the async
//! shells: pure code in this crate and in `matcher` never calls it, it takes
//! `now` (tickets, requests and allowances compare Unix seconds).

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
