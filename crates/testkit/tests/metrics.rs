//! `GET /metrics` read by a real Prometheus parser (Python
//! `prometheus_client`'s OpenMetrics parser, apt python3-prometheus-client),
//! and its counters moving as the test drives share requests and relayed
//! traffic through a real coordinator, sharers and a requester. Skips,
//! saying so, where Python or the parser is missing.

use bandshare_agent::location::{ConditionSpec, LocationSpec};
use bandshare_testkit::http::socks_get;
use bandshare_testkit::{Cluster, SharerSpec, center, wait_until};
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Reads OpenMetrics text on stdin; prints every sample as
/// `name{labels} value`, labels sorted.
const PARSE: &str = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join('%s="%s"' % kv for kv in sorted(s.labels.items()))
        print("%s{%s} %r" % (s.name, labels, float(s.value)))
"#;

/// A Python that has the parser: the one on PATH, else the system's (a
/// pyenv or venv python3 on PATH does not see apt's packages).
fn python() -> Option<&'static str> {
    ["python3", "/usr/bin/python3"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import prometheus_client.openmetrics.parser"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// GET `http://addr/path` (plain HTTP/1.1 over loopback): status line,
/// content type and body.
async fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    // axum answers a body it knows the length of in one piece (no chunks).
    (status, ctype, body.to_string())
}

/// The samples of `/metrics` as the Python parser reads them.
async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let py = python().expect("checked at the start");
    let (status, ctype, body) = get(addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let mut py = Command::new(py)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    py.stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write");
    let out = py.wait_with_output().expect("parser");
    assert!(
        out.status.success(),
        "the parser refused /metrics: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn at(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_metrics_parse_and_move_with_traffic() {
    if python().is_none() {
        eprintln!(
            "SKIP: python3 with prometheus_client is not installed (apt install python3-prometheus-client, as scripts/test does)"
        );
        return;
    }
    let c = Cluster::start(vec![
        SharerSpec::new("alice", 5.0, 0.0).control(),
        SharerSpec::new("bob", 10.0, 0.0).control(),
    ])
    .await
    .expect("cluster");
    let http = c.coordinator.http_addr;
    let before = scrape(http).await;
    assert_eq!(at(&before, "bandshare_online_sharers{}"), 2.0, "{before:?}");

    // Two share requests that get offers, one with no location at all.
    let here = LocationSpec {
        at: Some(center()),
        ..Default::default()
    };
    for _ in 0..2 {
        let r = c
            .ask(here.clone(), ConditionSpec::default())
            .await
            .expect("offers");
        assert_eq!(r.offers.len(), 2);
    }
    assert!(
        c.ask(LocationSpec::default(), ConditionSpec::default())
            .await
            .is_err()
    );
    let after = scrape(http).await;
    let moved = |k: &str| at(&after, k) - at(&before, k);
    assert_eq!(
        moved("bandshare_share_requests_total{result=\"offered\"}"),
        2.0
    );
    assert_eq!(
        moved("bandshare_share_requests_total{result=\"invalid\"}"),
        1.0
    );
    assert_eq!(
        moved("bandshare_share_request_duration_seconds_count{}"),
        3.0
    );
    assert_eq!(
        moved("bandshare_access_requests_total{answer=\"accepted\"}"),
        4.0
    );
    assert_eq!(moved("bandshare_tickets_issued_total{}"), 4.0);
    assert_eq!(moved("bandshare_offers_per_request_sum{}"), 4.0);
    // The histogram's buckets are cumulative, with +Inf holding all.
    assert_eq!(
        at(
            &after,
            "bandshare_share_request_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        at(&after, "bandshare_share_request_duration_seconds_count{}")
    );

    // Relayed bytes reach the ledger and are acknowledged.
    let r = c.requester(c.requester_options()).await.expect("requester");
    let port = c.target.addr.port();
    let (status, _) = socks_get(r.socks(), "localhost", port, "/bytes/200000")
        .await
        .expect("fetch");
    assert!(status.contains("200"), "{status}");
    let mut last = HashMap::new();
    let counted = wait_until(Duration::from_secs(20), || {
        // A blocking scrape inside the poll would need a runtime handle;
        // read the state's own rendering, which `/metrics` serves.
        let text = c.coordinator.state.render_metrics();
        last = text
            .lines()
            .filter_map(|l| l.strip_prefix("bandshare_usage_acknowledged_bytes_total "))
            .filter_map(|v| v.parse::<f64>().ok())
            .map(|v| ("usage".to_string(), v))
            .collect();
        at(&last, "usage") >= 200_000.0
    })
    .await;
    assert!(counted, "usage acknowledged: {last:?}");
    let end = scrape(http).await;
    assert!(at(&end, "bandshare_usage_acknowledged_bytes_total{}") >= 200_000.0);
    assert!(at(&end, "bandshare_state_reports_total{}") > 0.0);

    // The requester's own /metrics on --control.
    let control = r.requester.control_addr.expect("control");
    let m = scrape(control).await;
    assert_eq!(at(&m, "bandshare_path{path=\"pool\"}"), 1.0, "{m:?}");
    assert!(at(&m, "bandshare_relayed_bytes_total{direction=\"down\"}") >= 200_000.0);
    assert!(at(&m, "bandshare_relayed_bytes_total{direction=\"up\"}") > 0.0);
    assert_eq!(at(&m, "bandshare_pool_flows_total{}"), 1.0);
    assert!(
        m.contains_key("bandshare_own_link_trials_total{result=\"failed\"}"),
        "{m:?}"
    );
    let members = at(&m, "bandshare_pool_members{state=\"ready\"}");
    assert!(members >= 1.0, "{m:?}");
    let active: Vec<&String> = m
        .iter()
        .filter(|(k, v)| k.starts_with("bandshare_member_active{") && **v == 1.0)
        .map(|(k, _)| k)
        .collect();
    assert_eq!(active.len(), 1, "{m:?}");
    assert!(
        m.keys()
            .any(|k| k.starts_with("bandshare_member_rtt_seconds{")),
        "{m:?}"
    );
    // The sharers' own /metrics: what they relayed, and an egress denial
    // (a port the sharers' policy does not allow).
    let refused = socks_get(r.socks(), "127.0.0.1", port.wrapping_add(1), "/")
        .await
        .map(|(s, _)| s);
    assert!(refused.is_err() || !refused.as_deref().unwrap_or("").contains("200"));
    let (mut relayed_down, mut denied) = (0.0, 0.0);
    for s in &c.sharers {
        let m = scrape(s.sharer.control_addr.expect("control")).await;
        relayed_down += at(
            &m,
            "bandshare_sharer_relayed_bytes_total{direction=\"down\"}",
        );
        denied += at(
            &m,
            "bandshare_sharer_flows_refused_total{reason=\"egress_denied\"}",
        );
        assert!(m.contains_key("bandshare_sharer_uplink_up{}"), "{m:?}");
    }
    assert!(relayed_down >= 200_000.0, "{relayed_down}");
    assert_eq!(denied, 1.0);

    // The active sharer dies: a failover, counted by its cause.
    let name = active[0]
        .split("sharer=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("sharer label")
        .to_string();
    c.sharer(&name).expect("sharer").kill();
    let mut seen = HashMap::new();
    for _ in 0..50 {
        seen = scrape(control).await;
        let failovers: f64 = seen
            .iter()
            .filter(|(k, _)| k.starts_with("bandshare_failovers_total{"))
            .map(|(_, v)| v)
            .sum();
        if failovers >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every series the Grafana dashboard in the repo queries is served by
    // one of the three (histograms by their _bucket/_sum/_count).
    let mut served: std::collections::HashSet<String> = std::collections::HashSet::new();
    for m in [&end, &seen] {
        served.extend(
            m.keys()
                .map(|k| k.split('{').next().unwrap_or("").to_string()),
        );
    }
    for s in &c.sharers {
        if let Some(a) = s.sharer.control_addr
            && s.name != name
        {
            let m = scrape(a).await;
            served.extend(
                m.keys()
                    .map(|k| k.split('{').next().unwrap_or("").to_string()),
            );
        }
    }
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/grafana/bandshare.json"
    ))
    .expect("dashboard");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let mut used = vec![];
    for p in json["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(i) = rest.find("bandshare_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                used.push(name);
            }
        }
    }
    assert!(used.len() >= 20, "{used:?}");
    let missing: Vec<&String> = used.iter().filter(|n| !served.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries series nobody serves: {missing:?}"
    );

    let by_cause: Vec<(&String, &f64)> = seen
        .iter()
        .filter(|(k, v)| k.starts_with("bandshare_failovers_total{") && **v > 0.0)
        .collect();
    assert!(!by_cause.is_empty(), "no failover counted: {seen:?}");
    eprintln!("failover after killing {name}: {by_cause:?}");
}

