//! Shared harness for the integration tests (each test binary does `mod common;`).
//!
//! - [`Moto`]: a moto S3 server on a free loopback port (`Moto::shared()` for one per
//!   test binary, `Moto::start()` for a private one), with bucket helpers.
//! - [`command_env`]: points a child process at moto, independent of the host's AWS setup.
//! - [`Py`]: runs `tests/py/s4db_tool.py` under the real Python s4db 0.10.0 / 0.8.0.
//! - [`mount`]: real `s4db-mount` daemons on temp dirs, shell commands, directory trees.
//!
//! The Python side lives in `.venv-test/`, made by `scripts/test.sh` (or
//! `scripts/test.sh --setup-only`). Missing tools are a hard failure, never a skip.
#![allow(dead_code)]

/// The FUSE mount harness (`tests/mount.rs`, `tests/posix.rs`).
pub mod mount;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "testing";
pub const SECRET_KEY: &str = "testing";
pub const REGION: &str = "us-east-1";

/// How long moto may take to answer its first request.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// A path that never exists: AWS config/credentials files are read from here (i.e. not at all).
const NO_AWS_FILE: &str = "/nonexistent/s4db-tests/aws-file";

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Tool path from `env_var`, else `<repo>/<default_rel>`; panics if it does not exist.
fn find_tool(env_var: &str, default_rel: &str, what: &str) -> PathBuf {
    let path = match std::env::var_os(env_var) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join(default_rel),
    };
    if !path.exists() {
        panic!(
            "{what} not found at {} (from ${env_var} or the default {default_rel}).\n\
             Run `scripts/test.sh` (or `scripts/test.sh --setup-only`) to install the test tools.",
            path.display()
        );
    }
    path
}

/// Where moto logs go: cargo's scratch dir for integration tests, inside target/.
fn scratch_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = option_env!("CARGO_TARGET_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        remove_stale_logs(&dir);
        dir
    })
    .clone()
}

/// Deletes `moto-<pid>-<n>.log` files of processes that no longer run
/// (the shared server's log is never removed by its own process).
fn remove_stale_logs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("moto-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if rest.ends_with(".log") && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

// ------------------------------------------------------------------ spawning

type SpawnJob = Box<dyn FnOnce() -> std::io::Result<Child> + Send>;
type SpawnRequest = (SpawnJob, mpsc::Sender<std::io::Result<Child>>);

/// Runs `job` (which spawns a child) on one process-wide thread that never exits.
///
/// PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the
/// process; test threads come and go, so children that must live as long as the
/// process are forked from this thread instead.
fn spawn_on_keeper_thread(job: SpawnJob) -> std::io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("test-child-keeper".into())
            .spawn(move || {
                // The Sender lives in a static, so this loop runs until the process exits.
                for (job, reply) in rx {
                    let _ = reply.send(job());
                }
            })
            .expect("spawn keeper thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((job, reply_tx))
        .expect("keeper thread is gone");
    reply_rx.recv().expect("keeper thread dropped the request")
}

/// Makes the child get SIGKILL when this test process dies, so no server outlives it.
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("parent exited during spawn"));
            }
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------- moto

/// A running moto S3 server on 127.0.0.1. Killed when dropped (and, via
/// PR_SET_PDEATHSIG, when the test process dies).
pub struct Moto {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub port: u16,
    child: Child,
    log_path: PathBuf,
}

impl Moto {
    /// Starts a private moto server; panics (with the server log) if it does not come up.
    pub fn start() -> Moto {
        let server = find_tool(
            "S4DB_MOTO_SERVER",
            ".venv-test/py10/bin/moto_server",
            "moto_server",
        );
        let mut last_err = String::new();
        // A few tries: another process may grab the free port before moto binds it.
        for _ in 0..3 {
            match Moto::try_start(&server) {
                Ok(moto) => return moto,
                Err(e) => last_err = e,
            }
        }
        panic!("moto_server did not start:\n{last_err}");
    }

