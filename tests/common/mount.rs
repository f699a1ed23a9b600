//! The mount harness shared by the FUSE test binaries (`tests/mount.rs`, `tests/posix.rs`):
//! a database on the shared moto server ([`Db`]), a daemon to configure and start
//! ([`Launch`]), a mounted `s4db-mount` that never outlives a failing test ([`Mount`]),
//! shell commands with readable failures ([`Sh`], [`sh_in`]) and directory trees ([`Tree`]).
//!
//! A missing /dev/fuse or fusermount3 is a failure, never a skip.

use super::{noise, Moto, Py, PyValue};
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a daemon may take to show its mount, or to fail.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a daemon may take to exit after an unmount (it uploads pending writes first).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a background upload (`--upload-delay`, daemon-mode unmount) may take to show.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// A shell command still running after this long is stuck on a hung FUSE request.
pub const COMMAND_TIMEOUT_SECS: &str = "60";
/// Bytes that are not UTF-8 (0xff never appears in UTF-8), with NULs and a newline.
pub const BINARY: &[u8] = b"\x00\x01\xffbinary\xfe\x00\n";
/// Where a daemon's stdout and stderr go, in its mount's temp root.
pub const DAEMON_OUT: &str = "daemon.out";
/// The unprivileged user of the allow-other test (created when missing).
pub const OTHER_USER: &str = "s4dbtest";

/// Relative path -> file content: a directory tree, a database, or a model of either.
pub type Tree = BTreeMap<String, Vec<u8>>;

// ------------------------------------------------------------------ tools

/// The daemon under test (cargo builds it for the integration tests).
pub fn daemon_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_s4db-mount"))
}

/// FUSE must work here: no /dev/fuse or no fusermount3 fails the test, loudly.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the mount tests need FUSE \
         (in a container: --device /dev/fuse --cap-add SYS_ADMIN)"
    );
    require_program("fusermount3", "fuse3");
}

/// Panics unless `program` runs; names the Debian package to install.
pub fn require_program(program: &str, package: &str) {
    let ran = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        ran.is_ok(),
        "{program} is not installed: `apt-get install {package}` (scripts/test.sh does)"
    );
}

/// `fusermount3 FLAGS MOUNTPOINT`.
pub fn fusermount(flag: &str, mnt: &Path) -> std::process::Output {
    Command::new("fusermount3")
        .arg(flag)
        .arg(mnt)
        .env("LC_ALL", "C")
        .output()
        .expect("run fusermount3")
}

/// Whether `/proc/self/mountinfo` lists `mnt` as a mount point.
pub fn is_mounted(mnt: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    let want = mnt.as_os_str().as_bytes();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|field| unescape_mountinfo(field) == want)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
pub fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(u8::is_ascii_digit));
        match octal {
            Some(d) if b[i] == b'\\' => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of running `s4db-mount` processes with `mnt` among their arguments: how a
/// daemonized (not our child) daemon is found, to wait for it or clean it up.
pub fn daemon_pids(mnt: &Path) -> Vec<i32> {
    let want = mnt.as_os_str().as_bytes();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            // "s4db-mount (deleted)" once the binary is rebuilt under a running daemon.
            let name = exe.file_name().unwrap_or_default().as_bytes();
            name.starts_with(b"s4db-mount")
                && cmdline.split(|&b| b == 0).any(|arg| arg == want)
                && !is_zombie(*pid)
        })
        .collect()
}

/// A process that has exited but was not reaped yet (our daemonized daemon's reaper is
/// not us) counts as gone.
pub fn is_zombie(pid: i32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // "pid (comm) S ...": the state follows the last ')'.
    match stat.rfind(')') {
        Some(i) => stat[i + 1..].trim_start().starts_with(['Z', 'X']),
        None => true,
    }
}

pub fn tempdir(what: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("s4db-mount-test-{what}-"))
        .tempdir_in("/tmp")
        .expect("create temp dir");
    // Traversable by everyone: the allow-other test reads through it as another user.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    dir
}

