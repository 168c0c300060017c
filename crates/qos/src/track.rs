//! Reading tracks and recorded traces (outside input: every parser returns
//! an error naming the line, never panics; fuzzed).
//!
//! - A track to predict along: CSV with the header `time,lat,lon` (unix
//!   seconds; lat and lon empty where there was no fix) or GPX 1.1
//!   (`<trkpt lat= lon=>` with `<time>`; a point without a time is an error).
//! - Recorded link-quality traces to import: the Norway HSDPA derived logs
//!   (six space-separated columns, `NaN` for no fix) and the UCC 5G CSVs.

use std::fmt;

/// One point of a track.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub t: f64,
    pub pos: Option<(f64, f64)>,
}

/// One recorded link-quality reading.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Reading {
    /// When it ended, unix seconds.
    pub t: f64,
    pub pos: Option<(f64, f64)>,
    /// Whether `pos` was filled in between fixes rather than measured.
    pub filled: bool,
    pub duration_s: f64,
    pub down_kbps: f64,
    pub up_kbps: Option<f64>,
    pub rtt_ms: Option<f64>,
    pub loss_permille: Option<u32>,
    pub rsrp_dbm: Option<f64>,
    pub rsrq_db: Option<f64>,
    pub snr_db: Option<f64>,
    /// "5G", "LTE", "HSPA+", … as recorded.
    pub network: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct TrackError {
    pub line: usize,
    pub what: String,
}

impl fmt::Display for TrackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.what)
    }
}

impl std::error::Error for TrackError {}

fn err(line: usize, what: impl Into<String>) -> TrackError {
    TrackError {
        line,
        what: what.into(),
    }
}

fn position(line: usize, lat: f64, lon: f64) -> Result<(f64, f64), TrackError> {
    if lat.is_finite() && lon.is_finite() && lat.abs() <= 90.0 && lon.abs() <= 180.0 {
        Ok((lat, lon))
    } else {
        Err(err(
            line,
            format!("{lat},{lon} is not a latitude,longitude"),
        ))
    }
}

fn number(line: usize, what: &str, text: &str) -> Result<f64, TrackError> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| err(line, format!("{what} {text:?} is not a number")))
}

/// A track, CSV or GPX (told apart by its first character).
pub fn parse_track(text: &str) -> Result<Vec<Point>, TrackError> {
    if text.trim_start().starts_with('<') {
        parse_gpx(text)
    } else {
        parse_csv(text)
    }
}

/// CSV with the header `time,lat,lon`; points must be in time order.
pub fn parse_csv(text: &str) -> Result<Vec<Point>, TrackError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or_else(|| err(1, "empty track"))?;
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    if cols != ["time", "lat", "lon"] {
        return Err(err(
            1,
            format!("header must be time,lat,lon, got {header:?}"),
        ));
    }
    let mut out = vec![];
    for (i, l) in lines {
        let n = i + 1;
        let f: Vec<&str> = l.split(',').map(str::trim).collect();
        let [t, lat, lon] = f[..] else {
            return Err(err(n, format!("expected 3 fields, got {}", f.len())));
        };
        let t = number(n, "time", t)?;
        let pos = match (lat.is_empty(), lon.is_empty()) {
            (true, true) => None,
            (false, false) => Some(position(n, number(n, "lat", lat)?, number(n, "lon", lon)?)?),
            _ => return Err(err(n, "give both lat and lon, or neither")),
        };
        push_in_order(&mut out, Point { t, pos }, n)?;
    }
    Ok(out)
}

fn push_in_order(out: &mut Vec<Point>, p: Point, line: usize) -> Result<(), TrackError> {
    if out.last().is_some_and(|last| p.t < last.t) {
        return Err(err(
            line,
            format!("time {} is before the previous point's", p.t),
        ));
    }
    out.push(p);
    Ok(())
}

