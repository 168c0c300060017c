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
    #[serde(default)]
    scenes: RawScenes,
    #[serde(default)]
    privacy: RawPrivacy,
    #[serde(default)]
    qos: RawQos,
    #[serde(default)]
    http: RawHttp,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQos {
    resolution: Option<u8>,
    k: Option<u32>,
    half_life_days: Option<f64>,
    weak_kbps: Option<f64>,
    dip_share: Option<f64>,
    samples_per_minute: Option<f64>,
    max_speed_mps: Option<f64>,
}

/// The QoS map's settings (see `bandshare_qos::Config`) and the limits on
/// observations.
#[derive(Clone, Debug)]
pub struct QosConfig {
    pub map: bandshare_qos::Config,
    /// Samples one device may report per minute (a burst of a minute's worth).
    pub samples_per_minute: f64,
    /// Faster than this between two of a device's samples is implausible.
    pub max_speed_mps: f64,
}

impl Default for QosConfig {
    fn default() -> Self {
        QosConfig {
            map: bandshare_qos::Config::default(),
            samples_per_minute: 6000.0,
            max_speed_mps: 300.0,
        }
    }
}

fn qos(raw: &RawQos) -> Result<QosConfig, ConfigError> {
    let d = QosConfig::default();
    Ok(QosConfig {
        map: bandshare_qos::Config {
            resolution: check("qos.resolution", raw.resolution, d.map.resolution, 0, 15)?,
            k: check("qos.k", raw.k, d.map.k as u32, 1, 1000)? as usize,
            half_life_s: check(
                "qos.half_life_days",
                raw.half_life_days,
                d.map.half_life_s / 86_400.0,
                0.01,
                36_500.0,
            )? * 86_400.0,
            weak_kbps: check("qos.weak_kbps", raw.weak_kbps, d.map.weak_kbps, 1.0, 1e7)?,
            dip_share: check("qos.dip_share", raw.dip_share, d.map.dip_share, 0.05, 1.0)?,
            ..d.map
        },
        samples_per_minute: check(
            "qos.samples_per_minute",
            raw.samples_per_minute,
            d.samples_per_minute,
            1.0,
            1e9,
        )?,
        max_speed_mps: check(
            "qos.max_speed_mps",
            raw.max_speed_mps,
            d.max_speed_mps,
            1.0,
            1e6,
        )?,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivacy {
    requests_per_minute: Option<f64>,
    burst: Option<f64>,
    max_speed_mps: Option<f64>,
    slack_m: Option<f64>,
    fuzz_min_m: Option<f64>,
    fuzz_max_m: Option<f64>,
    period_days: Option<f64>,
    move_m: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenes {
    good_accuracy_m: Option<f64>,
    #[serde(default)]
    outdoor: RawRadius,
    #[serde(default)]
    vehicle: RawVehicle,
    #[serde(default)]
    station: RawRadius,
    #[serde(default)]
    indoor: RawIndoor,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRadius {
    radius_m: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVehicle {
    length_m: Option<f64>,
    width_m: Option<f64>,
    height_m: Option<f64>,
    max_speed_diff_mps: Option<f64>,
    min_speed_mps: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIndoor {
    similarity_threshold: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    max_streams_per_connection: Option<u32>,
    max_inflight_requests: Option<u32>,
    max_joining: Option<u32>,
    join_queue: Option<u32>,
    max_connections_per_source: Option<u32>,
    enroll: Option<String>,
    redis: Option<Vec<String>>,
    redis_ack_replicas: Option<u32>,
}

/// Who may use the coordinator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Enroll {
    /// Any device, trusted on first use (the demo's default).
    #[default]
    Open,
    /// Only devices an operator approved (`bandshare admin approve`).
    Approve,
}

impl std::str::FromStr for Enroll {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "open" => Ok(Enroll::Open),
            "approve" => Ok(Enroll::Approve),
            other => Err(format!(
                "unknown enrollment mode {other:?} (expected open or approve)"
            )),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
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
    /// Shapes of the regions per scene.
    pub region: bandshare_matcher::RegionConfig,
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
    /// Share and ticket requests handled at once; more are refused with
    /// RESOURCE_EXHAUSTED at once instead of queueing.
    pub max_inflight_requests: u32,
    /// Sharers being admitted at once (hello to welcome); the next ones
    /// wait their turn, in order.
    pub max_joining: u32,
    /// Sharers waiting their turn at most; one more is refused with
    /// UNAVAILABLE and retries with backoff, so a restart storm queues
    /// and sheds instead of thrashing.
    pub join_queue: u32,
    /// TCP connections one address may hold on each listener (sharers
    /// behind one NAT each hold one).
    pub max_connections_per_source: u32,
    /// Enrollment: open (trust on first use) or approve.
    pub enroll: Enroll,
    /// Rate limits and plausibility per requester; the offsets sharers are
    /// shown at.
    pub privacy: crate::privacy::PrivacyConfig,
    /// The QoS map.
    pub qos: QosConfig,
    /// Bearer token the HTTP side (dashboard, `/status`, `/metrics`)
    /// requires; needed to serve it on anything but loopback.
    pub http_token: Option<String>,
    /// Scale-out: the Redis Cluster nodes (`redis://HOST:PORT`) this
    /// coordinator shares the service through; empty = on its own.
    pub redis: Vec<String>,
    /// Scale-out: a usage batch is acknowledged once this many replicas
    /// hold it (Redis `WAIT`); 0 for a cluster without replicas.
    pub redis_ack_replicas: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            region: bandshare_matcher::RegionConfig::default(),
            fanout: 8,
            max_offers: 5,
            access_deadline: Duration::from_millis(300),
            report_interval: Duration::from_millis(2000),
            ping_interval: Duration::from_millis(1000),
            expire_after: Duration::from_millis(6000),
            ticket_lifetime: Duration::from_secs(120),
            quota_bytes: 1 << 30,
            max_streams_per_connection: 1024,
            max_inflight_requests: 512,
            max_joining: 64,
            join_queue: 4096,
            max_connections_per_source: 256,
            enroll: Enroll::Open,
            privacy: crate::privacy::PrivacyConfig::default(),
            qos: QosConfig::default(),
            http_token: None,
            redis: vec![],
            redis_ack_replicas: 1,
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
    // Written so that NaN (which compares false with everything) fails.
    if !(lo <= v && v <= hi) {
        let problem = if v.partial_cmp(&v).is_none() {
            format!("{v} is not a number (expected a finite value in {lo}..={hi})")
        } else {
            format!("{v} is outside {lo}..={hi}")
        };
        return Err(ConfigError::Invalid { key, problem });
    }
    Ok(v)
}

fn region(raw: &RawScenes) -> Result<bandshare_matcher::RegionConfig, ConfigError> {
    let d = bandshare_matcher::RegionConfig::default();
    let r = bandshare_matcher::RegionConfig {
        outdoor_radius_m: check(
            "scenes.outdoor.radius_m",
            raw.outdoor.radius_m,
            d.outdoor_radius_m,
            1.0,
            10_000.0,
        )?,
        vehicle_length_m: check(
            "scenes.vehicle.length_m",
            raw.vehicle.length_m,
            d.vehicle_length_m,
            1.0,
            500.0,
        )?,
        vehicle_width_m: check(
            "scenes.vehicle.width_m",
            raw.vehicle.width_m,
            d.vehicle_width_m,
            0.5,
            50.0,
        )?,
        vehicle_height_m: check(
            "scenes.vehicle.height_m",
            raw.vehicle.height_m,
            d.vehicle_height_m,
            0.5,
            50.0,
        )?,
        vehicle_max_speed_diff_mps: check(
            "scenes.vehicle.max_speed_diff_mps",
            raw.vehicle.max_speed_diff_mps,
            d.vehicle_max_speed_diff_mps,
            0.1,
            50.0,
        )?,
        vehicle_min_speed_mps: check(
            "scenes.vehicle.min_speed_mps",
            raw.vehicle.min_speed_mps,
            d.vehicle_min_speed_mps,
            0.5,
            100.0,
        )?,
        station_radius_m: check(
            "scenes.station.radius_m",
            raw.station.radius_m,
            d.station_radius_m,
            1.0,
            2_000.0,
        )?,
        indoor_similarity: check(
            "scenes.indoor.similarity_threshold",
            raw.indoor.similarity_threshold,
            d.indoor_similarity,
            0.01,
            1.0,
        )?,
        good_accuracy_m: check(
            "scenes.good_accuracy_m",
            raw.good_accuracy_m,
            d.good_accuracy_m,
            1.0,
            1_000.0,
        )?,
    };
    Ok(r)
}

fn privacy(raw: &RawPrivacy) -> Result<crate::privacy::PrivacyConfig, ConfigError> {
    let d = crate::privacy::PrivacyConfig::default();
    let p = crate::privacy::PrivacyConfig {
        requests_per_minute: check(
            "privacy.requests_per_minute",
            raw.requests_per_minute,
            d.requests_per_minute,
            1.0,
            1e9,
        )?,
        burst: check("privacy.burst", raw.burst, d.burst, 1.0, 1e9)?,
        max_speed_mps: check(
            "privacy.max_speed_mps",
            raw.max_speed_mps,
            d.max_speed_mps,
            1.0,
            1e9,
        )?,
        slack_m: check("privacy.slack_m", raw.slack_m, d.slack_m, 0.0, 1e7)?,
        fuzz_min_m: check(
            "privacy.fuzz_min_m",
            raw.fuzz_min_m,
            d.fuzz_min_m,
            0.0,
            1000.0,
        )?,
        fuzz_max_m: check(
            "privacy.fuzz_max_m",
            raw.fuzz_max_m,
            d.fuzz_max_m,
            0.0,
            1000.0,
        )?,
        period: Duration::from_secs_f64(
            check(
                "privacy.period_days",
                raw.period_days,
                d.period.as_secs_f64() / 86_400.0,
                0.01,
                3650.0,
            )? * 86_400.0,
        ),
        move_m: check("privacy.move_m", raw.move_m, d.move_m, 1.0, 1e6)?,
    };
    if p.fuzz_max_m < p.fuzz_min_m {
        return Err(ConfigError::Invalid {
            key: "privacy.fuzz_max_m",
            problem: "must not be below privacy.fuzz_min_m".into(),
        });
    }
    Ok(p)
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
            region: region(&raw.scenes)?,
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
            max_inflight_requests: check(
                "server.max_inflight_requests",
                raw.server.max_inflight_requests,
                d.max_inflight_requests,
                1,
                1_000_000,
            )?,
            max_joining: check(
                "server.max_joining",
                raw.server.max_joining,
                d.max_joining,
                1,
                1_000_000,
            )?,
            join_queue: check(
                "server.join_queue",
                raw.server.join_queue,
                d.join_queue,
                0,
                10_000_000,
            )?,
            max_connections_per_source: check(
                "server.max_connections_per_source",
                raw.server.max_connections_per_source,
                d.max_connections_per_source,
                1,
                1_000_000,
            )?,
            enroll: match &raw.server.enroll {
                None => Enroll::Open,
                Some(m) => m.parse().map_err(|problem| ConfigError::Invalid {
                    key: "server.enroll",
                    problem,
                })?,
            },
            privacy: privacy(&raw.privacy)?,
            qos: qos(&raw.qos)?,
            http_token: match &raw.http.token {
                Some(t) if t.trim().len() < 16 => {
                    return Err(ConfigError::Invalid {
                        key: "http.token",
                        problem: "must be at least 16 characters".into(),
                    });
                }
                t => t.as_ref().map(|t| t.trim().to_string()),
            },
            redis: match &raw.server.redis {
                None => vec![],
                Some(urls) => redis_urls(urls.iter().map(String::as_str)).map_err(|problem| {
                    ConfigError::Invalid {
                        key: "server.redis",
                        problem,
                    }
                })?,
            },
            redis_ack_replicas: check(
                "server.redis_ack_replicas",
                raw.server.redis_ack_replicas,
                d.redis_ack_replicas,
                0,
                16,
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

/// Checks Redis node addresses: `redis://HOST:PORT` (or `HOST:PORT`).
pub fn redis_urls<'a>(urls: impl IntoIterator<Item = &'a str>) -> Result<Vec<String>, String> {
    let mut out = vec![];
    for u in urls {
        let u = u.trim();
        if u.is_empty() {
            continue;
        }
        let rest = u.strip_prefix("redis://").unwrap_or(u);
        let ok = !rest.contains("://")
            && rest
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            return Err(format!(
                "bad Redis address {u:?}: expected redis://HOST:PORT"
            ));
        }
        out.push(format!("redis://{rest}"));
    }
    if out.is_empty() {
        return Err("no Redis address given".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn redis_addresses_are_checked() {
        assert_eq!(
            super::redis_urls(["127.0.0.1:7000", " redis://h:7001 "]),
            Ok(vec![
                "redis://127.0.0.1:7000".to_string(),
                "redis://h:7001".to_string()
            ])
        );
        for bad in ["h", "http://h:1", "h:0", ""] {
            assert!(super::redis_urls([bad]).is_err(), "{bad}");
        }
        let c = super::Config::parse(
            "[server]\nredis = [\"127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]\nredis_ack_replicas = 0\n",
        )
        .expect("config");
        assert_eq!(c.redis.len(), 2);
        assert_eq!(c.redis_ack_replicas, 0);
        assert_eq!(super::Config::default().redis_ack_replicas, 1);
        let e = super::Config::parse("[server]\nredis = [\"nonsense\"]\n").expect_err("bad");
        assert!(e.to_string().contains("server.redis"), "{e}");
    }

    use super::*;

    #[test]
    fn non_finite_floats_are_refused_with_their_key() {
        for (table, key) in [
            ("scenes.outdoor", "radius_m"),
            ("scenes.vehicle", "length_m"),
            ("scenes.vehicle", "width_m"),
            ("scenes.vehicle", "height_m"),
            ("scenes.vehicle", "max_speed_diff_mps"),
            ("scenes.vehicle", "min_speed_mps"),
            ("scenes.station", "radius_m"),
            ("scenes.indoor", "similarity_threshold"),
            ("privacy", "requests_per_minute"),
            ("privacy", "burst"),
            ("privacy", "max_speed_mps"),
            ("privacy", "slack_m"),
            ("privacy", "fuzz_min_m"),
            ("privacy", "fuzz_max_m"),
            ("privacy", "period_days"),
            ("privacy", "move_m"),
            ("qos", "dip_share"),
        ] {
            for v in ["nan", "-nan", "inf", "-inf"] {
                let e = Config::parse(&format!("[{table}]\n{key} = {v}\n"))
                    .expect_err("non-finite")
                    .to_string();
                assert!(e.contains(&format!("{table}.{key}")), "{v}: {e}");
            }
        }
        let e = Config::parse("[scenes]\ngood_accuracy_m = nan\n")
            .expect_err("nan")
            .to_string();
        assert!(
            e.contains("scenes.good_accuracy_m") && e.contains("not a number"),
            "{e}"
        );
    }

    #[test]
    fn defaults_and_errors_name_the_key() {
        let c = Config::parse("").expect("empty is fine");
        assert_eq!(c.fanout, 8);
        let c =
            Config::parse("[scenes.outdoor]\nradius_m = 300\n[scenes.vehicle]\nlength_m = 20\n")
                .expect("valid");
        assert_eq!(
            (c.region.outdoor_radius_m, c.region.vehicle_length_m),
            (300.0, 20.0)
        );
        let e = Config::parse("[scenes.station]\nradius_m = -1\n")
            .expect_err("invalid")
            .to_string();
        assert!(e.contains("scenes.station.radius_m"), "{e}");
        let e = Config::parse("[scenes.indoor]\nthreshold = 0.5\n")
            .expect_err("unknown")
            .to_string();
        assert!(e.contains("threshold"), "{e}");
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
        let c = Config::parse("[qos]\ndip_share = 0.75\n").expect("valid");
        assert_eq!(c.qos.map.dip_share, 0.75);
        let e = Config::parse("[qos]\ndip_share = 1.5\n")
            .expect_err("above 1")
            .to_string();
        assert!(e.contains("qos.dip_share"), "{e}");
    }
}