/// Single-quotes `p` for `sh`.
pub fn q(p: &Path) -> String {
    let s = p.to_str().expect("UTF-8 path");
    format!("'{}'", s.replace('\'', r"'\''"))
}

// ------------------------------------------------------------------ shell

/// What one shell command did.
pub struct Sh {
    pub script: String,
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl std::fmt::Debug for Sh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let code = match self.code {
            Some(124) => "124 (timed out: a hung FUSE request?)".to_string(),
            Some(c) => c.to_string(),
            None => "killed by a signal".to_string(),
        };
        let stdout = String::from_utf8_lossy(&self.stdout);
        let shown: String = stdout.chars().take(2000).collect();
        write!(
            f,
            "`{}`: exit {code}\n--- stdout ---\n{shown}\n--- stderr ---\n{}",
            self.script, self.stderr
        )
    }
}

impl Sh {
    /// Asserts exit 0.
    #[track_caller]
    pub fn ok(self) -> Sh {
        assert_eq!(self.code, Some(0), "command failed: {self:?}");
        self
    }

    /// Asserts a failure whose stderr contains one of `any_of` (errno texts, e.g.
    /// "Read-only file system").
    #[track_caller]
    pub fn fails_with(self, any_of: &[&str]) -> Sh {
        assert!(
            self.code != Some(0) && any_of.iter().any(|m| self.stderr.contains(m)),
            "expected a failure with one of {any_of:?}: {self:?}"
        );
        self
    }

    /// Asserts a non-zero exit (any errno).
    #[track_caller]
    pub fn fails(self) -> Sh {
        assert!(self.code != Some(0), "expected a failure: {self:?}");
        self
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("stdout is UTF-8")
    }
}

/// `sh -ec SCRIPT` in `dir` with C-locale messages, killed after [`COMMAND_TIMEOUT_SECS`].
pub fn sh_in(dir: &Path, script: &str) -> Sh {
    let out = Command::new("timeout")
        .args(["-k", "5", COMMAND_TIMEOUT_SECS, "sh", "-ec", script])
        .current_dir(dir)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .expect("run sh");
    Sh {
        script: script.to_string(),
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ------------------------------------------------------------------ trees

pub fn tree(items: &[(&str, &[u8])]) -> Tree {
    items
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect()
}

/// Every regular file under `dir` by relative path (`.s4db` at the top is skipped).
pub fn read_tree(dir: &Path) -> Tree {
    fn walk(base: &Path, dir: &Path, out: &mut Tree) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {dir:?}: {e}")) {
            let entry = entry.expect("dir entry");
            let path = entry.path();
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_str()
                .expect("UTF-8 name");
            if rel == ".s4db" {
                continue;
            }
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                walk(base, &path, out);
            } else {
                let data = fs::read(&path).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
                out.insert(rel.to_string(), data);
            }
        }
    }
    let mut out = Tree::new();
    walk(dir, dir, &mut out);
    out
}

pub fn write_tree(dir: &Path, tree: &Tree) {
    for (rel, data) in tree {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().unwrap()).expect("create parent dirs");
        fs::write(&path, data).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
    }
}

/// The tree with every path under `prefix/`.
pub fn prefixed(prefix: &str, tree: &Tree) -> Tree {
    tree.iter()
        .map(|(k, v)| (format!("{prefix}/{k}"), v.clone()))
        .collect()
}

/// How a value comes back from Python: `str` if it is UTF-8, else `bytes`.
pub fn py_value(data: &[u8]) -> PyValue {
    match std::str::from_utf8(data) {
        Ok(s) => PyValue::Text(s.to_string()),
        Err(_) => PyValue::Bytes(data.to_vec()),
    }
}

pub fn as_py(tree: &Tree) -> BTreeMap<String, PyValue> {
    tree.iter().map(|(k, v)| (k.clone(), py_value(v))).collect()
}

