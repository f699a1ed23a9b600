//! Operating `s4db-mount` as admins do (issue 11), through the real binary on real FUSE
//! mounts against moto: Prometheus metrics that move with the work, the systemd notify
//! protocol, start-up errors that say what to do, JSON logs, SIGUSR2 log levels, and
//! logs that never carry credentials or signatures.
//!
//! The start-up error tests that need a different system (no /dev/fuse, a read-only or
//! full local directory, a fuse.conf without `user_allow_other`) make it in a private
//! mount namespace (`unshare -m`), so nothing outside the test changes; they run as root.

mod common;

use common::mount::*;
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// ------------------------------------------------------------------ helpers

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").to_string()
}

/// One HTTP/1.1 GET; returns (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut conn = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply)
        .expect("read the HTTP reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// A scrape: `name{labels}` -> value.
type Scrape = BTreeMap<String, f64>;

fn scrape(addr: &str) -> Scrape {
    let (status, body) = http_get(addr, "/metrics");
    assert!(status.contains("200"), "GET /metrics: {status}\n{body}");
    assert!(
        body.trim_end().ends_with("# EOF"),
        "not OpenMetrics text:\n{body}"
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("line {l:?}"));
            (
                name.to_string(),
                value.parse().unwrap_or_else(|_| panic!("value in {l:?}")),
            )
        })
        .collect()
}

fn get(s: &Scrape, name: &str) -> f64 {
    s.get(name).copied().unwrap_or(0.0)
}

/// Waits for `child` to fail; returns its output (stdout and stderr) and exit code.
fn run_failing(mut cmd: Command, what: &str) -> String {
    let root = tempdir("out");
    let out_path = root.path().join("out");
    let out = fs::File::create(&out_path).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .env("LC_ALL", "C");
    let mut child = common::spawn_tied_to_process(cmd).expect("spawn");
    let status = wait_timeout(&mut child, MOUNT_TIMEOUT);
    let output = fs::read_to_string(&out_path).unwrap_or_default();
    let Some(status) = status else {
        let _ = child.kill();
        panic!("{what}: the daemon did not exit; expected a start-up error:\n{output}");
    };
    assert_eq!(
        status.code(),
        Some(2),
        "{what}: expected exit 2 with a message:\n{output}"
    );
    output
}

/// The daemon command as the harness builds it: moto, the launch's dirs, `-f`.
fn daemon_cmd(launch: &Launch<'_>, program: &str, pre: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(pre);
    common::command_env(&mut cmd, launch.db.moto);
    cmd.env_remove("S4DB_LOCAL_STORE")
        .env("XDG_CACHE_HOME", launch.root.path().join("xdg-cache"))
        .arg(daemon_bin())
        .args(["--endpoint-url", &launch.db.moto.endpoint])
        .args(["--region", common::REGION, "--force-path-style"])
        .arg("--local-dir")
        .arg(&launch.local_dir)
        .args(&launch.args)
        .arg("-f")
        .arg(launch.db.spec())
        .arg(&launch.mnt);
    cmd
}

/// `unshare -m sh -c 'SETUP; exec "$@"' sh s4db-mount ...`: the daemon in a private
/// mount namespace prepared by `setup`.
fn in_namespace(launch: &Launch<'_>, setup: &str) -> Command {
    require_root();
    let script = format!("set -e; {setup}; exec \"$@\"");
    daemon_cmd(
        launch,
        "unshare",
        &["-m", "--propagation", "private", "sh", "-c", &script, "sh"],
    )
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests build mount namespaces and switch users: run them as root"
    );
}

#[track_caller]
fn assert_says(output: &str, all_of: &[&str]) {
    for want in all_of {
        assert!(
            output.contains(want),
            "the message should contain {want:?}:\n{output}"
        );
    }
}

// ------------------------------------------------------------------ metrics