    /// The server shared by every test of this test binary (started on first use).
    pub fn shared() -> &'static Moto {
        static SHARED: OnceLock<Moto> = OnceLock::new();
        SHARED.get_or_init(Moto::start)
    }

    fn try_start(server: &Path) -> Result<Moto, String> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let port = free_port();
        let n = N.fetch_add(1, Ordering::Relaxed);
        let log_path = scratch_dir().join(format!("moto-{}-{n}.log", std::process::id()));
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("create {}: {e}", log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;

        let server = server.to_path_buf();
        let child = spawn_on_keeper_thread(Box::new(move || {
            let mut cmd = Command::new(&server);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2);
            die_with_parent(&mut cmd);
            cmd.spawn()
        }))
        .map_err(|e| format!("spawn moto_server: {e}"))?;

        let mut moto = Moto {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            child,
            log_path,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = moto.child.try_wait() {
                return Err(format!(
                    "moto_server exited ({status}); log:\n{}",
                    moto.log_tail()
                ));
            }
            if matches!(moto.try_request("GET", "/", b""), Ok((200, _))) {
                return Ok(moto);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "moto_server not answering on port {port} after {STARTUP_TIMEOUT:?}; log:\n{}",
                    moto.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last ~4 KiB of the server's log.
    pub fn log_tail(&self) -> String {
        let data = std::fs::read(&self.log_path).unwrap_or_default();
        let start = data.len().saturating_sub(4096);
        String::from_utf8_lossy(&data[start..]).into_owned()
    }

    /// One plain, unsigned HTTP/1.1 request to moto. Returns (status, body).
    /// `path` starts with `/`, e.g. `/bucket/key`. Moto accepts unsigned bucket
    /// creation and object PUT/DELETE, but answers 403 to an unsigned object GET:
    /// read objects with `s4db_tool.py get-object` instead.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut resp = Vec::new();
        stream.read_to_end(&mut resp)?;
        let bad = || {
            std::io::Error::other(format!(
                "bad HTTP response: {:?}",
                String::from_utf8_lossy(&resp)
            ))
        };
        let head_end = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(bad)?;
        let head_text = std::str::from_utf8(&resp[..head_end]).map_err(|_| bad())?;
        let status = head_text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(bad)?;
        let mut body = resp[head_end + 4..].to_vec();
        if head_text
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body).ok_or_else(bad)?;
        }
        Ok((status, body))
    }

    /// Like [`Moto::try_request`], panicking on I/O errors.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        self.try_request(method, path, body).unwrap_or_else(|e| {
            panic!(
                "{method} {path} to moto failed: {e}\nlog:\n{}",
                self.log_tail()
            )
        })
    }

    /// Creates bucket `name` (must be a valid S3 bucket name).
    pub fn create_bucket(&self, name: &str) {
        let (status, body) = self.request("PUT", &format!("/{name}"), b"");
        assert_eq!(
            status,
            200,
            "creating bucket {name:?} on moto: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// Creates and returns a bucket name not used before in this process: `t-<n>-<pid>`.
    pub fn unique_bucket(&self) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "t-{}-{}",
            N.fetch_add(1, Ordering::Relaxed),
            std::process::id()
        );
        self.create_bucket(&name);
        name
    }

    /// The environment that points an AWS SDK at this server with test credentials.
    pub fn aws_env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_REGION", REGION),
            ("AWS_DEFAULT_REGION", REGION),
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log_path);
    }
}

