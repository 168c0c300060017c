//! The sharer's consent policy: whether to serve a requester, answered
//! automatically so no human needs to tap "allow". Every refusal carries a
//! reason the requester is shown.
//!
//! Set by flags (`--max-requesters`, `--decline`) or a TOML file
//! (`--consent FILE`):
//!
//! ```toml
//! accept = true
//! max_requesters = 4
//! daily_cap = "500 MB"            # all requesters together, per UTC day
//! min_battery_pct = 20            # refuse below this (when on battery)
//! schedule = ["07:30-23:00"]      # local time; "22:00-06:00" wraps midnight
//! allowed_services = ["hotspot"]  # of those offered
//!
//! [per_requester]
//! rate = "2 MB/s"                 # token bucket; also "16 Mbit/s"
//! burst = "256 KB"
//! daily_quota = "100 MB"
//! ```

use bandshare_core::ServiceSet;
use bandshare_relay::Limits;
use serde::Deserialize;

/// A time-of-day window in local minutes, `[start, end)`; wraps midnight
/// when `end <= start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start_min: u16,
    pub end_min: u16,
}

impl Window {
    pub fn contains(&self, minute: u16) -> bool {
        if self.start_min < self.end_min {
            (self.start_min..self.end_min).contains(&minute)
        } else {
            minute >= self.start_min || minute < self.end_min
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.start_min), hm(self.end_min))
    }
}

impl std::str::FromStr for Window {
    type Err = ConsentError;
    fn from_str(s: &str) -> Result<Self, ConsentError> {
        let bad = |m: String| ConsentError(m);
        let clock = |t: &str| -> Result<u16, ConsentError> {
            let (h, m) = t
                .trim()
                .split_once(':')
                .ok_or_else(|| bad(format!("{t:?} is not HH:MM")))?;
            let (h, m): (u16, u16) = (
                h.parse().map_err(|_| bad(format!("{t:?} is not HH:MM")))?,
                m.parse().map_err(|_| bad(format!("{t:?} is not HH:MM")))?,
            );
            if h > 24 || m > 59 || (h == 24 && m > 0) {
                return Err(bad(format!("{t:?} is not a time of day")));
            }
            Ok(h * 60 + m)
        };
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| bad(format!("schedule window {s:?} is not HH:MM-HH:MM")))?;
        let w = Window {
            start_min: clock(a)?,
            end_min: clock(b)? % (24 * 60),
        };
        if w.start_min == w.end_min && clock(b)? != 24 * 60 {
            return Err(bad(format!("schedule window {s:?} is empty")));
        }
        Ok(w)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consent {
    pub accept: bool,
    /// Distinct requesters at once; 0 = no limit.
    pub max_requesters: u32,
    /// Local time windows in which requesters are served; empty = always.
    pub schedule: Vec<Window>,
    /// Refuse when the battery is known and below this.
    pub min_battery_pct: Option<u32>,
    /// Services requesters may ask for; `None` = all offered.
    pub allowed_services: Option<ServiceSet>,
    /// Byte and rate limits the relay enforces.
    pub limits: Limits,
}

impl Default for Consent {
    fn default() -> Self {
        Consent {
            accept: true,
            max_requesters: 0,
            schedule: vec![],
            min_battery_pct: None,
            allowed_services: None,
            limits: Limits::default(),
        }
    }
}

/// What a decision looks at, read at the moment of the request.
#[derive(Clone, Copy, Debug)]
pub struct Moment {
    pub active_requesters: u32,
    /// Minutes since local midnight.
    pub minute_of_day: u16,
    pub battery_pct: Option<u32>,
    /// Services the requester asks for.
    pub wanted: ServiceSet,
    /// Bytes left today of the sharer's cap / of this requester's quota.
    pub daily_left: u64,
    pub requester_left: u64,
}

/// Why a sharer declines an access request; its text is what the
/// requester is shown.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Declined {
    #[error("sharer is not accepting requesters")]
    NotAccepting,
    #[error("outside the sharer's schedule (serves {} local time)", windows(.0))]
    OutsideSchedule(Vec<Window>),
    #[error("sharer's battery {battery}% is below its minimum of {min}%")]
    LowBattery { battery: u32, min: u32 },
    #[error("service not allowed by the sharer: {refused} (allowed: {})", if .allowed.is_empty() { "none".to_string() } else { .allowed.to_string() })]
    ServiceNotAllowed {
        refused: ServiceSet,
        allowed: ServiceSet,
    },
    #[error("sharer at capacity ({active}/{max} requesters)")]
    AtCapacity { active: u32, max: u32 },
    #[error("sharer's daily data cap of {} is reached", show_bytes(*.0))]
    DailyCapReached(u64),
    #[error("your daily quota of {} at this sharer is used up", show_bytes(*.0))]
    QuotaUsedUp(u64),
}