/// The kinds of files people keep: text, binary, empty, deep, large, unicode, spaces.
pub fn sample_tree() -> Tree {
    let mut t = tree(&[
        ("README.txt", b"hello\n"),
        ("bin/blob.bin", BINARY),
        ("empty", b""),
        ("a/b/c/deep.txt", b"deep\n"),
        ("unicode/\u{65e5}\u{672c}.txt", "\u{5024}\n".as_bytes()),
        ("spaces in name.txt", b"x"),
    ]);
    t.insert("big.bin".into(), noise(300_000));
    t
}

// --------------------------------------------------------------------- db

/// One database (bucket + prefix `db/`) on the shared moto server, addressed the same
/// way by the daemon and by the Python tool.
pub struct Db {
    pub moto: &'static Moto,
    pub bucket: String,
    pub prefix: String,
}

impl Db {
    pub fn new() -> Db {
        let moto = Moto::shared();
        Db {
            moto,
            bucket: moto.unique_bucket(),
            prefix: "db/".into(),
        }
    }

    /// A database whose bucket does not exist.
    pub fn in_missing_bucket() -> Db {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Db {
            moto: Moto::shared(),
            bucket: format!("no-such-bucket-{n}-{}", std::process::id()),
            prefix: "db/".into(),
        }
    }

    /// `BUCKET/db`: the daemon's positional argument.
    pub fn spec(&self) -> String {
        format!("{}/{}", self.bucket, self.prefix.trim_end_matches('/'))
    }

    /// Runs `s4db_tool.py --bucket B --prefix P ARGS` under `py`.
    pub fn tool(&self, py: &Py, args: &[&str], stdin: &[u8]) -> Json {
        let mut all = vec![
            "--bucket",
            self.bucket.as_str(),
            "--prefix",
            self.prefix.as_str(),
        ];
        all.extend_from_slice(args);
        py.run(self.moto, &all, stdin)
    }

    /// `py` puts `items` (UTF-8 as `str`, else `bytes`) and uploads.
    pub fn py_put_with(&self, py: &Py, items: &Tree) {
        let items: serde_json::Map<String, Json> = items
            .iter()
            .map(|(k, v)| (k.clone(), py_value(v).to_json()))
            .collect();
        let ops = json!([{ "op": "put", "items": items }, { "op": "upload" }]);
        self.tool(py, &["apply"], ops.to_string().as_bytes());
    }

    /// Python 0.10.0 puts `items` and uploads.
    pub fn py_put(&self, items: &Tree) {
        self.py_put_with(&Py::v10(), items);
    }

    /// Python 0.10.0's view: every key with its value as `str` or `bytes`.
    pub fn py_values(&self) -> BTreeMap<String, PyValue> {
        let dump = self.tool(&Py::v10(), &["dump"], b"");
        dump["values"]
            .as_object()
            .expect("dump values")
            .iter()
            .map(|(k, v)| (k.clone(), PyValue::from_json(v).expect("a value")))
            .collect()
    }

    /// Asserts Python 0.10.0 sees exactly `expected` (values and their text/bytes kind).
    #[track_caller]
    pub fn assert_python_sees(&self, expected: &Tree) {
        assert_eq!(self.py_values(), as_py(expected), "Python's view of the db");
    }

