//! The dashboards in a real browser: headless Chromium (apt chromium)
//! driven by playwright-core (npm, in tests/browser) loads the
//! coordinator's page from a real coordinator and the requester's page from
//! a real requester; no console errors, no request leaving loopback, and
//! the live figures change without a reload (a sharer starting; the active
//! sharer killed). Screenshots go to tests/browser/out/. Skips, saying so,
//! where node, Chromium or playwright-core is missing (scripts/test
//! installs them).

use bandshare_agent::{identity, qos};
use bandshare_proto::v1;
use bandshare_testkit::{Cluster, SharerNode, SharerSpec, center};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser")
}

fn unavailable() -> Option<String> {
    let ok = |p: &str, a: &str| {
        std::process::Command::new(p)
            .arg(a)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ok("node", "--version") {
        return Some("node is not installed".into());
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Some(format!(
            "{chromium} is not installed (apt install chromium)"
        ));
    }
    if !browser_dir()
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return Some("playwright-core is not installed (cd tests/browser && npm ci)".into());
    }
    None
}

/// One page in Chromium, driven line by line (see tests/browser/page.mjs).
struct Page {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Page {
    async fn open(url: &str, shot: &Path) -> Page {
        let mut child = tokio::process::Command::new("node")
            .arg(browser_dir().join("page.mjs"))
            .arg(url)
            .arg(shot)
            .current_dir(browser_dir())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node");
        let stdin = child.stdin.take().expect("stdin");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut p = Page {
            child,
            stdin,
            lines,
        };
        let ready = p.next().await;
        assert_eq!(ready["ready"], true, "{ready}");
        p
    }

    async fn next(&mut self) -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .expect("the page answers within a minute")
            .expect("read")
            .expect("the page script ended early");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    async fn send(&mut self, cmd: &str) -> serde_json::Value {
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .expect("write");
        self.next().await
    }

    /// Waits until `selector`'s text matches `re` (no spaces in either);
    /// its last text.
    async fn wait(&mut self, selector: &str, re: &str, secs: u32) -> (bool, String) {
        assert!(
            !selector.contains(' ') && !re.contains(' '),
            "{selector} {re}"
        );
        let v = self.send(&format!("wait {selector} {re} {secs}")).await;
        (
            v["ok"] == true,
            v["text"].as_str().unwrap_or("").to_string(),
        )
    }

    /// Screenshot, then the console errors and off-loopback requests.
    async fn finish(mut self) -> (Vec<String>, Vec<String>) {
        let shot = self.send("shot").await;
        assert!(shot["shot"].is_string(), "{shot}");
        let end = self.send("quit").await;
        let list = |k: &str| -> Vec<String> {
            end[k]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
        (list("errors"), list("offsite"))
    }
}

fn out_dir() -> PathBuf {
    let d = browser_dir().join("out");
    std::fs::create_dir_all(&d).expect("out dir");
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_dashboard_live_in_a_browser() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    // Three sharers in one cell (k = 3: the cell is shown, as a count).
    let specs = (0..3)
        .map(|i| SharerSpec::new(&format!("s{i}"), 10.0 * i as f64, 0.0))
        .collect();
    let c = Cluster::start(specs).await.expect("cluster");
    // Three devices reported a short line (a published QoS cell or two).
    let ch = bandshare_agent::client::connect(&c.coordinator.url)
        .await
        .expect("channel");
    let now = bandshare_core::clock::unix_now() as f64;
    for d in 0..3 {
        let key = identity::generate().expect("key");
        let samples = (0..30)
            .map(|i| {
                let p = center().offset_m(i as f64 * 10.0, 0.0);
                v1::QosSample {
                    t_unix_ms: ((now - 600.0 + d as f64 * 60.0 + i as f64) * 1000.0) as u64,
                    lat: p.lat,
                    lon: p.lon,
                    duration_ms: 1000,
                    down_kbps: if i < 15 { 100.0 } else { 9000.0 },
                    ..Default::default()
                }
            })
            .collect();
        qos::observe(ch.clone(), &key, samples, |_| {})
            .await
            .expect("observe");
    }
    let shot = out_dir().join("coordinator.png");
    let url = format!("http://{}/", c.coordinator.http_addr);
    let mut page = Page::open(&url, &shot).await;
    let (ok, text) = page.wait("#online", "^3$", 15).await;
    assert!(ok, "online count on the page: {text:?}");
    let (ok, text) = page.wait("#conn", "^live$", 10).await;
    assert!(ok, "live events: {text:?}");
    // A fourth sharer comes online: the page follows without a reload.
    let _s = SharerNode::start(&c.coordinator.url, &SharerSpec::new("s3", 5.0, 5.0))
        .await
        .expect("sharer");
    let (ok, text) = page.wait("#online", "^4$", 15).await;
    assert!(ok, "online count after a sharer started: {text:?}");
    // A share request shows in the live figures.
    c.ask(
        bandshare_agent::location::LocationSpec {
            at: Some(center()),
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .expect("offers");
    let (ok, text) = page.wait("#success", "^100", 15).await;
    assert!(ok, "success rate: {text:?}");
    let (ok, text) = page.wait("#keys", "^signing", 15).await;
    assert!(ok, "trust panel: {text:?}");
    let (errors, offsite) = page.finish().await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    assert!(offsite.is_empty(), "requests off loopback: {offsite:?}");
    assert!(shot.exists());
    eprintln!("screenshot: {}", shot.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requester_page_shows_the_active_path_change_when_its_sharer_dies() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    let c = Cluster::start(vec![
        SharerSpec::new("alice", 5.0, 0.0),
        SharerSpec::new("bob", 10.0, 0.0),
    ])
    .await
    .expect("cluster");
    let r = c.requester(c.requester_options()).await.expect("requester");
    let control = r.requester.control_addr.expect("control");
    let shot = out_dir().join("requester.png");
    let mut page = Page::open(&format!("http://{control}/"), &shot).await;
    let (ok, first) = page.wait("#active", "^(alice|bob)$", 15).await;
    assert!(ok, "active sharer on the page: {first:?}");
    let (ok, text) = page.wait("#path", "pool", 5).await;
    assert!(ok, "path on the page: {text:?}");
    // The active sharer dies: the page shows the other one, with the
    // failover and its cause, without a reload.
    c.sharer(&first).expect("sharer").kill();
    let other = if first == "alice" { "bob" } else { "alice" };
    let (ok, text) = page.wait("#active", &format!("^{other}$"), 15).await;
    assert!(ok, "active after {first} died: {text:?}");
    let (ok, text) = page.wait("#failovers", &first, 10).await;
    assert!(ok, "failover listed: {text:?}");
    let (errors, offsite) = page.finish().await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    assert!(offsite.is_empty(), "requests off loopback: {offsite:?}");
    eprintln!("screenshot: {}", shot.display());
}