#[test]
fn metrics_move_with_the_work_done() {
    let db = Db::new();
    let addr = free_addr();
    let m = Mount::on(&db)
        .args(&["--metrics-addr", &addr, "--upload-delay", "never"])
        .start();
    let before = scrape(&addr);
    assert_eq!(get(&before, "s4db_keys"), 0.0, "{before:?}");
    assert!(
        get(&before, "s4db_resident_memory_bytes") > 1e6,
        "{before:?}"
    );
    // The start-up GET of the index (missing: a new database) is counted.
    assert!(
        get(
            &before,
            "s4db_s3_requests_total{op=\"get\",outcome=\"not_found\"}"
        ) >= 1.0,
        "{before:?}"
    );

    m.sh("for i in 1 2 3 4 5; do echo value-$i > key$i; done; cat key3 >/dev/null")
        .ok();
    m.sh("cat missing").fails();
    let wrote = scrape(&addr);
    let d = |name: &str| get(&wrote, name) - get(&before, name);
    assert!(
        d("s4db_fuse_requests_total{op=\"create\"}") >= 5.0,
        "{wrote:?}"
    );
    assert!(
        d("s4db_fuse_requests_total{op=\"write\"}") >= 5.0,
        "{wrote:?}"
    );
    assert!(d("s4db_fuse_written_bytes_total") >= 40.0, "{wrote:?}");
    assert!(
        d("s4db_fuse_errors_total{op=\"lookup\",errno=\"ENOENT\"}") >= 1.0,
        "{wrote:?}"
    );
    assert!(
        d("s4db_fuse_request_duration_seconds_count{op=\"write\"}") >= 5.0,
        "{wrote:?}"
    );
    assert_eq!(get(&wrote, "s4db_keys"), 5.0);
    assert!(get(&wrote, "s4db_unsynced_entries") >= 5.0, "{wrote:?}");
    assert!(get(&wrote, "s4db_unsynced_bytes") >= 40.0, "{wrote:?}");
    assert!(get(&wrote, "s4db_oldest_unsynced_write_age_seconds") > 0.0);
    assert_eq!(d("s4db_commits_total"), 0.0, "nothing published yet");
    let puts = |s: &Scrape| get(s, "s4db_s3_requests_total{op=\"put\",outcome=\"ok\"}");
    assert_eq!(puts(&wrote), puts(&before), "no PUT before the upload");

    m.upload();
    let up = scrape(&addr);
    assert!(
        puts(&up) >= puts(&wrote) + 2.0,
        "data file and index PUTs: {up:?}"
    );
    assert!(
        get(&up, "s4db_s3_sent_bytes_total{op=\"put\"}") > 40.0,
        "{up:?}"
    );
    assert_eq!(get(&up, "s4db_commits_total"), 1.0, "{up:?}");
    assert_eq!(
        get(&up, "s4db_uploads_total{outcome=\"ok\"}"),
        1.0,
        "{up:?}"
    );
    assert!(get(&up, "s4db_upload_files_total") >= 1.0, "{up:?}");
    assert!(get(&up, "s4db_upload_bytes_total") > 40.0, "{up:?}");
    assert!(
        get(&up, "s4db_last_upload_timestamp_seconds") > 1.6e9,
        "{up:?}"
    );
    assert_eq!(get(&up, "s4db_unsynced_entries"), 0.0, "{up:?}");
    assert_eq!(get(&up, "s4db_unsynced_bytes"), 0.0, "{up:?}");
    assert_eq!(get(&up, "s4db_oldest_unsynced_write_age_seconds"), 0.0);
    assert!(
        get(&up, "s4db_s3_request_duration_seconds_count{op=\"put\"}") >= 2.0,
        "{up:?}"
    );
    assert!(get(&up, "s4db_data_files") >= 1.0 && get(&up, "s4db_live_bytes") > 0.0);

    // Overwrite some keys and upload: two data files, one half dead; compaction
    // rewrites them into one.
    m.sh("for i in 1 2 3; do echo new-$i > key$i; done").ok();
    m.upload();
    m.control("compact").ok();
    let compacted = scrape(&addr);
    assert_eq!(
        get(&compacted, "s4db_compactions_total{outcome=\"ok\"}"),
        1.0,
        "{compacted:?}"
    );
    assert!(get(&compacted, "s4db_compaction_removed_objects_total") >= 1.0);
    assert!(get(&compacted, "s4db_compaction_removed_bytes_total") > 0.0);
    m.control("gc").ok();
    let gc = scrape(&addr);
    assert_eq!(
        get(&gc, "s4db_gc_runs_total{outcome=\"ok\"}"),
        1.0,
        "{gc:?}"
    );
    assert!(gc.contains_key("s4db_gc_removed_objects_total"), "{gc:?}");
    assert!(gc.contains_key("s4db_cache_hits_total") && gc.contains_key("s4db_cache_misses_total"));

    let (status, _) = http_get(&addr, "/other");
    assert!(status.contains("404"), "{status}");
    m.unmount();
}