    /// Polls Python until it sees exactly `expected`, for up to [`PUBLISH_TIMEOUT`].
    #[track_caller]
    pub fn wait_python_sees(&self, expected: &Tree) {
        let deadline = Instant::now() + PUBLISH_TIMEOUT;
        let want = as_py(expected);
        loop {
            let got = self.py_values();
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Python still does not see the writes after {PUBLISH_TIMEOUT:?}:\n\
                 got {got:?}\nwant {want:?}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Names of the objects under the prefix.
    pub fn objects(&self) -> Vec<String> {
        serde_json::from_value(self.tool(&Py::v10(), &["files"], b"")).expect("file list")
    }

    pub fn data_objects(&self) -> Vec<String> {
        self.objects()
            .into_iter()
            .filter(|n| n.starts_with("data_") && n.ends_with(".s4db"))
            .collect()
    }

    pub fn get_object(&self, name: &str) -> Vec<u8> {
        let got = self.tool(&Py::v10(), &["get-object", name], b"");
        match PyValue::from_json(&got) {
            Some(PyValue::Bytes(b)) => b,
            other => panic!("object {name}: {other:?}"),
        }
    }

    pub fn put_object(&self, name: &str, data: &[u8]) {
        let doc = PyValue::Bytes(data.to_vec()).to_json().to_string();
        self.tool(&Py::v10(), &["put-object", name], doc.as_bytes());
    }

    pub fn delete_object(&self, name: &str) {
        self.tool(&Py::v10(), &["delete-object", name], b"");
    }
}

// ------------------------------------------------------------------ mount

/// A daemon about to be started: its own temp root (mode 0755) holding the mount point
/// `mnt/`, the default local dir `local/` and the daemon's output ([`DAEMON_OUT`]).
pub struct Launch<'a> {
    pub db: &'a Db,
    pub root: tempfile::TempDir,
    pub mnt: PathBuf,
    pub local_dir: PathBuf,
    pub args: Vec<String>,
}

/// How the daemon process is known: our child (`-f`), or found by its arguments after
/// it daemonized.
pub enum Daemon {
    Child(Child),
    Detached,
}

/// A mounted `s4db-mount`. Drop detaches the mount (`fusermount3 -uz`) and kills the
/// daemon, so a failing test leaves nothing behind; [`Mount::unmount`] is the clean way.
pub struct Mount {
    pub root: tempfile::TempDir,
    pub mnt: PathBuf,
    pub local_dir: PathBuf,
    pub daemon: Daemon,
}

impl Mount {
    /// A daemon for `db` with fresh temp dirs, to configure and start.
    pub fn on(db: &Db) -> Launch<'_> {
        require_fuse();
        let root = tempdir("root");
        // Canonical: that is how /proc/self/mountinfo will name it.
        let base = fs::canonicalize(root.path()).expect("canonicalize temp dir");
        let (mnt, local_dir) = (base.join("mnt"), base.join("local"));
        fs::create_dir(&mnt).expect("create mount point");
        fs::create_dir(&local_dir).expect("create local dir");
        Launch {
            db,
            root,
            mnt,
            local_dir,
            args: Vec::new(),
        }
    }
}