fn windows(w: &[Window]) -> String {
    w.iter()
        .map(Window::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A consent file, flag or size that cannot be read; says which and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConsentError(String);

impl ConsentError {
    fn at(key: &str, e: impl std::fmt::Display) -> ConsentError {
        ConsentError(format!("{key}: {e}"))
    }
}

impl Consent {
    pub fn decide(&self, m: &Moment) -> Result<(), Declined> {
        if !self.accept {
            return Err(Declined::NotAccepting);
        }
        if !self.schedule.is_empty() && !self.schedule.iter().any(|w| w.contains(m.minute_of_day)) {
            return Err(Declined::OutsideSchedule(self.schedule.clone()));
        }
        if let (Some(min), Some(battery)) = (self.min_battery_pct, m.battery_pct)
            && battery < min
        {
            return Err(Declined::LowBattery { battery, min });
        }
        if let Some(allowed) = self.allowed_services {
            let refused = allowed.missing(m.wanted);
            if !refused.is_empty() {
                return Err(Declined::ServiceNotAllowed { refused, allowed });
            }
        }
        if self.max_requesters > 0 && m.active_requesters >= self.max_requesters {
            return Err(Declined::AtCapacity {
                active: m.active_requesters,
                max: self.max_requesters,
            });
        }
        if m.daily_left == 0 {
            return Err(Declined::DailyCapReached(self.limits.daily_cap_bytes));
        }
        if m.requester_left == 0 {
            return Err(Declined::QuotaUsedUp(self.limits.requester_daily_bytes));
        }
        Ok(())
    }

    /// Reads a consent file (format in the module docs); errors name the key.
    pub fn from_toml(text: &str) -> Result<Consent, ConsentError> {
        let f: File = toml::from_str(text).map_err(|e| ConsentError(e.to_string()))?;
        let schedule = f
            .schedule
            .iter()
            .map(|w| w.parse().map_err(|e| ConsentError::at("schedule", e)))
            .collect::<Result<Vec<Window>, ConsentError>>()?;
        if let Some(b) = f.min_battery_pct
            && b > 100
        {
            return Err(ConsentError(format!("min_battery_pct: {b} is above 100")));
        }
        let allowed_services = match &f.allowed_services {
            None => None,
            Some(list) => Some(
                list.join(",")
                    .parse::<ServiceSet>()
                    .map_err(|e| ConsentError::at("allowed_services", e))?,
            ),
        };
        let size = |key: &str, v: &Option<Size>| -> Result<u64, ConsentError> {
            v.as_ref()
                .map_or(Ok(0), |s| s.bytes().map_err(|e| ConsentError::at(key, e)))
        };
        let p = f.per_requester.unwrap_or_default();
        let rate = match &p.rate {
            None => 0,
            Some(Size::Bytes(n)) => *n,
            Some(Size::Text(t)) => {
                parse_rate(t).map_err(|e| ConsentError::at("per_requester.rate", e))?
            }
        };
        Ok(Consent {
            accept: f.accept.unwrap_or(true),
            max_requesters: f.max_requesters.unwrap_or(0),
            schedule,
            min_battery_pct: f.min_battery_pct,
            allowed_services,
            limits: Limits {
                rate_bytes_per_s: rate,
                burst_bytes: size("per_requester.burst", &p.burst)?,
                requester_daily_bytes: size("per_requester.daily_quota", &p.daily_quota)?,
                daily_cap_bytes: size("daily_cap", &f.daily_cap)?,
            },
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    accept: Option<bool>,
    max_requesters: Option<u32>,
    daily_cap: Option<Size>,
    min_battery_pct: Option<u32>,
    #[serde(default)]
    schedule: Vec<String>,
    allowed_services: Option<Vec<String>>,
    per_requester: Option<PerRequester>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PerRequester {
    rate: Option<Size>,
    burst: Option<Size>,
    daily_quota: Option<Size>,
}

/// A size as a number of bytes or a string with a unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self) -> Result<u64, ConsentError> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(t) => parse_bytes(t),
        }
    }
}

/// "500 MB", "1.5GiB", "64 KiB", "1000": bytes (MB = 10^6, MiB = 2^20).
pub fn parse_bytes(s: &str) -> Result<u64, ConsentError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| ConsentError(format!("{s:?} is not a size like \"500 MB\"")))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(ConsentError(format!(
                "{s:?}: unknown unit {other:?} (B, KB, MB, GB, KiB, MiB, GiB)"
            )));
        }
    };
    let v = n * mult;
    if !v.is_finite() || v >= u64::MAX as f64 {
        return Err(ConsentError(format!("{s:?} is too large")));
    }
    Ok(v.round() as u64)
}

/// "2 MB/s", "16 Mbit/s", "500 KiB/s": bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, ConsentError> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    if let Some(bits) = lower
        .strip_suffix("bit/s")
        .or_else(|| lower.strip_suffix("bps"))
    {
        return Ok(parse_bytes(bits)? / 8);
    }
    match lower.strip_suffix("/s") {
        Some(b) => parse_bytes(b),
        None => Err(ConsentError(format!(
            "{s:?} is not a rate like \"2 MB/s\" or \"16 Mbit/s\""
        ))),
    }
}

