//! Radio evidence: Wi-Fi fingerprints (BSSIDs with signal strength) and how
//! alike two are, which decides "same venue" indoors.

use std::fmt;

/// A scan: up to [`MAX_APS`] access points, strongest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<(u64, i8)>);

pub const MAX_APS: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "bad Wi-Fi observation {0:?}: expected a BSSID like aa:bb:cc:dd:ee:ff and RSSI in -120..=0 dBm"
)]
pub struct BadObservation(pub String);

/// `aa:bb:cc:dd:ee:ff` into 48 bits.
pub fn parse_bssid(s: &str) -> Option<u64> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    parts.iter().try_fold(0u64, |acc, p| {
        (p.len() == 2).then_some(())?;
        Some((acc << 8) | u8::from_str_radix(p, 16).ok()? as u64)
    })
}

pub fn format_bssid(b: u64) -> String {
    let o = b.to_be_bytes();
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        o[2], o[3], o[4], o[5], o[6], o[7]
    )
}

impl Fingerprint {
    /// From (BSSID, RSSI) pairs; duplicates keep the strongest reading.
    pub fn new(obs: impl IntoIterator<Item = (u64, i32)>) -> Fingerprint {
        let mut v: Vec<(u64, i8)> = vec![];
        for (b, r) in obs {
            let r = r.clamp(-120, 0) as i8;
            match v.iter_mut().find(|x| x.0 == b) {
                Some(x) => x.1 = x.1.max(r),
                None => v.push((b, r)),
            }
        }
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(MAX_APS);
        Fingerprint(v)
    }

    /// From text pairs, checking each.
    pub fn parse(obs: &[(String, i32)]) -> Result<Fingerprint, BadObservation> {
        let mut v = vec![];
        for (b, r) in obs {
            let bssid = parse_bssid(b).ok_or_else(|| BadObservation(format!("{b}={r}")))?;
            if !(-120..=0).contains(r) {
                return Err(BadObservation(format!("{b}={r}")));
            }
            v.push((bssid, *r));
        }
        Ok(Fingerprint::new(v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn bssids(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().map(|x| x.0)
    }

    pub fn observations(&self) -> &[(u64, i8)] {
        &self.0
    }

    /// Similarity in 0..=1: shared access points weighted by signal
    /// (weighted Jaccard: Σ min / Σ max over the union, weight = RSSI + 100).
    pub fn similarity(&self, other: &Fingerprint) -> f64 {
        let w = |r: i8| (r as f64 + 100.0).max(1.0);
        let (mut num, mut den) = (0.0, 0.0);
        for (b, r) in &self.0 {
            match other.0.iter().find(|x| x.0 == *b) {
                Some((_, s)) => {
                    num += w(*r).min(w(*s));
                    den += w(*r).max(w(*s));
                }
                None => den += w(*r),
            }
        }
        for (b, s) in &other.0 {
            if !self.0.iter().any(|x| x.0 == *b) {
                den += w(*s);
            }
        }
        if den == 0.0 { 0.0 } else { num / den }
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v: Vec<String> = self
            .0
            .iter()
            .map(|(b, r)| format!("{}={r}", format_bssid(*b)))
            .collect();
        f.write_str(&v.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(v: &[(&str, i32)]) -> Fingerprint {
        Fingerprint::parse(
            &v.iter()
                .map(|(b, r)| (b.to_string(), *r))
                .collect::<Vec<_>>(),
        )
        .expect("valid")
    }

    #[test]
    fn bssids() {
        assert_eq!(parse_bssid("AA:bb:cc:dd:ee:01"), Some(0xaabb_ccdd_ee01));
        assert_eq!(format_bssid(0xaabb_ccdd_ee01), "aa:bb:cc:dd:ee:01");
        assert_eq!(parse_bssid("aa:bb:cc:dd:ee"), None);
        assert_eq!(parse_bssid("aa:bb:cc:dd:ee:zz"), None);
        assert!(Fingerprint::parse(&[("aa:bb:cc:dd:ee:01".into(), 5)]).is_err());
    }

    #[test]
    fn similarity_orders_venues() {
        let here = fp(&[
            ("00:00:00:00:00:01", -40),
            ("00:00:00:00:00:02", -55),
            ("00:00:00:00:00:03", -70),
        ]);
        let same_room = fp(&[
            ("00:00:00:00:00:01", -45),
            ("00:00:00:00:00:02", -50),
            ("00:00:00:00:00:03", -75),
        ]);
        let next_door = fp(&[("00:00:00:00:00:03", -85), ("00:00:00:00:00:09", -40)]);
        let elsewhere = fp(&[("00:00:00:00:00:07", -40)]);
        assert!((here.similarity(&here) - 1.0).abs() < 1e-12);
        let (a, b, c) = (
            here.similarity(&same_room),
            here.similarity(&next_door),
            here.similarity(&elsewhere),
        );
        assert!(a > 0.8 && b < 0.2 && c == 0.0, "{a} {b} {c}");
        assert!((a - same_room.similarity(&here)).abs() < 1e-12, "symmetric");
    }
}