/// GPX 1.1: every `trkpt` (and `rtept`) with its `time` (RFC 3339, UTC or
/// an offset).
pub fn parse_gpx(text: &str) -> Result<Vec<Point>, TrackError> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(text);
    let mut out = vec![];
    let mut open: Option<(f64, f64)> = None;
    let mut in_time = false;
    let mut time: Option<f64> = None;
    let line_of = |pos: u64| {
        text[..(pos as usize).min(text.len())]
            .lines()
            .count()
            .max(1)
    };
    loop {
        let at = reader.buffer_position();
        let ev = reader
            .read_event()
            .map_err(|e| err(line_of(at), format!("GPX: {e}")))?;
        match ev {
            Event::Start(e) | Event::Empty(e)
                if matches!(e.local_name().as_ref(), "trkpt" | "rtept") =>
            {
                let (mut lat, mut lon) = (None, None);
                for a in e.attributes() {
                    let a = a.map_err(|e| err(line_of(at), format!("GPX attribute: {e}")))?;
                    let v = a.value.to_string();
                    match a.key.local_name().as_ref() {
                        "lat" => lat = Some(number(line_of(at), "lat", &v)?),
                        "lon" => lon = Some(number(line_of(at), "lon", &v)?),
                        _ => {}
                    }
                }
                let (Some(lat), Some(lon)) = (lat, lon) else {
                    return Err(err(line_of(at), "a trkpt needs lat and lon"));
                };
                open = Some(position(line_of(at), lat, lon)?);
                time = None;
            }
            Event::Start(e) if e.local_name().as_ref() == "time" && open.is_some() => {
                in_time = true;
            }
            Event::Text(t) if in_time => {
                let s = String::from(t.as_ref());
                time = Some(
                    rfc3339(s.trim())
                        .ok_or_else(|| err(line_of(at), format!("time {s:?} is not RFC 3339")))?,
                );
            }
            Event::End(e) if e.local_name().as_ref() == "time" => in_time = false,
            Event::End(e) if matches!(e.local_name().as_ref(), "trkpt" | "rtept") => {
                let pos = open.take();
                let t = time
                    .take()
                    .ok_or_else(|| err(line_of(at), "a trkpt has no <time>"))?;
                push_in_order(&mut out, Point { t, pos }, line_of(at))?;
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if out.is_empty() {
        return Err(err(1, "no track points (trkpt) in the GPX"));
    }
    Ok(out)
}

/// Days from 1970-01-01 to a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: f64) -> Option<f64> {
    let ok = (1..=12).contains(&mo)
        && (1..=31).contains(&d)
        && (0..=23).contains(&h)
        && (0..=59).contains(&mi)
        && (0.0..61.0).contains(&s);
    ok.then(|| (days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60) as f64 + s)
}

/// `2020-01-02T03:04:05(.fff)?(Z|±hh:mm)` to unix seconds.
fn rfc3339(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let int = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (int(0..4)?, int(5..7)?, int(8..10)?);
    let (h, mi) = (int(11..13)?, int(14..16)?);
    let rest = s.get(17..)?;
    let split = rest.find(['Z', 'z', '+', '-'])?;
    let sec: f64 = rest[..split].parse().ok()?;
    let zone = &rest[split..];
    let offset = match zone {
        "Z" | "z" => 0,
        _ => {
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            let hh = zone.get(1..3)?.parse::<i64>().ok()?;
            let mm = zone.get(4..6)?.parse::<i64>().ok()?;
            sign * (hh * 3600 + mm * 60)
        }
    };
    Some(civil(y, mo, d, h, mi, sec)? - offset as f64)
}

/// A Norway HSDPA derived log: `unix_s mono_ms lat lon bytes ms` per line,
/// `NaN` for no fix; sorted by time (one run is logged in reverse).
pub fn parse_norway(text: &str) -> Result<Vec<Reading>, TrackError> {
    let mut out = vec![];
    for (i, l) in text.lines().enumerate() {
        let n = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = l.split_whitespace().collect();
        let [t, _mono, lat, lon, bytes, ms] = f[..] else {
            return Err(err(n, format!("expected 6 columns, got {}", f.len())));
        };
        let t = number(n, "time", t)?;
        let (bytes, ms) = (number(n, "bytes", bytes)?, number(n, "ms", ms)?);
        if bytes < 0.0 || ms < 0.0 {
            return Err(err(n, "bytes and ms must not be negative"));
        }
        if ms == 0.0 {
            continue;
        }
        let pos = match (lat.parse::<f64>(), lon.parse::<f64>()) {
            (Ok(a), Ok(b)) if a.is_nan() && b.is_nan() => None,
            (Ok(a), Ok(b)) => Some(position(n, a, b)?),
            _ => return Err(err(n, format!("lat/lon {lat:?} {lon:?}"))),
        };
        out.push(Reading {
            t,
            pos,
            duration_s: ms / 1000.0,
            down_kbps: 8.0 * bytes / ms,
            ..Reading::default()
        });
    }
    out.sort_by(|a, b| a.t.total_cmp(&b.t));
    Ok(out)
}

/// A UCC 5G trace (`Timestamp,Longitude,Latitude,…,DL_bitrate,UL_bitrate,…`;
/// timestamps `yyyy.mm.dd_hh.mm.ss`, read as UTC). Rows sharing a second
/// are merged into one reading of that second (their mean). Rows whose
/// `State` is `I` (idle: nothing was being downloaded, so the bitrate says
/// nothing about the link) are left out.
pub fn parse_ucc(text: &str) -> Result<Vec<Reading>, TrackError> {
    let mut lines = text.lines().enumerate();
    let (_, header) = lines.next().ok_or_else(|| err(1, "empty file"))?;
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or_else(|| err(1, format!("no column {name}")))
    };
    let (ct, clon, clat) = (col("Timestamp")?, col("Longitude")?, col("Latitude")?);
    let (cdl, cul, cmode) = (col("DL_bitrate")?, col("UL_bitrate")?, col("NetworkMode")?);
    let (crsrp, crsrq, csnr) = (col("RSRP")?, col("RSRQ")?, col("SNR")?);
    let (cping, closs) = (col("PINGAVG")?, col("PINGLOSS")?);
    let cstate = cols.iter().position(|c| *c == "State");
    let width = cols.len();
    let opt = |s: &str| s.trim().parse::<f64>().ok().filter(|v| v.is_finite());
    let mut out: Vec<(Reading, u32)> = vec![];
    for (i, l) in lines {
        let n = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = l.split(',').collect();
        if f.len() != width {
            return Err(err(n, format!("expected {width} fields, got {}", f.len())));
        }
        if cstate.is_some_and(|c| f[c].trim() == "I") {
            continue;
        }
        let ts = f[ct].trim();
        let int = |r: std::ops::Range<usize>| ts.get(r).and_then(|x| x.parse::<i64>().ok());
        let t = (ts.len() == 19)
            .then(|| {
                civil(
                    int(0..4)?,
                    int(5..7)?,
                    int(8..10)?,
                    int(11..13)?,
                    int(14..16)?,
                    int(17..19)? as f64,
                )
            })
            .flatten()
            .ok_or_else(|| err(n, format!("timestamp {ts:?} is not yyyy.mm.dd_hh.mm.ss")))?;
        let pos = match (opt(f[clat]), opt(f[clon])) {
            (Some(a), Some(b)) => Some(position(n, a, b)?),
            _ => None,
        };
        let down = number(n, "DL_bitrate", f[cdl])?;
        if down < 0.0 {
            return Err(err(n, "DL_bitrate must not be negative"));
        }
        let r = Reading {
            t: t + 1.0,
            pos,
            duration_s: 1.0,
            down_kbps: down,
            up_kbps: opt(f[cul]),
            rtt_ms: opt(f[cping]),
            loss_permille: opt(f[closs]).map(|p| (p * 10.0).clamp(0.0, 1000.0) as u32),
            rsrp_dbm: opt(f[crsrp]),
            rsrq_db: opt(f[crsrq]),
            snr_db: opt(f[csnr]),
            network: Some(f[cmode].trim().to_string()).filter(|m| !m.is_empty()),
            filled: false,
        };
        match out.last_mut() {
            Some((last, k)) if last.t == r.t => {
                let k1 = *k as f64;
                last.down_kbps = (last.down_kbps * k1 + r.down_kbps) / (k1 + 1.0);
                last.pos = r.pos.or(last.pos);
                *k += 1;
            }
            _ => out.push((r, 1)),
        }
    }
    let mut v: Vec<Reading> = out.into_iter().map(|(r, _)| r).collect();
    v.sort_by(|a, b| a.t.total_cmp(&b.t));
    Ok(v)
}

