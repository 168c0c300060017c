//! Wi-Fi scans from the system: NetworkManager's `nmcli -t -f BSSID,SIGNAL
//! dev wifi list` where it runs, else `iw dev IFACE scan` (needs root).
//! Parsers are pure and tested on captured outputs.

use crate::location::LocationSpec;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, warn};

const EVERY: Duration = Duration::from_secs(15);

/// `iw dev IFACE scan`: a `BSS <bssid>(on IFACE)` line, later `signal: -52.00 dBm`.
pub fn parse_iw(text: &str) -> Vec<(String, i32)> {
    let mut out = vec![];
    let mut current: Option<String> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = line.strip_prefix("BSS ") {
            let bssid: String = rest.chars().take(17).collect();
            current =
                bandshare_core::radio::parse_bssid(&bssid).map(bandshare_core::radio::format_bssid);
        } else if let Some(sig) = t.strip_prefix("signal:") {
            let dbm = sig
                .trim()
                .trim_end_matches("dBm")
                .trim()
                .parse::<f64>()
                .ok();
            if let (Some(b), Some(d)) = (current.take(), dbm) {
                out.push((b, d.round() as i32));
            }
        }
    }
    out
}

/// `nmcli -t -f BSSID,SIGNAL dev wifi list`: `AA\:BB\:…:75`, signal as
/// 0..=100 quality, mapped to dBm as NetworkManager does (q = 2·(dBm + 100)).
pub fn parse_nmcli(text: &str) -> Vec<(String, i32)> {
    text.lines()
        .filter_map(|line| {
            let (bssid, signal) = line.trim().rsplit_once(':')?;
            let bssid = bssid.replace("\\:", ":");
            let b = bandshare_core::radio::parse_bssid(&bssid)?;
            let q: i32 = signal
                .trim()
                .parse()
                .ok()
                .filter(|q| (0..=100).contains(q))?;
            Some((bandshare_core::radio::format_bssid(b), q / 2 - 100))
        })
        .collect()
}

async fn scan(iface: &str) -> Result<Vec<(String, i32)>, String> {
    let nmcli = tokio::process::Command::new("nmcli")
        .args([
            "-t",
            "-f",
            "BSSID,SIGNAL",
            "dev",
            "wifi",
            "list",
            "ifname",
            iface,
        ])
        .output()
        .await;
    if let Ok(out) = nmcli
        && out.status.success()
    {
        return Ok(parse_nmcli(&String::from_utf8_lossy(&out.stdout)));
    }
    let out = tokio::process::Command::new("iw")
        .args(["dev", iface, "scan"])
        .output()
        .await
        .map_err(|e| format!("neither nmcli nor iw could scan {iface}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "iw dev {iface} scan: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(parse_iw(&String::from_utf8_lossy(&out.stdout)))
}

/// Scans `iface` every 15 s and puts the strongest access points in the location.
pub async fn follow(iface: String, tx: watch::Sender<LocationSpec>) {
    let mut warned = false;
    loop {
        match scan(&iface).await {
            Ok(mut aps) => {
                aps.sort_by_key(|a| std::cmp::Reverse(a.1));
                aps.truncate(bandshare_core::radio::MAX_APS);
                debug!(iface = %iface, aps = aps.len(), "wifi scan");
                tx.send_modify(|loc| loc.wifi = aps);
                warned = false;
            }
            Err(e) if !warned => {
                warn!(error = %e, "wifi scan failed");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IW: &str = "BSS 00:1a:2b:3c:4d:5e(on wlan0) -- associated
\tlast seen: 1520 ms ago
\tTSF: 1234567890 usec (0d, 00:20:34)
\tfreq: 5180
\tbeacon interval: 100 TUs
\tcapability: ESS Privacy SpectrumMgmt ShortSlotTime (0x0511)
\tsignal: -47.00 dBm
\tSSID: office
BSS a4:2b:b0:11:22:33(on wlan0)
\tfreq: 2437
\tsignal: -71.50 dBm
\tSSID: cafe
BSS zz:zz:zz:zz:zz:zz(on wlan0)
\tsignal: -60.00 dBm
";

    const NMCLI: &str = "00\\:1A\\:2B\\:3C\\:4D\\:5E:100
A4\\:2B\\:B0\\:11\\:22\\:33:58
garbage line
A4\\:2B\\:B0\\:11\\:22\\:34:150
";

    #[test]
    fn parses_captured_scans() {
        assert_eq!(
            parse_iw(IW),
            vec![
                ("00:1a:2b:3c:4d:5e".into(), -47),
                ("a4:2b:b0:11:22:33".into(), -72)
            ]
        );
        assert_eq!(
            parse_nmcli(NMCLI),
            vec![
                ("00:1a:2b:3c:4d:5e".into(), -50),
                ("a4:2b:b0:11:22:33".into(), -71)
            ]
        );
        assert!(parse_iw("").is_empty() && parse_nmcli("").is_empty());
    }
}
