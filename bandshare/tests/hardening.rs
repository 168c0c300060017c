//! Defects found by trying bandshare as a new user and as an attacker
//! would, each reproduced through the real binary: private data files,
//! names bound to keys, ghost streams, terminal injection, refusals that
//! end a sharer, config NaN, and the flags as users type them.

use bandshare_testkit::process::Process;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

const EXE: &str = env!("CARGO_BIN_EXE_bandshare");

fn bandshare_in(args: &[&str], envs: &[(&str, &str)], cwd: Option<&Path>) -> Output {
    bandshare_testkit::process::run_once(EXE, args, envs, cwd)
}

fn bandshare(args: &[&str]) -> Output {
    bandshare_in(args, &[], None)
}

/// One line on stderr containing `needle`, non-zero exit, no panic.
fn fails_with(args: &[&str], needle: &str) {
    bandshare_testkit::process::fails_with_one_line(EXE, args, needle);
}

fn server(data: &Path, extra: &[&str]) -> (Process, String) {
    let (p, grpc) = Process::server(EXE, "127.0.0.1:0", data, extra);
    (p, grpc.to_string())
}

fn sharer(url: &str, name: &str, data: &Path) -> Process {
    Process::bandshare(
        EXE,
        &[
            "share",
            "--server",
            url,
            "--name",
            name,
            "--at",
            "39.9042,116.4074",
            "--relay",
            "127.0.0.1:0",
            "--data",
            data.to_str().expect("utf-8"),
        ],
    )
    .expect("spawn sharer")
}