#[test]
fn metrics_are_off_by_default_and_a_taken_port_fails_the_start() {
    let db = Db::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = Mount::on(&db)
        .args(&["-o", &format!("metrics_addr={addr}")])
        .run_to_failure(true);
    assert_says(
        &output,
        &[&format!("cannot serve metrics on {addr}"), "--metrics-addr"],
    );
    let m = Mount::on(&db).start();
    assert!(
        !m.output().contains("metrics at"),
        "no metrics server unless asked:\n{}",
        m.output()
    );
    m.unmount();
}

// ------------------------------------------------------------------ systemd

#[test]
fn systemd_notify_ready_once_mounted_and_stopping_at_unmount() {
    let db = Db::new();
    let launch = Mount::on(&db);
    let sock_path = launch.root.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut cmd = daemon_cmd(&launch, "env", &[]);
    cmd.env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stdout(fs::File::create(launch.output_path()).unwrap())
        .stderr(fs::File::create(launch.root.path().join("stderr")).unwrap());
    let child = common::spawn_tied_to_process(cmd).expect("spawn s4db-mount");
    let mnt = launch.mnt.clone();
    let mut mount = launch.into_mount(Daemon::Child(child));

    let mut messages: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut recv_until = |want: &str, messages: &mut Vec<String>, mount: &mut Mount| {
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = msg.lines().any(|l| l == want);
                messages.push(msg);
                if hit {
                    return;
                }
            }
            if let Daemon::Child(c) = &mut mount.daemon {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("daemon exited ({status}) before {want}: {messages:?}");
                }
            }
            assert!(Instant::now() < deadline, "no {want} in {messages:?}");
        }
    };
    recv_until("READY=1", &mut messages, &mut mount);
    // READY means usable: mounted, and answering.
    assert!(is_mounted(&mnt), "READY=1 before the mount: {messages:?}");
    let stats = mount.stats();
    assert_eq!(stats["keys"], 0);
    assert!(
        !messages.iter().any(|m| m.contains("STOPPING=1")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("STATUS=opening")),
        "a STATUS line before READY: {messages:?}"
    );
    assert!(
        messages.last().unwrap().contains("STATUS=mounted"),
        "{messages:?}"
    );
    mount.sh("echo hi > greeting").ok();
    let out = fusermount("-u", &mnt);
    assert!(out.status.success(), "{out:?}");
    recv_until("STOPPING=1", &mut messages, &mut mount);
    let ready = messages.iter().position(|m| m.contains("READY=1")).unwrap();
    let stopping = messages
        .iter()
        .position(|m| m.contains("STOPPING=1"))
        .unwrap();
    assert!(ready < stopping, "{messages:?}");
    if let Daemon::Child(c) = &mut mount.daemon {
        let status = wait_timeout(c, EXIT_TIMEOUT).expect("exits after the unmount");
        assert!(status.success(), "{status}: {}", mount.output());
    }
    db.assert_python_sees(&tree(&[("greeting", b"hi\n")]));
}

// ------------------------------------------------------------------ start-up errors

#[test]
fn no_dev_fuse_says_how_to_get_it() {
    let db = Db::new();
    let launch = Mount::on(&db);
    let empty = launch.root.path().join("not-fuse");
    fs::write(&empty, "").unwrap();
    let setup = format!("mount --bind {} /dev/fuse", q(&empty));
    let output = run_failing(in_namespace(&launch, &setup), "/dev/fuse is a plain file");
    assert_says(
        &output,
        &["/dev/fuse", "modprobe fuse", "--device /dev/fuse"],
    );
}

/// Makes `launch`'s mount point and local dir the other user's; returns (uid, gid).
fn give_to_other_user(launch: &Launch<'_>) -> (u32, u32) {
    let user = other_user();
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, user]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let (uid, gid) = (id("-u"), id("-g"));
    for dir in [&launch.mnt, &launch.local_dir] {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).unwrap();
    }
    (uid, gid)
}

