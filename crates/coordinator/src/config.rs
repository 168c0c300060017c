//! The server's TOML configuration, validated once at load into typed
//! values. Unknown keys are errors; every error names its key.

use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default, rename = "match")]
    matching: RawMatch,
    #[serde(default)]
    sharers: RawSharers,
    #[serde(default)]
    tickets: RawTickets,
    #[serde(default)]
    server: RawServer,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    max_streams_per_connection: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    outdoor_radius_m: Option<f64>,
    fanout: Option<u32>,
    max_offers: Option<u32>,
    access_deadline_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSharers {
    report_interval_ms: Option<u64>,
    ping_interval_ms: Option<u64>,
    expire_after_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTickets {
    lifetime_s: Option<u64>,
    quota_bytes: Option<u64>,
}

/// Validated coordinator settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub outdoor_radius_m: f64,
    /// Access requests go to at most this many candidates (M).
    pub fanout: usize,
    /// Offers returned at most (N), unless the request asks for fewer.
    pub max_offers: usize,
    pub access_deadline: Duration,
    pub report_interval: Duration,
    pub ping_interval: Duration,
    /// A sharer silent for this long leaves the index.
    pub expire_after: Duration,
    pub ticket_lifetime: Duration,
    pub quota_bytes: u64,
    /// HTTP/2 streams one connection may hold (each sharer holds one).
    pub max_streams_per_connection: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            outdoor_radius_m: 200.0,
            fanout: 8,
            max_offers: 5,
            access_deadline: Duration::from_millis(300),
            report_interval: Duration::from_millis(2000),
            ping_interval: Duration::from_millis(1000),
            expire_after: Duration::from_millis(6000),
            ticket_lifetime: Duration::from_secs(120),
            quota_bytes: 1 << 30,
            max_streams_per_connection: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0}: {1}")]
    Read(String, std::io::Error),
    #[error("config: {0}")]
    Syntax(String),
    #[error("config key {key}: {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn check<T: PartialOrd + std::fmt::Display + Copy>(
    key: &'static str,
    v: Option<T>,
    default: T,
    lo: T,
    hi: T,
) -> Result<T, ConfigError> {
    let v = v.unwrap_or(default);
    if v < lo || v > hi {
        return Err(ConfigError::Invalid {
            key,
            problem: format!("{v} is outside {lo}..={hi}"),
        });
    }
    Ok(v)
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read(path.display().to_string(), e))?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let d = Config::default();
        let ms = |v: u64| Duration::from_millis(v);
        let cfg = Config {
            outdoor_radius_m: check(
                "match.outdoor_radius_m",
                raw.matching.outdoor_radius_m,
                d.outdoor_radius_m,
                1.0,
                10_000.0,
            )?,
            fanout: check("match.fanout", raw.matching.fanout, d.fanout as u32, 1, 64)? as usize,
            max_offers: check(
                "match.max_offers",
                raw.matching.max_offers,
                d.max_offers as u32,
                1,
                32,
            )? as usize,
            access_deadline: ms(check(
                "match.access_deadline_ms",
                raw.matching.access_deadline_ms,
                300,
                10,
                10_000,
            )?),
            report_interval: ms(check(
                "sharers.report_interval_ms",
                raw.sharers.report_interval_ms,
                2000,
                100,
                60_000,
            )?),
            ping_interval: ms(check(
                "sharers.ping_interval_ms",
                raw.sharers.ping_interval_ms,
                1000,
                50,
                60_000,
            )?),
            expire_after: ms(check(
                "sharers.expire_after_ms",
                raw.sharers.expire_after_ms,
                6000,
                200,
                600_000,
            )?),
            ticket_lifetime: Duration::from_secs(check(
                "tickets.lifetime_s",
                raw.tickets.lifetime_s,
                120,
                10,
                bandshare_core::ticket::MAX_TICKET_LIFETIME_S,
            )?),
            quota_bytes: check(
                "tickets.quota_bytes",
                raw.tickets.quota_bytes,
                d.quota_bytes,
                1,
                u64::MAX,
            )?,
            max_streams_per_connection: check(
                "server.max_streams_per_connection",
                raw.server.max_streams_per_connection,
                d.max_streams_per_connection,
                1,
                1_000_000,
            )?,
        };
        if cfg.expire_after <= cfg.ping_interval.max(cfg.report_interval) {
            return Err(ConfigError::Invalid {
                key: "sharers.expire_after_ms",
                problem: "must be longer than ping_interval_ms and report_interval_ms".into(),
            });
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors_name_the_key() {
        let c = Config::parse("").expect("empty is fine");
        assert_eq!(c.fanout, 8);
        let c = Config::parse("[match]\noutdoor_radius_m = 300\n").expect("valid");
        assert_eq!(c.outdoor_radius_m, 300.0);
        let e = Config::parse("[match]\nfanout = 0\n")
            .expect_err("invalid")
            .to_string();
        assert!(e.contains("match.fanout"), "{e}");
        let e = Config::parse("[match]\nradius = 3\n")
            .expect_err("unknown")
            .to_string();
        assert!(e.contains("radius"), "{e}");
        let e = Config::parse("[sharers]\nexpire_after_ms = 500\n")
            .expect_err("short")
            .to_string();
        assert!(e.contains("sharers.expire_after_ms"), "{e}");
    }
}