/// Gives readings without a fix a position between the fixes around them
/// (linear in time), when those fixes are at most `max_gap_s` apart: a
/// recorded trip through a tunnel then shows its weak stretch along the
/// tunnel, not at its mouth. Filled readings are marked `filled`.
pub fn fill_gaps(readings: &mut [Reading], max_gap_s: f64) {
    let mut i = 0;
    while i < readings.len() {
        if readings[i].pos.is_some() {
            i += 1;
            continue;
        }
        let start = i;
        while i < readings.len() && readings[i].pos.is_none() {
            i += 1;
        }
        let (Some(before), Some(after)) =
            (start.checked_sub(1).map(|b| &readings[b]), readings.get(i))
        else {
            continue;
        };
        let (Some(a), Some(b)) = (before.pos, after.pos) else {
            continue;
        };
        let (t0, t1) = (before.t, after.t);
        if t1 - t0 > max_gap_s || t1 <= t0 {
            continue;
        }
        for r in &mut readings[start..i] {
            let f = ((r.t - t0) / (t1 - t0)).clamp(0.0, 1.0);
            r.pos = Some((a.0 + (b.0 - a.0) * f, a.1 + (b.1 - a.1) * f));
            r.filled = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_tracks_with_gaps() {
        let t = parse_csv("time,lat,lon\n10,59.9,10.7\n11,,\n12,59.91,10.71\n").expect("csv");
        assert_eq!(t.len(), 3);
        assert_eq!(t[1].pos, None);
        assert_eq!(t[2].pos, Some((59.91, 10.71)));
        for (bad, why) in [
            ("t,lat,lon\n1,2,3", "header"),
            ("time,lat,lon\n1,2", "3 fields"),
            ("time,lat,lon\n1,95,3", "latitude"),
            ("time,lat,lon\n1,,3", "neither"),
            ("time,lat,lon\n5,1,1\n4,1,1", "before"),
            ("time,lat,lon\nx,1,1", "not a number"),
            ("", "empty"),
        ] {
            let e = parse_csv(bad).expect_err(bad);
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn gpx_tracks() {
        let gpx = r#"<?xml version="1.0"?>
<gpx version="1.1" creator="t" xmlns="http://www.topografix.com/GPX/1/1">
 <trk><trkseg>
  <trkpt lat="59.9" lon="10.7"><time>2010-09-28T06:00:00Z</time></trkpt>
  <trkpt lat="59.91" lon="10.71"><ele>3</ele><time>2010-09-28T08:00:01+02:00</time></trkpt>
 </trkseg></trk></gpx>"#;
        let t = parse_track(gpx).expect("gpx");
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].t, 1_285_653_600.0);
        assert_eq!(t[1].t, 1_285_653_601.0);
        assert!(parse_gpx("<gpx><trk><trkpt lat=\"1\" lon=\"2\"></trkpt></trk></gpx>").is_err());
        assert!(parse_gpx("<gpx><trkpt lat=\"1\"").is_err());
        assert!(parse_gpx("<gpx></gpx>").is_err());
    }

    #[test]
    fn norway_and_ucc_rows() {
        let n = parse_norway("1285653601 1 59.9 10.7 25000 1000\n1285653600 0 NaN NaN 0 2000\n")
            .expect("norway");
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].t, 1_285_653_600.0, "sorted");
        assert_eq!(n[0].pos, None);
        assert_eq!(n[1].down_kbps, 200.0);
        assert!(parse_norway("1 2 3").is_err());
        let u = parse_ucc(
            "Timestamp,Longitude,Latitude,NetworkMode,RSRP,RSRQ,SNR,DL_bitrate,UL_bitrate,PINGAVG,PINGLOSS\n\
             2019.12.14_10.16.30,-8.38,51.93,5G,-99,-15,6.0,7,1,-,-\n\
             2019.12.14_10.16.31,-8.38,51.93,5G,-99,-15,6.0,8,1,20.5,0\n\
             2019.12.14_10.16.31,-8.38,51.93,5G,-99,-15,6.0,0,1,-,-\n",
        )
        .expect("ucc");
        assert_eq!(u.len(), 2, "one reading per second");
        assert_eq!(u[1].down_kbps, 4.0);
        assert_eq!(u[0].rsrp_dbm, Some(-99.0));
        assert_eq!(u[0].t, 1_576_318_591.0);
        assert!(parse_ucc("Timestamp\n1").is_err());
    }

    #[test]
    fn gaps_fill_between_fixes() {
        let r = |t: f64, pos| Reading {
            t,
            pos,
            duration_s: 1.0,
            ..Reading::default()
        };
        let mut v = vec![
            r(0.0, Some((0.0, 0.0))),
            r(1.0, None),
            r(2.0, Some((2.0, 4.0))),
            r(3.0, None),
        ];
        fill_gaps(&mut v, 10.0);
        assert_eq!(v[1].pos, Some((1.0, 2.0)));
        assert!(v[1].filled);
        assert_eq!(v[3].pos, None, "no fix after it");
    }
}