impl Launch<'_> {
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Uses `dir` (e.g. one that outlives this mount) instead of the fresh local dir.
    pub fn local_dir(mut self, dir: &Path) -> Self {
        self.local_dir = dir.to_path_buf();
        self
    }

    /// Mounts on `path` instead of the fresh empty directory.
    pub fn mountpoint(mut self, path: &Path) -> Self {
        self.mnt = path.to_path_buf();
        self
    }

    pub fn output_path(&self) -> PathBuf {
        self.root.path().join(DAEMON_OUT)
    }

    /// Starts the daemon (`-f` or not), its stdout and stderr going to `daemon.out`.
    pub fn spawn(&self, foreground: bool) -> Child {
        let out = fs::File::create(self.output_path()).expect("create daemon.out");
        let err = out.try_clone().expect("dup daemon.out");
        let mut cmd = Command::new(daemon_bin());
        super::command_env(&mut cmd, self.db.moto);
        cmd.env_remove("S4DB_LOCAL_STORE")
            .env("XDG_CACHE_HOME", self.root.path().join("xdg-cache"))
            .env("LC_ALL", "C")
            .args(["--endpoint-url", &self.db.moto.endpoint])
            .args(["--region", super::REGION, "--force-path-style"])
            .arg("--local-dir")
            .arg(&self.local_dir)
            .args(&self.args);
        if foreground {
            cmd.arg("-f");
        }
        cmd.arg(self.db.spec())
            .arg(&self.mnt)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        super::spawn_tied_to_process(cmd).expect("spawn s4db-mount")
    }

    pub fn into_mount(self, daemon: Daemon) -> Mount {
        Mount {
            root: self.root,
            mnt: self.mnt,
            local_dir: self.local_dir,
            daemon,
        }
    }

    /// `s4db-mount -f`, returned once `/proc/self/mountinfo` lists the mount.
    #[track_caller]
    pub fn start(self) -> Mount {
        let child = self.spawn(true);
        let mut mount = self.into_mount(Daemon::Child(child));
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while !is_mounted(&mount.mnt) {
            if let Daemon::Child(child) = &mut mount.daemon {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    panic!(
                        "s4db-mount exited ({status}) before mounting:\n{}",
                        mount.output()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "not mounted after {MOUNT_TIMEOUT:?}; daemon output:\n{}",
                mount.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        mount
    }

    /// `s4db-mount` without `-f`: it must exit 0, and only once the mount is ready
    /// (checked right away, without waiting).
    #[track_caller]
    pub fn start_daemonized(self) -> Mount {
        let mut launcher = self.spawn(false);
        let status = wait_timeout(&mut launcher, MOUNT_TIMEOUT);
        let mount = self.into_mount(Daemon::Detached);
        let Some(status) = status else {
            let _ = launcher.kill();
            panic!(
                "s4db-mount (daemon mode) still running after {MOUNT_TIMEOUT:?}:\n{}",
                mount.output()
            );
        };
        assert!(
            status.success(),
            "s4db-mount (daemon mode) failed ({status}):\n{}",
            mount.output()
        );
        assert!(
            is_mounted(&mount.mnt),
            "s4db-mount returned 0 but the mount is not there yet:\n{}",
            mount.output()
        );
        mount
    }

    /// Runs the daemon expecting it to fail to mount: asserts a non-zero exit within
    /// [`MOUNT_TIMEOUT`] with nothing left mounted, and returns its output.
    #[track_caller]
    pub fn run_to_failure(self, foreground: bool) -> String {
        let mut child = self.spawn(foreground);
        let status = wait_timeout(&mut child, MOUNT_TIMEOUT);
        let mnt = self.mnt.clone();
        let mount = self.into_mount(Daemon::Child(child));
        let output = mount.output();
        let mode = if foreground { "-f" } else { "daemon mode" };
        match status {
            None => panic!("s4db-mount ({mode}) did not exit; expected a failure:\n{output}"),
            Some(s) => assert!(
                !s.success(),
                "s4db-mount ({mode}) exited 0; expected a failure:\n{output}"
            ),
        }
        assert!(
            !is_mounted(&mnt),
            "s4db-mount ({mode}) failed but left {mnt:?} mounted"
        );
        assert!(
            daemon_pids(&mnt).is_empty(),
            "s4db-mount ({mode}) failed but a daemon is still running"
        );
        output
    }
}

impl Mount {
    /// The daemon's captured stdout and stderr (plus its log file in daemon mode).
    pub fn output(&self) -> String {
        let captured = fs::read_to_string(self.root.path().join(DAEMON_OUT));
        let mut text = captured.unwrap_or_default();
        if let Ok(log) = fs::read_to_string(self.local_dir.join("s4db-mount.log")) {
            text.push_str("\n--- s4db-mount.log ---\n");
            text.push_str(&log);
        }
        let start = text.len().saturating_sub(8192);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text[start..].to_string()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// `sh -ec SCRIPT` with the mount point as the working directory.
    pub fn sh(&self, script: &str) -> Sh {
        sh_in(&self.mnt, script)
    }

    #[track_caller]
    pub fn read(&self, rel: &str) -> Vec<u8> {
        fs::read(self.path(rel)).unwrap_or_else(|e| panic!("read {rel} through the mount: {e}"))
    }

    /// Every file the mount shows, by path.
    pub fn tree(&self) -> Tree {
        read_tree(&self.mnt)
    }

    /// Runs a control operation: `echo > .s4db/OP`.
    pub fn control(&self, op: &str) -> Sh {
        self.sh(&format!("echo > .s4db/{op}"))
    }

    #[track_caller]
    pub fn upload(&self) {
        self.control("upload").ok();
    }

    #[track_caller]
    pub fn stats(&self) -> Json {
        let text = fs::read_to_string(self.path(".s4db/stats")).expect("read .s4db/stats");
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!(".s4db/stats is not JSON ({e}):\n{text}"))
    }

    pub fn last_error(&self) -> String {
        fs::read_to_string(self.path(".s4db/last_error")).expect("read .s4db/last_error")
    }

    /// `fusermount3 -u`, then the daemon must exit 0 (after uploading pending writes).
    #[track_caller]
    pub fn unmount(mut self) {
        let out = fusermount("-u", &self.mnt);
        assert!(
            out.status.success(),
            "fusermount3 -u {:?}: {}\ndaemon output:\n{}",
            self.mnt,
            String::from_utf8_lossy(&out.stderr),
            self.output()
        );
        match &mut self.daemon {
            Daemon::Child(child) => {
                let Some(status) = wait_timeout(child, EXIT_TIMEOUT) else {
                    panic!(
                        "s4db-mount still running {EXIT_TIMEOUT:?} after the unmount:\n{}",
                        self.output()
                    )
                };
                assert!(
                    status.success(),
                    "s4db-mount exited with {status} after the unmount:\n{}",
                    self.output()
                );
            }
            Daemon::Detached => {
                let deadline = Instant::now() + EXIT_TIMEOUT;
                while !daemon_pids(&self.mnt).is_empty() {
                    assert!(
                        Instant::now() < deadline,
                        "the daemon is still running {EXIT_TIMEOUT:?} after the unmount:\n{}",
                        self.output()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// SIGTERM to the daemon: it must upload, unmount and exit 0 by itself.
    #[track_caller]
    pub fn terminate(mut self) {
        let Daemon::Child(child) = &mut self.daemon else {
            panic!("terminate() needs a foreground daemon");
        };
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_timeout(child, EXIT_TIMEOUT).expect("s4db-mount exits after SIGTERM");
        assert!(
            status.success(),
            "exit after SIGTERM: {status}\n{}",
            self.output()
        );
        assert!(!is_mounted(&self.mnt), "still mounted after SIGTERM");
    }

    /// A crash: SIGKILL to the daemon, then the dead mount is detached.
    pub fn kill9(mut self) {
        if let Daemon::Child(child) = &mut self.daemon {
            child.kill().expect("kill -9 s4db-mount");
            child.wait().expect("wait for s4db-mount");
        }
        let _ = fusermount("-uz", &self.mnt);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = fusermount("-uz", &self.mnt);
        }
        match &mut self.daemon {
            Daemon::Child(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Daemon::Detached => {
                for pid in daemon_pids(&self.mnt) {
                    // SAFETY: kill(2) on a pid just found serving this test's mount point.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        // `root` (a TempDir) is removed after this, with the mount already detached.
    }
}

/// The unprivileged test user, created once when missing (needs root).
pub fn other_user() -> &'static str {
    static CREATED: OnceLock<()> = OnceLock::new();
    CREATED.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the allow-other test mounts as root and reads as {OTHER_USER}: run the tests as root"
        );
        let exists = Command::new("id").arg(OTHER_USER).output().expect("run id");
        if !exists.status.success() {
            sh_in(
                Path::new("/"),
                &format!(
                    "useradd --system --no-create-home --shell /usr/sbin/nologin {OTHER_USER}"
                ),
            )
            .ok();
        }
    });
    OTHER_USER
}