fn offers_json(url: &str) -> serde_json::Value {
    let out = bandshare(&[
        "offers",
        "--server",
        url,
        "--at",
        "39.9042,116.4074",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Security 1: the signing seed is in files only the owner can read, in a
/// new data directory and in one an older version left readable.
#[test]
fn the_data_directory_and_its_files_are_private() {
    let root = tempfile::tempdir().expect("tempdir");
    // Another user may walk to the data directory (as in a home directory).
    std::process::Command::new("chmod")
        .args(["0755"])
        .arg(root.path())
        .status()
        .expect("chmod");
    let fresh = root.path().join("fresh");
    let (mut s, _) = server(&fresh, &["--tls"]);
    assert!(s.wait_stderr("coordinator starting", Duration::from_secs(10)));
    let files = [
        "bandshare.db",
        "bandshare.db-wal",
        "bandshare.db-shm",
        "tls/key.der",
        "tls/cert.der",
    ];
    assert_eq!(mode(&fresh), 0o700, "data directory");
    assert_eq!(mode(&fresh.join("tls")), 0o700, "tls directory");
    for f in files {
        assert_eq!(mode(&fresh.join(f)), 0o600, "{f}");
    }
    s.signal("TERM");
    s.wait_exit(Duration::from_secs(5));

    // A directory an older version made 0755 with a 0644 database.
    let old = root.path().join("old");
    std::fs::create_dir(&old).expect("mkdir");
    bandshare_store::Store::open(&old).expect("store");
    for (p, m) in [(old.clone(), "0755"), (old.join("bandshare.db"), "0644")] {
        Command::new("chmod")
            .arg(m)
            .arg(&p)
            .status()
            .expect("chmod");
    }
    let (s, _) = server(&old, &[]);
    assert!(
        s.wait_stderr("tightened permissions", Duration::from_secs(5)),
        "{}",
        s.stderr()
    );
    assert_eq!(mode(&old), 0o700);
    assert_eq!(mode(&old.join("bandshare.db")), 0o600);

    // What another, unprivileged user sees: nothing.
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if !is_root || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIP: reading as another user needs root and setpriv");
        return;
    }
    for dir in [&fresh, &old] {
        for f in ["bandshare.db", "bandshare.db-wal", "tls/key.der"] {
            let p = dir.join(f);
            if !p.exists() {
                continue;
            }
            let out = Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
                .arg(&p)
                .output()
                .expect("setpriv");
            assert!(
                !out.status.success() && out.stdout.is_empty(),
                "nobody read {}",
                p.display()
            );
        }
    }
    // The check itself can fail: nobody reads a file left 0644 in the root.
    let readable = root.path().join("readable");
    std::fs::write(&readable, b"x").expect("write");
    Command::new("chmod")
        .arg("0644")
        .arg(&readable)
        .status()
        .expect("chmod");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(&readable)
        .output()
        .expect("setpriv");
    assert_eq!(out.stdout, b"x", "the unprivileged reader works");
}

/// Security 3 and reliability 11: a second device cannot take a name; it is
/// told why and exits non-zero instead of retrying forever. Requesters see
/// one row with the owner's key fingerprint.
#[test]
fn a_taken_name_is_refused_and_ends_the_second_sharer() {
    let data = tempfile::tempdir().expect("tempdir");
    let (_s, url) = server(&data.path().join("server"), &[]);
    let alpha = sharer(&url, "alpha", &data.path().join("a"));
    assert!(
        alpha.wait_stderr("online at coordinator", Duration::from_secs(15)),
        "{}",
        alpha.stderr()
    );
    for name in ["alpha", "ALPHA"] {
        let mut other = sharer(&url, name, &data.path().join(format!("b-{name}")));
        let status = other
            .wait_exit(Duration::from_secs(15))
            .expect("the impostor exits by itself");
        let err = other.stderr();
        assert!(!status.success(), "{err}");
        assert!(err.contains("belongs to another device"), "{err}");
    }
    let v = offers_json(&url);
    let rows = v["offers"].as_array().expect("offers");
    assert_eq!(rows.len(), 1, "{v}");
    let key = rows[0]["key"].as_str().expect("key fingerprint");
    assert_eq!(key.len(), 16, "{key}");
    // Sharers coming online are recorded together, within a fraction of
    // a second (see `durable::SEEN_COALESCE`).
    let mut list = String::new();
    for _ in 0..50 {
        let out = bandshare(&[
            "admin",
            "--data",
            data.path().join("server").to_str().expect("utf-8"),
            "list",
        ]);
        list = String::from_utf8_lossy(&out.stdout).into_owned();
        if list
            .lines()
            .any(|l| l.starts_with(key) && l.ends_with("alpha"))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("alpha is not listed within 5 s:\n{list}");
}

/// Security 4: a second stream with the same key ends the first, and the
/// first process says why and stops.
#[test]
fn a_second_stream_of_the_same_key_ends_the_first() {
    let data = tempfile::tempdir().expect("tempdir");
    let (_s, url) = server(&data.path().join("server"), &[]);
    let key_dir = data.path().join("a");
    let mut first = sharer(&url, "alpha", &key_dir);
    assert!(
        first.wait_stderr("online at coordinator", Duration::from_secs(15)),
        "{}",
        first.stderr()
    );
    let second = sharer(&url, "alpha", &key_dir);
    assert!(
        second.wait_stderr("online at coordinator", Duration::from_secs(15)),
        "{}",
        second.stderr()
    );
    let status = first
        .wait_exit(Duration::from_secs(10))
        .expect("the replaced sharer stops");
    let err = first.stderr();
    assert!(!status.success() && err.contains("replaced"), "{err}");
    let v = offers_json(&url);
    assert_eq!(v["offers"].as_array().map(Vec::len), Some(1), "{v}");
}

/// Security 5: control characters never reach a terminal: the CLI refuses
/// such a name, the coordinator refuses it from any client, and `admin
/// list` escapes what a store holds anyway.
#[test]
fn names_with_control_characters_are_refused_and_escaped() {
    for name in ["evil\x1b[2J", "two\nlines", "", &"x".repeat(65)] {
        let out = bandshare(&[
            "share",
            "--server",
            "127.0.0.1:1",
            "--name",
            name,
            "--at",
            "1,2",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("--name"),
            "{name:?}: {err}"
        );
        assert!(!err.contains('\x1b'), "{err:?}");
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let c = bandshare_testkit::CoordinatorNode::start(bandshare_testkit::exact_config())
            .await
            .expect("coordinator");
        for name in ["evil\x1b]0;pwned\x07", "a\u{202e}b", "row\n1  fake"] {
            let e = bandshare_testkit::MuteSharer::attach(&c.url, name)
                .await
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
            assert!(e.contains("sharer name refused"), "{name:?}: {e}");
        }
        assert_eq!(c.online(), 0);
    });
    let data = tempfile::tempdir().expect("tempdir");
    let store = bandshare_store::Store::open(data.path()).expect("store");
    store
        .upsert_device(
            &bandshare_core::DeviceKey([7; 32]),
            "x\x1b[2Jy\nz",
            bandshare_store::Role::Sharer,
            1,
        )
        .expect("device");
    let out = bandshare(&[
        "admin",
        "--data",
        data.path().to_str().expect("utf-8"),
        "list",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        !text.contains('\x1b') && text.contains("x\\u{1b}[2Jy\\u{a}z"),
        "{text:?}"
    );
    assert_eq!(text.lines().count(), 2, "no fake rows: {text:?}");
}

/// Reliability 12: NaN and infinities in the config are refused with the key.
#[test]
fn non_finite_config_values_stop_the_server_with_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "[scenes.outdoor]\nradius_m = nan\n").expect("write");
    let d = dir.path().join("data");
    fails_with(
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--config",
            cfg.to_str().expect("utf-8"),
            "--data",
            d.to_str().expect("utf-8"),
        ],
        "scenes.outdoor.radius_m",
    );
}

/// The CLI as users type it: 13 (--wifi), 14 (negative coordinates),
/// 15 (empty XDG_DATA_HOME), 16 (silent acceptance).
#[test]
fn flags_as_users_type_them() {
    let s = "127.0.0.1:1";
    // --wifi reaches the request instead of panicking.
    fails_with(
        &[
            "offers",
            "--server",
            s,
            "--wifi",
            "aa:bb:cc:dd:ee:ff=-60,00:11:22:33:44:55=-71",
            "--scene",
            "indoor",
        ],
        "cannot reach coordinator",
    );
    fails_with(&["offers", "--server", s, "--wifi", "aa:bb=-60"], "BSSID");
    // Negative coordinates after a space.
    fails_with(
        &["offers", "--server", s, "--at", "-33.8688,151.2093"],
        "cannot reach coordinator",
    );
    fails_with(
        &["offers", "--server", s, "--at", "40.7,-74.0,-5"],
        "cannot reach coordinator",
    );
    // Silent acceptance.
    let share = |extra: &[&str]| {
        let mut a = vec!["share", "--server", s, "--name", "x", "--at", "1,2"];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    for (extra, needle) in [
        (vec!["--services", ""], "no service given"),
        (vec!["--advertise", "0.0.0.0:0"], "cannot be dialled"),
        (vec!["--advertise", "192.0.2.1:0"], "cannot be dialled"),
        (vec!["--allow-egress", "::1:8000"], "[::1]:8000"),
    ] {
        let args = share(&extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&args, needle);
    }
    fails_with(
        &["offers", "--server", s, "--at", "1,2", "--want", ","],
        "no service given",
    );

    // An empty XDG_DATA_HOME is unset: keys go under $HOME, not ./bandshare.
    let cwd = tempfile::tempdir().expect("tempdir");
    let home = tempfile::tempdir().expect("tempdir");
    let out = bandshare_in(
        &[
            "connect",
            "--server",
            s,
            "--at",
            "1,2",
            "--socks",
            "127.0.0.1:0",
        ],
        &[
            ("XDG_DATA_HOME", ""),
            ("HOME", home.path().to_str().expect("utf-8")),
        ],
        Some(cwd.path()),
    );
    assert!(!out.status.success());
    assert!(
        !cwd.path().join("bandshare").exists(),
        "a relative data directory was made"
    );
    assert!(
        home.path()
            .join(".local/share/bandshare/requester/device.key")
            .exists()
    );
}

/// Every documented flag of every long-running subcommand, given a valid
/// value, through the binary: each starts and does its job.
#[test]
fn every_flag_of_every_subcommand_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |s: &str| dir.path().join(s).to_str().expect("utf-8").to_string();
    std::fs::write(p("server.toml"), "[match]\nfanout = 4\n").expect("config");
    // A PEM certificate and key for --tls-cert/--tls-key.
    let pem = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=bandshare",
            "-keyout",
        ])
        .arg(p("key.pem"))
        .arg("-out")
        .arg(p("cert.pem"))
        .output();
    let have_pem = pem.is_ok_and(|o| o.status.success());
    let (cert, key) = (p("cert.pem"), p("key.pem"));
    let cfg = p("server.toml");
    let mut server_args = vec!["--config", cfg.as_str(), "--enroll", "open", "--tls"];
    if have_pem {
        server_args.extend_from_slice(&["--tls-cert", cert.as_str(), "--tls-key", key.as_str()]);
    } else {
        eprintln!("SKIP --tls-cert/--tls-key: openssl is not installed");
    }
    let (_s, grpc) = server(&dir.path().join("data"), &server_args);
    let https = format!("https://{grpc}");
    let pin = if have_pem {
        let der = Command::new("openssl")
            .args(["x509", "-outform", "der", "-in", cert.as_str()])
            .output()
            .expect("openssl");
        let digest = Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().expect("stdin").write_all(&der.stdout)?;
                c.wait_with_output()
            })
            .expect("sha256sum");
        String::from_utf8_lossy(&digest.stdout)[..64].to_string()
    } else {
        let out = bandshare(&["admin", "--data", &p("data"), "pin"]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let target = bandshare_testkit::process::Process::spawn({
        let mut c = Command::new("python3");
        c.args(["-c", "import socket,time\ns=socket.socket();s.bind(('127.0.0.1',0));s.listen();print('listening target=127.0.0.1:%d'%s.getsockname()[1],flush=True);time.sleep(60)"]);
        c
    });
    let target = match target {
        Ok(t) => t,
        Err(e) => panic!("python3: {e}"),
    };
    let target_addr = target
        .addr("target", Duration::from_secs(10))
        .expect("target")
        .to_string();
    std::fs::write(
        p("consent.toml"),
        "max_requesters = 4\n[per_requester]\nrate = \"2 MB/s\"\n",
    )
    .expect("consent");
    std::fs::create_dir(p("power")).expect("power supply dir");
    let relay_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("udp")
        .port();
    let relay = format!("127.0.0.1:{relay_port}");
    let allow = format!("127.0.0.1/32:{}", &target_addr[10..]);
    std::fs::write(
        p("track.csv"),
        "time,lat,lon\n1000,39.9042,116.4074\n1001,,\n1002,39.9042,116.4074\n",
    )
    .expect("track");
    let (track, track_start) = (
        p("track.csv"),
        bandshare_core::clock::unix_now().to_string(),
    );
    let location = [
        "--at",
        "39.9042,116.4074,44",
        "--replay-track",
        track.as_str(),
        "--replay-start",
        track_start.as_str(),
        "--gpsd",
        "127.0.0.1:1",
        "--wifi-scan",
        "bandshare-none0",
        "--scene",
        "outdoor",
        "--heading",
        "90",
        "--speed",
        "0.5",
        "--wifi",
        "aa:bb:cc:dd:ee:ff=-60",
        "--cell",
        "460-00-1-2",
        "--router",
        "aa:bb:cc:dd:ee:01",
        "--accuracy",
        "5",
    ];
    let (sdata, consent, power) = (p("sharer"), p("consent.toml"), p("power"));
    let mut share_args = vec![
        "share",
        "--server",
        https.as_str(),
        "--server-pin",
        pin.as_str(),
        "--name",
        "every-flag",
    ];
    share_args.extend_from_slice(&location);
    share_args.extend_from_slice(&[
        "--services",
        "hotspot,5ghz",
        "--network",
        "5g",
        "--security",
        "wpa3",
        "--relay",
        relay.as_str(),
        "--advertise",
        relay.as_str(),
        "--allow-egress",
        allow.as_str(),
        "--bandwidth-mbps",
        "100",
        "--max-requesters",
        "3",
        "--consent",
        consent.as_str(),
        "--power-supply",
        power.as_str(),
        "--uplink",
        "lo",
        "--uplink-check",
        target_addr.as_str(),
        "--control",
        "127.0.0.1:0",
        "--data",
        sdata.as_str(),
    ]);
    let sharer = Process::bandshare(EXE, &share_args).expect("spawn sharer");
    assert_eq!(
        sharer
            .addr("relay", Duration::from_secs(15))
            .map(|a| a.to_string()),
        Ok(relay.clone())
    );
    assert!(
        sharer.wait_stderr("online at coordinator", Duration::from_secs(15)),
        "{}",
        sharer.stderr()
    );
    assert!(
        sharer.addr("control", Duration::from_secs(5)).is_ok(),
        "share --control: {}",
        sharer.stderr()
    );
    let rdata = p("requester");
    let mut offers_args = vec![
        "offers",
        "--server",
        https.as_str(),
        "--server-pin",
        pin.as_str(),
    ];
    offers_args.extend_from_slice(&location);
    offers_args.extend_from_slice(&[
        "--want",
        "hotspot",
        "--network",
        "5g",
        "--security",
        "wpa2",
        "--json",
        "--explain",
        "--data",
        rdata.as_str(),
    ]);
    let out = bandshare(&offers_args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("every-flag"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let forward = format!("127.0.0.1:0={target_addr}");
    let mut connect_args = vec![
        "connect",
        "--server",
        https.as_str(),
        "--server-pin",
        pin.as_str(),
    ];
    connect_args.extend_from_slice(&location);
    connect_args.extend_from_slice(&[
        "--want",
        "hotspot",
        "--network",
        "5g",
        "--security",
        "wpa3",
        "--via",
        "auto",
        "--pool",
        "2",
        "--standby",
        "1",
        "--probe",
        "127.0.0.1:1",
        "--direct-hold",
        "10",
        "--direct-max-rtt-ms",
        "500",
        "--direct-max-loss",
        "0.2",
        "--predict-lead",
        "15",
        "--predict-tail",
        "12",
        "--strategy",
        "lowest-rtt",
        "--socks",
        "127.0.0.1:0",
        "--forward",
        forward.as_str(),
        "--control",
        "127.0.0.1:0",
        "--data",
        rdata.as_str(),
    ]);
    let connect = Process::bandshare(EXE, &connect_args).expect("spawn connect");
    for key in ["socks", "forward", "control"] {
        connect
            .addr(key, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let control = connect
        .addr("control", Duration::from_secs(1))
        .expect("control");
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .arg(format!("http://{control}/status"))
        .output()
        .expect("curl");
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains("every-flag"), "{status}");
    assert!(status.contains(r#""lead_s":15.0"#), "{status}");
    assert!(status.contains(r#""tail_s":12.0"#), "{status}");
    drop(target);
}

/// CPU time (user + system) of `pid` so far, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// Waits until `p` says it is out of descriptors, then asserts it used
/// under half a core over the next 2 s (it backs off instead of spinning).
fn exhausted_without_spinning(p: &Process, what: &str) {
    assert!(
        p.wait_stderr("out of file descriptors", Duration::from_secs(5)),
        "{}",
        p.stderr()
    );
    let pid = p.child.id();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(pid) - before;
    assert!(
        spent < 100,
        "the {what} spun: {spent} ticks of CPU in 2 s while out of descriptors"
    );
}

/// Runs `f` every 500 ms until it holds, at most `tries` times.
fn eventually(tries: usize, mut f: impl FnMut() -> bool) -> bool {
    (0..tries).any(|_| {
        f() || {
            std::thread::sleep(Duration::from_millis(500));
            false
        }
    })
}

/// `bandshare ARGS` with at most `fds` open files.
fn limited(fds: u32, args: &[&str]) -> Process {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit -n {fds} && exec \"$0\" \"$@\""))
        .arg(EXE)
        .args(args)
        .env("RUST_LOG", "info");
    Process::spawn(cmd).expect("spawn under ulimit")
}

fn idle_connections(to: std::net::SocketAddr, from: &str, n: usize) -> Vec<std::net::TcpStream> {
    let from: std::net::IpAddr = from.parse().expect("ip");
    (0..n)
        .filter_map(|_| {
            let s = socket2_connect(from, to)?;
            Some(s)
        })
        .collect()
}

/// A TCP connection from a chosen loopback address (127.0.0.0/8 is all ours).
fn socket2_connect(
    from: std::net::IpAddr,
    to: std::net::SocketAddr,
) -> Option<std::net::TcpStream> {
    // std cannot bind before connect; a short Python-free way is to let the
    // kernel pick for 127.0.0.1 and use a bound socket otherwise.
    if from == std::net::IpAddr::from([127, 0, 0, 1]) {
        return std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok();
    }
    let sock = tokio::net::TcpSocket::new_v4().ok()?;
    sock.bind(std::net::SocketAddr::new(from, 0)).ok()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let s = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(2), sock.connect(to)).await })
        .ok()?
        .ok()?;
    s.into_std().ok().inspect(|s| {
        let _ = s.set_nonblocking(false);
    })
}

/// Connections waiting in the accept queue of the IPv4 listener on
/// `port` (`/proc/net/tcp`: for a listening socket, `rx_queue` is that
/// queue's length); `None` when there is no such listener.
fn accept_queue(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local_port = f.get(1)?.rsplit(':').next()?;
        let listening = f.get(3) == Some(&"0A");
        if !listening || u16::from_str_radix(local_port, 16).ok()? != port {
            return None;
        }
        u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()
    })
}

/// Waits (at most 5 s) until the listeners on `ports` have accepted
/// every connection made to them.
fn all_accepted(ports: &[u16]) -> bool {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        if ports.iter().all(|p| accept_queue(*p) == Some(0)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Whether the peer closed `s` within `within`.
fn closed_by_peer(s: &mut std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read;
    let _ = s.set_read_timeout(Some(within));
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0))
        || matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

/// Reliability 8: idle connections that never speak are closed, one
/// address cannot hold more than its share, and a coordinator out of file
/// descriptors backs off instead of spinning, and serves again after.
#[test]
fn idle_connections_and_fd_exhaustion_do_not_stop_the_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "[server]\nmax_connections_per_source = 100000\n").expect("config");
    let data = dir.path().join("data");
    let server = limited(
        128,
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data",
            data.to_str().expect("utf-8"),
            "--config",
            cfg.to_str().expect("utf-8"),
        ],
    );
    let grpc = server.addr("grpc", Duration::from_secs(20)).expect("grpc");
    let http = server.addr("http", Duration::from_secs(1)).expect("http");
    // 1. A connection that sends nothing is closed after the 10 s deadline.
    let mut silent = std::net::TcpStream::connect(http).expect("connect http");
    let mut silent_grpc = std::net::TcpStream::connect(grpc).expect("connect grpc");
    // Accepted (their deadlines running) before the descriptors run out;
    // on a busy machine the accept loop may not have run yet.
    assert!(
        all_accepted(&[http.port(), grpc.port()]),
        "the silent connections were never accepted"
    );
    // 2. Exhaust the descriptors: far more idle connections than 128.
    let held = idle_connections(grpc, "127.0.0.1", 300);
    assert!(held.len() > 128, "only {} connections", held.len());
    exhausted_without_spinning(&server, "coordinator");
    // Once per listener (gRPC and HTTP each accept on their own).
    let warned = server.stderr().matches("out of file descriptors").count();
    assert!((1..=2).contains(&warned), "warned {warned} times");
    assert!(
        closed_by_peer(&mut silent, Duration::from_secs(12)),
        "silent HTTP connection kept"
    );
    assert!(
        closed_by_peer(&mut silent_grpc, Duration::from_secs(3)),
        "silent gRPC connection kept"
    );
    drop(held);
    // 3. It serves again.
    let url = grpc.to_string();
    let ok = eventually(40, || {
        bandshare(&["offers", "--server", &url, "--at", "39.9,116.4", "--json"])
            .status
            .success()
    });
    assert!(
        ok,
        "offers never succeeded after the exhaustion\n{}",
        server.stderr()
    );
    assert!(server.wait_stderr("accepting connections again", Duration::from_secs(5)));
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .arg(format!("http://{http}/status"))
        .output()
        .expect("curl");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert!(v["connections_silent"].as_u64().unwrap_or(0) >= 2, "{v}");
}