/// Decodes an HTTP/1.1 chunked body (no trailers expected).
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Sets [`Moto::aws_env`] on `cmd` and removes whatever of the host's AWS setup
/// could change how the child talks to S3 (profiles, tokens, config files, endpoints).
pub fn command_env(cmd: &mut Command, moto: &Moto) {
    for var in [
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_CA_BUNDLE",
        "AWS_ENDPOINT_URL_S3",
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
        "AWS_USE_FIPS_ENDPOINT",
        "AWS_USE_DUALSTACK_ENDPOINT",
        "AWS_ROLE_ARN",
        "AWS_ROLE_SESSION_NAME",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("AWS_CONFIG_FILE", NO_AWS_FILE)
        .env("AWS_SHARED_CREDENTIALS_FILE", NO_AWS_FILE)
        .env("AWS_EC2_METADATA_DISABLED", "true");
    cmd.envs(moto.aws_env());
}

/// A `Command` for the crate's `s4db` binary with [`command_env`] applied.
pub fn s4db_cli(moto: &Moto) -> Command {
    let Some(bin) = option_env!("CARGO_BIN_EXE_s4db") else {
        panic!(
            "CARGO_BIN_EXE_s4db is only set for integration tests of a crate with an `s4db` binary"
        )
    };
    let mut cmd = Command::new(bin);
    command_env(&mut cmd, moto);
    cmd
}

// -------------------------------------------------------------------- python

/// A Python interpreter with a given s4db version installed, driving `tests/py/s4db_tool.py`.
pub struct Py {
    pub python: PathBuf,
}

impl Py {
    /// Python with s4db 0.10.0 (`$S4DB_TEST_PY10`, else `.venv-test/py10/bin/python`).
    pub fn v10() -> Py {
        Py {
            python: find_tool(
                "S4DB_TEST_PY10",
                ".venv-test/py10/bin/python",
                "python with s4db 0.10.0",
            ),
        }
    }

    /// Python with s4db 0.8.0 (`$S4DB_TEST_PY08`, else `.venv-test/py08/bin/python`).
    pub fn v08() -> Py {
        Py {
            python: find_tool(
                "S4DB_TEST_PY08",
                ".venv-test/py08/bin/python",
                "python with s4db 0.8.0",
            ),
        }
    }

    /// Runs `s4db_tool.py --endpoint <moto> <args..>` with `stdin`; returns its raw output
    /// whatever the exit status (for tests that expect the tool to fail).
    pub fn try_run(&self, moto: &Moto, args: &[&str], stdin: &[u8]) -> Output {
        let script = repo_root().join("tests/py/s4db_tool.py");
        let mut cmd = Command::new(&self.python);
        cmd.arg(&script)
            .arg("--endpoint")
            .arg(&moto.endpoint)
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command_env(&mut cmd, moto);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.python.display()));
        // Feed stdin from a thread so a chatty child cannot deadlock us.
        let mut child_stdin = child.stdin.take().expect("piped stdin");
        let input = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = child_stdin.write_all(&input); // the tool may not read stdin at all
        });
        let out = child.wait_with_output().expect("wait for s4db_tool.py");
        let _ = writer.join();
        out
    }

    /// Runs the tool, asserts it succeeded and returns its stdout parsed as JSON.
    pub fn run(&self, moto: &Moto, args: &[&str], stdin: &[u8]) -> serde_json::Value {
        let out = self.try_run(moto, args, stdin);
        if !out.status.success() {
            panic!(
                "s4db_tool.py {args:?} ({}) failed with {}\nstderr:\n{}\nstdout:\n{}",
                self.python.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "s4db_tool.py {args:?}: stdout is not JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

/// A value as `s4db_tool.py` encodes it: text is a JSON string, bytes are `{"b64": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PyValue {
    Text(String),
    Bytes(Vec<u8>),
}

impl PyValue {
    pub fn to_json(&self) -> serde_json::Value {
        use base64::Engine as _;
        match self {
            PyValue::Text(s) => serde_json::Value::String(s.clone()),
            PyValue::Bytes(b) => {
                serde_json::json!({ "b64": base64::engine::general_purpose::STANDARD.encode(b) })
            }
        }
    }

    /// Decodes a tool value; `null` (missing key) gives `None`. Panics on anything else.
    pub fn from_json(v: &serde_json::Value) -> Option<PyValue> {
        use base64::Engine as _;
        match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(PyValue::Text(s.clone())),
            serde_json::Value::Object(m) if m.len() == 1 => {
                let Some(b64) = m.get("b64").and_then(|b| b.as_str()) else {
                    panic!("not an s4db_tool.py value: {v}")
                };
                Some(PyValue::Bytes(
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .expect("tool printed invalid base64"),
                ))
            }
            other => panic!("not an s4db_tool.py value: {other}"),
        }
    }
}

// -------------------------------------------------------------------- s4db

/// An S3 store on `bucket` of this moto server, with explicit test credentials
/// (nothing read from the host's AWS configuration).
pub async fn s3_store(moto: &Moto, bucket: &str) -> s4db::remote::S3Store {
    let mut config = s4db::remote::S3Config::new(bucket);
    config.endpoint_url = Some(moto.endpoint.clone());
    config.region = Some(REGION.into());
    config.force_path_style = true;
    config.credentials = Some((ACCESS_KEY.into(), SECRET_KEY.into()));
    config.max_attempts = 2;
    s4db::remote::S3Store::connect(config)
        .await
        .expect("connect to moto")
}

/// Deterministic bytes Snappy cannot shrink (xorshift noise).
pub fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ------------------------------------------------------------------- daemons

/// Spawns `cmd` so that it gets SIGKILL when this test process dies, however the test
/// thread that asked for it ends: for daemons (e.g. `s4db-mount -f`) that must never
/// outlive the test run. Forked from the keeper thread (see [`spawn_on_keeper_thread`]).
pub fn spawn_tied_to_process(mut cmd: Command) -> std::io::Result<Child> {
    spawn_on_keeper_thread(Box::new(move || {
        die_with_parent(&mut cmd);
        cmd.spawn()
    }))
}