/// Bytes for people: "500 MB".
pub fn show_bytes(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1} GB", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} KB", n as f64 / 1e3),
        n => format!("{n} B"),
    }
}

/// Minutes since local midnight, in the machine's time zone.
pub fn local_minute_of_day() -> u16 {
    let now = jiff::Zoned::now();
    (now.hour() as u16) * 60 + now.minute() as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moment() -> Moment {
        Moment {
            active_requesters: 0,
            minute_of_day: 12 * 60,
            battery_pct: None,
            wanted: ServiceSet::default(),
            daily_left: u64::MAX,
            requester_left: u64::MAX,
        }
    }

    #[test]
    fn decides_with_reasons() {
        assert_eq!(Consent::default().decide(&moment()), Ok(()));
        let c = Consent {
            max_requesters: 2,
            ..Consent::default()
        };
        assert_eq!(
            c.decide(&Moment {
                active_requesters: 1,
                ..moment()
            })
            .map_err(|d| d.to_string()),
            Ok(())
        );
        assert_eq!(
            c.decide(&Moment {
                active_requesters: 2,
                ..moment()
            })
            .map_err(|d| d.to_string()),
            Err("sharer at capacity (2/2 requesters)".into())
        );
        let c = Consent {
            accept: false,
            ..Consent::default()
        };
        assert!(c.decide(&moment()).map_err(|d| d.to_string()).is_err());
        let c = Consent::from_toml(
            r#"
            daily_cap = "1 GB"
            min_battery_pct = 20
            schedule = ["07:30-23:00"]
            allowed_services = ["hotspot"]
            [per_requester]
            rate = "16 Mbit/s"
            daily_quota = 5000000
            "#,
        )
        .expect("parses");
        assert_eq!(c.limits.rate_bytes_per_s, 2_000_000);
        assert_eq!(c.limits.requester_daily_bytes, 5_000_000);
        assert_eq!(c.limits.daily_cap_bytes, 1_000_000_000);
        assert_eq!(
            c.decide(&Moment {
                minute_of_day: 6 * 60,
                ..moment()
            })
            .map_err(|d| d.to_string()),
            Err("outside the sharer's schedule (serves 07:30-23:00 local time)".into())
        );
        assert_eq!(
            c.decide(&Moment {
                battery_pct: Some(12),
                ..moment()
            })
            .map_err(|d| d.to_string()),
            Err("sharer's battery 12% is below its minimum of 20%".into())
        );
        assert_eq!(
            c.decide(&Moment {
                battery_pct: Some(20),
                ..moment()
            })
            .map_err(|d| d.to_string()),
            Ok(())
        );
        let wanted = "hotspot,prose".parse().expect("set");
        assert_eq!(
            c.decide(&Moment { wanted, ..moment() })
                .map_err(|d| d.to_string()),
            Err("service not allowed by the sharer: prose (allowed: hotspot)".into())
        );
        assert_eq!(
            c.decide(&Moment {
                daily_left: 0,
                ..moment()
            })
            .map_err(|d| d.to_string()),
            Err("sharer's daily data cap of 1.0 GB is reached".into())
        );
        assert_eq!(
            c.decide(&Moment {
                requester_left: 0,
                ..moment()
            })
            .map_err(|d| d.to_string()),
            Err("your daily quota of 5.0 MB at this sharer is used up".into())
        );
    }

    #[test]
    fn windows_wrap_midnight() {
        let w: Window = "22:00-06:00".parse().expect("window");
        assert!(w.contains(23 * 60) && w.contains(0) && w.contains(5 * 60 + 59));
        assert!(!w.contains(6 * 60) && !w.contains(12 * 60));
        let all: Window = "00:00-24:00".parse().expect("window");
        assert!(all.contains(0) && all.contains(1439));
        for bad in ["7-9", "07:00", "25:00-26:00", "07:00-07:00", "07:60-08:00"] {
            assert!(bad.parse::<Window>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_files_name_the_key() {
        for (text, key) in [
            ("daily_cap = \"5 parsecs\"", "daily_cap"),
            ("schedule = [\"soon\"]", "schedule"),
            ("min_battery_pct = 101", "min_battery_pct"),
            ("allowed_services = [\"teleport\"]", "allowed_services"),
            ("[per_requester]\nrate = \"fast\"", "per_requester.rate"),
            ("colour = \"blue\"", "colour"),
        ] {
            let e = Consent::from_toml(text).expect_err(text);
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn sizes_and_rates() {
        assert_eq!(parse_bytes("500 MB"), Ok(500_000_000));
        assert_eq!(parse_bytes("64KiB"), Ok(65_536));
        assert_eq!(parse_bytes("1.5 GB"), Ok(1_500_000_000));
        assert_eq!(parse_rate("2 MB/s"), Ok(2_000_000));
        assert_eq!(parse_rate("8 Mbit/s"), Ok(1_000_000));
        assert!(parse_bytes("-1 MB").is_err() && parse_bytes("1e999 GB").is_err());
        assert!(parse_rate("2 MB").is_err());
    }
}