/// With `[http] token` every route but /healthz needs it (bearer header,
/// or the cookie `/?token=` sets); a wrong one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_token_guards_every_route_but_healthz() {
    let token = "a-long-enough-secret-token";
    let mut cfg = bandshare_testkit::exact_config();
    cfg.http_token = Some(token.into());
    let c = bandshare_testkit::CoordinatorNode::start(cfg)
        .await
        .expect("coordinator");
    let addr = c.http_addr;
    let raw = |path: &str, header: Option<String>| {
        let path = path.to_string();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let extra = header.map(|h| format!("{h}\r\n")).unwrap_or_default();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("write");
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.expect("read");
            String::from_utf8_lossy(&buf).into_owned()
        }
    };
    for path in ["/", "/status", "/metrics", "/api/map", "/events"] {
        let r = raw(path, None).await;
        assert!(r.starts_with("HTTP/1.1 401"), "{path}: {r}");
        let r = raw(
            path,
            Some("Authorization: Bearer wrong-token-of-some-length".into()),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 401"), "{path} wrong token: {r}");
    }
    assert!(raw("/healthz", None).await.starts_with("HTTP/1.1 200"));
    let r = raw("/status", Some(format!("Authorization: Bearer {token}"))).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = raw(&format!("/?token={token}"), None).await;
    assert!(r.starts_with("HTTP/1.1 303"), "{r}");
    let cookie = r
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .and_then(|v| v.split(';').next())
        .expect("a cookie")
        .to_string();
    assert!(cookie.contains("HttpOnly") || !cookie.is_empty());
    let r = raw("/metrics", Some(format!("Cookie: {cookie}"))).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = raw("/?token=nope", None).await;
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
}