#[test]
fn one_address_cannot_hold_all_the_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "[server]\nmax_connections_per_source = 8\n").expect("config");
    let data = dir.path().join("data");
    let (_s, url) = server(&data, &["--config", cfg.to_str().expect("utf-8")]);
    let grpc: std::net::SocketAddr = url.parse().expect("addr");
    let mut held = idle_connections(grpc, "127.0.0.2", 8);
    assert_eq!(held.len(), 8);
    let mut over = socket2_connect("127.0.0.2".parse().expect("ip"), grpc).expect("connect");
    assert!(
        closed_by_peer(&mut over, Duration::from_secs(2)),
        "the 9th connection was kept"
    );
    // Another address is served meanwhile.
    let v = offers_json(&url);
    assert!(v["offers"].is_array(), "{v}");
    // The eight are still open (they are closed only by the 10 s deadline).
    assert!(!closed_by_peer(&mut held[0], Duration::from_millis(200)));
}

/// Reliability 8, the requester: out of descriptors its proxy port backs
/// off instead of spinning at 100 % CPU, and serves again afterwards.
#[test]
fn the_requester_survives_fd_exhaustion_on_its_proxy_port() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cluster = rt
        .block_on(bandshare_testkit::Cluster::start(vec![
            bandshare_testkit::SharerSpec::new("alice", 5.0, 0.0),
        ]))
        .expect("cluster");
    let data = tempfile::tempdir().expect("tempdir");
    let at = format!(
        "{},{}",
        bandshare_testkit::CENTER.0,
        bandshare_testkit::CENTER.1
    );
    let r = limited(
        64,
        &[
            "connect",
            "--server",
            cluster.coordinator.url.as_str(),
            "--at",
            &at,
            "--pool",
            "1",
            "--socks",
            "127.0.0.1:0",
            "--data",
            data.path().to_str().expect("utf-8"),
        ],
    );
    let socks = r.addr("socks", Duration::from_secs(20)).expect("socks");
    let held = idle_connections(socks, "127.0.0.1", 120);
    exhausted_without_spinning(&r, "requester");
    drop(held);
    let url = format!("http://localhost:{}/after", cluster.target.addr.port());
    let ok = eventually(30, || {
        let out = Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "5",
                "--socks5-hostname",
                &socks.to_string(),
                &url,
            ])
            .output()
            .expect("curl");
        out.status.success()
    });
    assert!(ok, "no flow after the exhaustion\n{}", r.stderr());
}