#[test]
fn no_fusermount3_for_a_user_says_install_fuse3() {
    let db = Db::new();
    let launch = Mount::on(&db);
    let (uid, gid) = give_to_other_user(&launch);
    let setpriv = which("setpriv");
    let mut cmd = daemon_cmd(
        &launch,
        &setpriv,
        &[
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
        ],
    );
    cmd.env("PATH", "/nonexistent-bin");
    let output = run_failing(cmd, "no fusermount3 on PATH");
    assert_says(
        &output,
        &[
            "fusermount3 is not installed",
            "fuse3",
            "PATH=/nonexistent-bin",
        ],
    );
}

fn which(program: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!path.is_empty(), "{program} is not installed (util-linux)");
    path
}

#[test]
fn allow_other_without_user_allow_other_says_edit_fuse_conf() {
    let db = Db::new();
    let launch = Mount::on(&db).args(&["--allow-other"]);
    let (uid, gid) = give_to_other_user(&launch);
    let conf = launch.root.path().join("fuse.conf");
    fs::write(&conf, "# mount_max = 1000\n#user_allow_other\n").unwrap();
    let setpriv = which("setpriv");
    let setup = format!("mount --bind {} /etc/fuse.conf", q(&conf));
    let script = format!(
        "set -e; {setup}; exec {setpriv} --reuid={uid} --regid={gid} --clear-groups -- \"$@\""
    );
    let cmd = daemon_cmd(
        &launch,
        "unshare",
        &["-m", "--propagation", "private", "sh", "-c", &script, "sh"],
    );
    let output = run_failing(cmd, "allow_other without user_allow_other");
    assert_says(
        &output,
        &["--allow-other", "user_allow_other", "/etc/fuse.conf"],
    );
}

#[test]
fn a_nonempty_mountpoint_is_refused_unless_nonempty() {
    let db = Db::new();
    db.py_put(&tree(&[("from-s3", b"s3\n")]));
    let keep = tempdir("nonempty");
    let mnt = fs::canonicalize(keep.path()).unwrap().join("mnt");
    fs::create_dir(&mnt).unwrap();
    fs::write(mnt.join("precious.txt"), "mine").unwrap();
    let output = Mount::on(&db).mountpoint(&mnt).run_to_failure(true);
    assert_says(&output, &["not empty", "precious.txt", "--nonempty"]);
    // With -o nonempty it mounts over the file, which is back after the unmount.
    let m = Mount::on(&db)
        .mountpoint(&mnt)
        .args(&["-o", "nonempty"])
        .start();
    assert_eq!(m.read("from-s3"), b"s3\n");
    assert!(!m.path("precious.txt").exists());
    m.unmount();
    assert_eq!(fs::read(mnt.join("precious.txt")).unwrap(), b"mine");
}

#[test]
fn unreachable_s3_says_check_the_endpoint() {
    let db = Db::new();
    let closed = free_addr();
    let url = format!("http://{closed}");
    let output = Mount::on(&db)
        .args(&["-o", &format!("endpoint_url={url}")])
        .run_to_failure(true);
    assert_says(
        &output,
        &[
            "could not connect to",
            &closed,
            "S3 is not reachable",
            "--endpoint-url",
        ],
    );
}

/// A fake S3 that refuses every request as AWS does an unknown access key.
fn refusing_s3() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(64) {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InvalidAccessKeyId</Code>\
                        <Message>The AWS Access Key Id you provided does not exist in our records.</Message>\
                        <RequestId>S4DBTEST</RequestId></Error>";
            let _ = write!(
                conn,
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}")
}

#[test]
fn refused_credentials_say_check_them() {
    let db = Db::new();
    let url = refusing_s3();
    let output = Mount::on(&db)
        .args(&["-o", &format!("endpoint_url={url}")])
        .run_to_failure(true);
    assert_says(
        &output,
        &[
            "InvalidAccessKeyId",
            "S3 refused the credentials",
            "AWS_ACCESS_KEY_ID",
        ],
    );
}

#[test]
fn a_read_only_local_dir_says_pick_a_writable_one() {
    let db = Db::new();
    let launch = Mount::on(&db);
    let dir = q(&launch.local_dir);
    let setup = format!("mount --bind {dir} {dir}; mount -o remount,ro,bind {dir}");
    let output = run_failing(in_namespace(&launch, &setup), "read-only local dir");
    assert_says(
        &output,
        &[
            "read-only filesystem",
            &launch.local_dir.display().to_string(),
            "--local-dir",
        ],
    );
}