/// `bandshare bench …` with every flag, at the smallest sizes: each runs
/// and prints one JSON object last (the figures themselves are for
/// BENCHMARKS.md, not for tests).
#[test]
fn every_bench_runs_with_every_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svg = dir.path().join("plot.svg");
    let svg = svg.to_str().expect("utf-8");
    let runs: [&[&str]; 7] = [
        &[
            "bench",
            "match",
            "--sharers",
            "1000",
            "--seconds",
            "0.2",
            "--concurrency",
            "1",
            "--no-redis",
            "--json",
            "--plot",
            svg,
            "--plot-sizes",
            "500,1000",
        ],
        &[
            "bench",
            "relay",
            "--seconds",
            "0.2",
            "--rounds",
            "3",
            "--json",
        ],
        &[
            "bench",
            "scale",
            "--sharers",
            "50",
            "--connections",
            "1",
            "--report-interval-ms",
            "100",
            "--seconds",
            "0.3",
            "--concurrency",
            "1",
            "--json",
        ],
        &[
            "bench",
            "scale",
            "--sharers",
            "50",
            "--report-interval-ms",
            "100",
            "--seconds",
            "0.3",
            "--concurrency",
            "1",
            "--real-connections",
            "--restart",
            "--busy-core",
            "--generator-nice",
            "10",
            "--json",
        ],
        &["bench", "failover", "--rounds", "1", "--json"],
        &[
            "bench",
            "scaleout",
            "--sharers",
            "200",
            "--seconds",
            "0.3",
            "--concurrency",
            "1",
            "--asks",
            "20",
            "--json",
        ],
        &[
            "bench",
            "tun",
            "--mbytes",
            "2",
            "--udp-rounds",
            "20",
            "--json",
        ],
    ];
    for args in runs {
        let out = bandshare(args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let last = text.lines().last().unwrap_or_default();
        let v: serde_json::Value =
            serde_json::from_str(last).unwrap_or_else(|e| panic!("{args:?}: {e}: {last}"));
        assert!(v["machine"].is_string(), "{args:?}: {v}");
        if args.contains(&"--restart") {
            // Every sharer came back after the coordinator was killed.
            assert_eq!(v["restart"]["back_online"], 50, "{args:?}: {v}");
            assert_eq!(v["connections"], 50, "{args:?}: {v}");
        }
    }
    let plot = std::fs::read_to_string(dir.path().join("plot.svg")).expect("the plot");
    assert!(plot.contains("<svg"), "{plot}");
}