#[test]
fn a_full_local_dir_says_free_space() {
    let db = Db::new();
    let launch = Mount::on(&db);
    let dir = q(&launch.local_dir);
    let setup = format!(
        "mount -t tmpfs -o size=256k tmpfs {dir}; dd if=/dev/zero of={dir}/fill bs=4k 2>/dev/null || true"
    );
    let output = run_failing(in_namespace(&launch, &setup), "full local dir");
    assert_says(&output, &["is full", "free some space", "--local-dir"]);
}

// ------------------------------------------------------------------ logs

fn log_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn wait_for_log(path: &Path, want: &str) {
    let deadline = Instant::now() + MOUNT_TIMEOUT;
    while !log_lines(path).iter().any(|l| l.contains(want)) {
        assert!(
            Instant::now() < deadline,
            "no {want:?} in the log:\n{}",
            log_lines(path).join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn daemon_pid(m: &Mount) -> i32 {
    match &m.daemon {
        Daemon::Child(c) => c.id() as i32,
        Daemon::Detached => panic!("a foreground daemon"),
    }
}

#[test]
fn json_logs_and_sigusr2_cycles_the_log_level() {
    let db = Db::new();
    let root = tempdir("logs");
    let log = root.path().join("mount.log");
    let m = Mount::on(&db)
        .args(&["--log-format", "json", "--log-file", log.to_str().unwrap()])
        .start();
    wait_for_log(&log, "ready");
    let pid = daemon_pid(&m);
    let changes = || {
        log_lines(&log)
            .iter()
            .filter(|l| l.contains("log level is now"))
            .count()
    };
    for (i, level) in ["debug", "trace", "info", "debug"].iter().enumerate() {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGUSR2) };
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while changes() <= i {
            assert!(
                Instant::now() < deadline,
                "no level change {i}: {}",
                m.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let last = log_lines(&log)
            .into_iter()
            .rfind(|l| l.contains("log level is now"))
            .unwrap();
        assert!(
            last.contains(&format!("log level is now {level}")),
            "{last}"
        );
    }
    m.sh("cat missing-file || true").ok();
    m.unmount();
    let lines = log_lines(&log);
    assert!(lines.len() > 4, "{lines:?}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    // At debug (the last level), the failed lookup is logged.
    assert!(
        lines.iter().any(|l| l.contains("\"DEBUG\"")),
        "debug lines after SIGUSR2: {lines:?}"
    );
}

#[test]
fn debug_logs_carry_no_credentials_or_signatures() {
    const KEY_ID: &str = "AKIAS4DBLOGTEST00001";
    const SECRET: &str = "s4dbL0gSecretNeverPrintMe0123456789abcdef";
    let db = Db::new();
    for filter in [None, Some("debug"), Some("trace")] {
        let root = tempdir("secret-logs");
        let log = root.path().join("mount.log");
        let launch = Mount::on(&db).args(&["-d", "--log-file", log.to_str().unwrap()]);
        let mut cmd = daemon_cmd(&launch, "env", &[]);
        cmd.env("AWS_ACCESS_KEY_ID", KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .stdin(Stdio::null())
            .stdout(fs::File::create(launch.output_path()).unwrap())
            .stderr(fs::File::create(launch.root.path().join("stderr")).unwrap());
        match filter {
            Some(f) => cmd.env("S4DB_LOG", f),
            None => cmd.env_remove("S4DB_LOG"),
        };
        let child: Child = common::spawn_tied_to_process(cmd).expect("spawn");
        let mnt: PathBuf = launch.mnt.clone();
        let m = launch.into_mount(Daemon::Child(child));
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while !is_mounted(&mnt) {
            assert!(Instant::now() < deadline, "not mounted: {}", m.output());
            std::thread::sleep(Duration::from_millis(50));
        }
        if filter.is_none() {
            // And at trace, reached by SIGUSR2 (debug -> trace).
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(daemon_pid(&m), libc::SIGUSR2) };
            wait_for_log(&log, "log level is now trace");
        }
        m.sh("echo secret-test > k; cat k; ls -l").ok();
        m.upload();
        m.unmount();
        let text = fs::read_to_string(&log).unwrap();
        assert!(text.len() > 200, "a debug log was written:\n{text}");
        for leak in [SECRET, "X-Amz-Signature", "Signature=", "x-amz-signature"] {
            assert!(
                !text.contains(leak),
                "the log (S4DB_LOG={filter:?}) contains {leak:?}:\n{}",
                text.lines()
                    .filter(|l| l.contains(leak))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}
