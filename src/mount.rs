//! `s4db-mount`: options (flags and fstab-style `-o`), the stable default
//! local directory, daemonizing with a readiness pipe, and the session's life
//! from mount to the upload at unmount.

use crate::db::{OpenOptions, S4db, DEFAULT_MAX_FILE_SIZE};
use crate::fs::{FsConfig, S4Fs};
use crate::fuse::FuseAdapter;
use crate::remote::{MeteredStore, ObjectStore};
use crate::target::{DbTarget, StoreOptions};
use clap::Parser;
use fuser::MountOption;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "s4db-mount",
    version,
    about = "Mount an s4db database: each key is a file whose contents are its value",
    after_help = "Unmount with `fusermount3 -u MOUNTPOINT` (or SIGTERM): unsynced writes are uploaded first.\n\
                  Control files: MOUNTPOINT/.s4db/{upload,download,compact,rebuild_index,gc,refresh} run on write;\n\
                  .s4db/stats (JSON), .s4db/last_error and .s4db/unmapped are read-only."
)]
pub struct MountArgs {
    /// The database: bucket or bucket/prefix (the Python S4DB(bucket, "prefix/"))
    pub db: String,
    /// An existing directory to mount on
    pub mountpoint: PathBuf,
    /// S3 endpoint (also AWS_ENDPOINT_URL)
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// AWS region
    #[arg(long, value_name = "R")]
    pub region: Option<String>,
    /// Path-style addressing, for MinIO, moto and friends
    #[arg(long)]
    pub force_path_style: bool,
    /// AWS profile from ~/.aws/config
    #[arg(long, value_name = "P")]
    pub profile: Option<String>,
    /// Use the embedded local-directory backend rooted at DIR instead of S3
    #[arg(long, value_name = "DIR", env = "S4DB_LOCAL_STORE")]
    pub local_store: Option<PathBuf>,
    /// Working directory: data files and unsynced writes (default: a stable
    /// per-database directory under ~/.cache/s4db/mounts)
    #[arg(long, value_name = "DIR")]
    pub local_dir: Option<PathBuf>,
    /// Soft size limit of a data file, in bytes
    #[arg(long, value_name = "BYTES")]
    pub max_file_size: Option<u64>,
    /// Part size of multipart uploads to S3, in bytes (5 MiB to 5 GiB; default
    /// 8 MiB); data files from 16 MiB (or one part) on are uploaded in parts
    #[arg(long, value_name = "BYTES")]
    pub write_part_size: Option<u64>,
    /// Refuse every write with EROFS
    #[arg(long)]
    pub read_only: bool,
    /// Let other users use the mount
    #[arg(long)]
    pub allow_other: bool,
    /// Let root use the mount
    #[arg(long)]
    pub allow_root: bool,
    /// Unmount when the daemon exits, even if killed
    #[arg(long)]
    pub auto_unmount: bool,
    /// Owner of every file (default: the user running the daemon)
    #[arg(long)]
    pub uid: Option<u32>,
    /// Group of every file
    #[arg(long)]
    pub gid: Option<u32>,
    /// Permission bits of files, octal
    #[arg(long, value_parser = parse_mode, default_value = "0644")]
    pub file_mode: u16,
    /// Permission bits of directories, octal
    #[arg(long, value_parser = parse_mode, default_value = "0755")]
    pub dir_mode: u16,
    /// Upload this many seconds after the last write, or `never` (only
    /// .s4db/upload and unmount upload)
    #[arg(long, value_name = "SECONDS|never", value_parser = parse_delay, default_value = "1")]
    pub upload_delay: Interval,
    /// Large cold values are read in parts of this many bytes, fetched by
    /// parallel range GETs (as mountpoint-s3's --read-part-size)
    #[arg(long, value_name = "BYTES", default_value_t = 8 * 1024 * 1024)]
    pub read_part_size: u64,
    /// Range GETs in flight for one large value being read
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub max_threads: usize,
    /// Upload at most this many seconds after the oldest unpublished write,
    /// even while writes keep coming (a steady writer never leaves the
    /// debounce quiet), or `never`
    #[arg(long, value_name = "SECONDS|never", value_parser = parse_delay, default_value = "10")]
    pub upload_max_delay: Interval,
    /// Load what other writers committed every SECONDS while nothing is
    /// unsynced (one GET of the index), or `never` (only .s4db/refresh)
    #[arg(long, value_name = "SECONDS|never", value_parser = parse_delay, default_value = "60")]
    pub refresh_interval: Interval,
    /// Run a background compaction round every SECONDS (merge small data
    /// files by size tier, rewrite mostly dead ones), or `never`
    #[arg(long, value_name = "SECONDS|never", value_parser = parse_delay, default_value = "60")]
    pub compact: Interval,
    /// Compaction merges a size tier once it holds this many data files
    #[arg(long, value_name = "N", default_value = "4")]
    pub compact_min_files: usize,
    /// Compaction rewrites a data file whose live bytes are below this share
    /// of its size
    #[arg(long, value_name = "RATIO", default_value = "0.5")]
    pub compact_dead_ratio: f64,
    /// Most bytes of data files one compaction round reads
    #[arg(long, value_name = "BYTES", default_value = "268435456")]
    pub compact_max_bytes: u64,
    /// Run gc every SECONDS (delete replaced and orphaned objects past the
    /// grace period), or `never`
    #[arg(long, value_name = "SECONDS|never", value_parser = parse_delay, default_value = "3600")]
    pub gc: Interval,
    /// gc leaves alone unreferenced objects younger than this and replaced
    /// ones retired less than this ago (readers of an older index use them)
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, default_value = "3600")]
    pub gc_grace: Duration,
    /// Size cap of the data files in the local directory: published ones are
    /// evicted least recently used past it (unsynced ones never), or
    /// `unlimited` (default: 10% of its file system, at most 4 GiB)
    #[arg(long, value_name = "BYTES|unlimited", value_parser = parse_cache_size)]
    pub max_cache_size: Option<CacheSize>,
    /// Stay in the foreground
    #[arg(short, long)]
    pub foreground: bool,
    /// Verbose logging (SIGUSR2 cycles the level at run time: info, debug, trace)
    #[arg(short, long)]
    pub debug: bool,
    /// Log lines as plain text or as one JSON object each
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (off by default)
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Mount over a directory that is not empty (its files are hidden while mounted)
    #[arg(long)]
    pub nonempty: bool,
    /// Where the daemon logs (default: LOCAL_DIR/s4db-mount.log; stderr with -f)
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// Options in fstab style: ro, allow_other, uid=N, upload_delay=never, ...
    #[arg(short = 'o', value_name = "OPT[,OPT...]")]
    pub options: Vec<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A number of seconds, or `never` (`None`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval(pub Option<Duration>);

fn parse_mode(s: &str) -> Result<u16, String> {
    u16::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal mode such as 0644"))
}

fn parse_delay(s: &str) -> Result<Interval, String> {
    if s == "never" {
        return Ok(Interval(None));
    }
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| Interval(Some(Duration::from_secs_f64(v))))
        .ok_or_else(|| format!("{s:?} is neither a number of seconds nor `never`"))
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a number of seconds"))
}

/// `--max-cache-size`: bytes, or no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSize(pub Option<u64>);

fn parse_cache_size(s: &str) -> Result<CacheSize, String> {
    if s == "unlimited" {
        return Ok(CacheSize(None));
    }
    s.parse()
        .map(|b| CacheSize(Some(b)))
        .map_err(|_| format!("{s:?} is neither a number of bytes nor `unlimited`"))
}

fn parse_num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("-o {key}={v}: {v:?} is not a number"))
}

impl MountArgs {
    /// Folds `-o a,b=c` into the flags (the form mount(8) and fstab use).
    pub fn apply_fstab_options(&mut self) -> Result<(), String> {
        let opts: Vec<String> = self
            .options
            .iter()
            .flat_map(|o| o.split(','))
            .filter(|o| !o.is_empty())
            .map(str::to_string)
            .collect();
        for opt in opts {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt.as_str(), None),
            };
            let need = || value.ok_or_else(|| format!("-o {key} needs a value: {key}=..."));
            match key {
                "ro" | "read_only" => self.read_only = true,
                "rw" => self.read_only = false,
                "allow_other" => self.allow_other = true,
                "allow_root" => self.allow_root = true,
                "auto_unmount" => self.auto_unmount = true,
                "force_path_style" => self.force_path_style = true,
                "debug" => self.debug = true,
                "foreground" => self.foreground = true,
                "uid" => self.uid = Some(parse_num(key, need()?)?),
                "gid" => self.gid = Some(parse_num(key, need()?)?),
                "max_file_size" => self.max_file_size = Some(parse_num(key, need()?)?),
                "write_part_size" => self.write_part_size = Some(parse_num(key, need()?)?),
                "file_mode" => self.file_mode = parse_mode(need()?)?,
                "dir_mode" => self.dir_mode = parse_mode(need()?)?,
                "upload_delay" => self.upload_delay = parse_delay(need()?)?,
                "upload_max_delay" => self.upload_max_delay = parse_delay(need()?)?,
                "read_part_size" => self.read_part_size = parse_num(key, need()?)?,
                "max_threads" => self.max_threads = parse_num(key, need()?)?,
                "refresh_interval" => self.refresh_interval = parse_delay(need()?)?,
                "compact" => self.compact = parse_delay(need()?)?,
                "compact_min_files" => self.compact_min_files = parse_num(key, need()?)?,
                "compact_dead_ratio" => self.compact_dead_ratio = parse_num(key, need()?)?,
                "compact_max_bytes" => self.compact_max_bytes = parse_num(key, need()?)?,
                "gc" => self.gc = parse_delay(need()?)?,
                "gc_grace" => self.gc_grace = parse_seconds(need()?)?,
                "max_cache_size" => self.max_cache_size = Some(parse_cache_size(need()?)?),
                "endpoint_url" => self.endpoint_url = Some(need()?.to_string()),
                "region" => self.region = Some(need()?.to_string()),
                "profile" => self.profile = Some(need()?.to_string()),
                "local_dir" => self.local_dir = Some(need()?.into()),
                "local_store" => self.local_store = Some(need()?.into()),
                "log_file" => self.log_file = Some(need()?.into()),
                "log_format" => {
                    self.log_format = clap::ValueEnum::from_str(need()?, true).map_err(|_| {
                        format!(
                            "-o log_format={}: use text or json",
                            need().unwrap_or_default()
                        )
                    })?
                }
                "metrics_addr" => {
                    let v = need()?;
                    self.metrics_addr = Some(v.parse().map_err(|_| {
                        format!("-o metrics_addr={v}: not an address such as 127.0.0.1:9464")
                    })?)
                }
                "nonempty" => self.nonempty = true,
                // What mount(8) and fstab pass along that means nothing here.
                "defaults" | "_netdev" | "nofail" | "noauto" | "auto" | "user" | "users"
                | "nouser" | "dev" | "nodev" | "suid" | "nosuid" | "exec" | "noexec" | "atime"
                | "noatime" | "relatime" | "async" => {}
                k if k.starts_with("x-") || k.starts_with("comment=") => {}
                _ => {
                    return Err(format!(
                        "unknown mount option {opt:?}; see `s4db-mount --help`"
                    ))
                }
            }
        }
        Ok(())
    }

    fn store_options(&self) -> StoreOptions {
        StoreOptions {
            local_store: self.local_store.clone(),
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            force_path_style: self.force_path_style,
            profile: self.profile.clone(),
            write_part_size: self.write_part_size,
            ..StoreOptions::default()
        }
    }

    /// The stable local directory of this database: the same bucket, prefix
    /// and store always give the same directory, so the next mount finds
    /// (and publishes) what a crashed daemon left there.
    fn default_local_dir(&self, target: &DbTarget) -> PathBuf {
        use md5::{Digest, Md5};
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| PathBuf::from(h).join(".cache"))
            })
            .unwrap_or_else(|| PathBuf::from("/var/cache"));
        let store = match &self.local_store {
            Some(root) => format!("local:{}", absolute(root).display()),
            None => format!("s3:{}", self.endpoint_url.clone().unwrap_or_default()),
        };
        let digest = Md5::digest(format!("{store}\n{}\n{}", target.bucket, target.prefix));
        let hash: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        let readable: String = target
            .prefix
            .trim_end_matches('/')
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        base.join("s4db/mounts")
            .join(&target.bucket)
            .join(format!("{readable}-{hash}"))
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Whether `path` is a mount point already (in our mount namespace).
fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| mp == want)
}

/// Tells the waiting parent how the start went (daemon mode only).
struct Readiness(Option<std::fs::File>);

impl Readiness {
    fn ready(&mut self) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(b"R");
        }
    }

    fn failed(&mut self, msg: &str) {
        match self.0.take() {
            Some(mut f) => {
                let _ = f.write_all(format!("E{msg}").as_bytes());
            }
            None => eprintln!("s4db-mount: error: {msg}"),
        }
    }
}

/// Forks: the parent waits on a pipe until the child reports the mount is
/// ready (exit 0) or failed (the reason, exit 2), and never returns. Runs
/// before any thread exists.
fn daemonize() -> std::io::Result<Readiness> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: single-threaded here (no runtime yet); the child only continues.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(read_end);
            // SAFETY: plain syscall; detaches from the terminal's session.
            unsafe { libc::setsid() };
            Ok(Readiness(Some(std::fs::File::from(write_end))))
        }
        _ => {
            drop(write_end);
            let mut msg = Vec::new();
            let _ = std::fs::File::from(read_end).read_to_end(&mut msg);
            let code = match msg.first() {
                Some(b'R') => 0,
                Some(b'E') => {
                    eprintln!("s4db-mount: error: {}", String::from_utf8_lossy(&msg[1..]));
                    2
                }
                _ => {
                    eprintln!("s4db-mount: error: the daemon exited before the mount was ready (see its log)");
                    2
                }
            };
            std::process::exit(code);
        }
    }
}

/// Sends the daemon's stdio to /dev/null once the parent has gone.
fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// Log levels SIGUSR2 cycles through, as mountpoint-s3 does.
const LEVELS: [&str; 3] = ["info", "debug", "trace"];

/// Targets that could print request signing material at their verbose
/// levels are held at `info` whatever the filter says: logs never carry
/// credentials or signatures.
const QUIET: &str = "aws_sigv4=info,aws_credential_types=info,aws_config=info";

/// The filter of a log level: our crate at `level`, fuser one step quieter.
fn level_filter(level: &str) -> tracing_subscriber::EnvFilter {
    let fuser = if level == "trace" { "debug" } else { "info" };
    tracing_subscriber::EnvFilter::new(format!("s4db={level},fuser={fuser},{QUIET}"))
}

type FilterHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// Installs the logger (text or JSON, to `log_file` or stderr) and returns
/// the handle SIGUSR2 changes the level with, and the level it starts at.
fn init_logging(
    args: &MountArgs,
    log_file: Option<&Path>,
) -> Result<(FilterHandle, usize), String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let start = usize::from(args.debug);
    let filter = match std::env::var("S4DB_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            tracing_subscriber::EnvFilter::try_new(format!("{v},{QUIET}"))
                .map_err(|e| format!("S4DB_LOG={v:?} is not a log filter: {e}"))?
        }
        _ => level_filter(LEVELS[start]),
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    type Base = tracing_subscriber::layer::Layered<
        tracing_subscriber::reload::Layer<
            tracing_subscriber::EnvFilter,
            tracing_subscriber::Registry,
        >,
        tracing_subscriber::Registry,
    >;
    type Boxed = Box<dyn Layer<Base> + Send + Sync>;
    let writer = match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    format!(
                        "cannot open the log file {}: {e}; pick another --log-file",
                        path.display()
                    )
                })?;
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(file))
        }
        None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let ansi = log_file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt: Boxed = match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(writer)
            .boxed(),
    };
    // The filter sits on top of the formatting layer (a reloadable filter
    // layer must wrap the registry directly).
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .map_err(|e| format!("cannot start logging: {e}"))?;
    Ok((handle, start))
}

/// SIGUSR2: the next log level (info, debug, trace, info, ...), forever.
async fn cycle_log_level_on_sigusr2(handle: FilterHandle, mut level: usize) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
        tracing::warn!("cannot watch SIGUSR2; the log level stays as it is");
        return;
    };
    while usr2.recv().await.is_some() {
        level = (level + 1) % LEVELS.len();
        match handle.reload(level_filter(LEVELS[level])) {
            Ok(()) => tracing::info!("SIGUSR2: log level is now {}", LEVELS[level]),
            Err(e) => tracing::warn!("SIGUSR2: cannot change the log level: {e}"),
        }
    }
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`) how we are doing;
/// a no-op otherwise.
fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// glibc raises its mmap threshold to the largest block freed (up to 32 MB):
/// after the first large buffer, the start-up's others (the index object and
/// its parsed entries, hint objects) come from the heap and stay resident
/// once freed. A fixed threshold keeps each in a mapping of its own, returned
/// to the system when freed. glibc also gives threads arenas of their own (up
/// to 8 per core), each keeping the free memory its bursts left: the FUSE
/// thread, tokio's workers and the blocking pool's short-lived threads made
/// the RSS of a long-running mount creep up by a few MB while what it holds
/// stayed flat (`scripts/soak.sh`); two arenas serve a daemon whose work is
/// mostly waiting on S3.
fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: sets allocator parameters; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Everything from arguments to exit: mount, serve, upload at unmount.
pub fn main() -> ExitCode {
    let started = std::time::Instant::now();
    return_large_buffers_to_the_system();
    // Everything the daemon creates (local directory, data files, spill
    // files, its log) is for its owner only.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    let mut args = MountArgs::parse();
    if let Err(e) = args.apply_fstab_options() {
        eprintln!("s4db-mount: error: {e}");
        return ExitCode::from(2);
    }
    // Check what can be checked before forking, so most mistakes print here.
    let prepared = prepare(&mut args);
    let (target, local_dir) = match prepared {
        Ok(p) => p,
        Err(e) => {
            eprintln!("s4db-mount: error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut readiness = if args.foreground {
        Readiness(None)
    } else {
        match daemonize() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("s4db-mount: error: cannot start the daemon: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let log_file = args
        .log_file
        .clone()
        .or_else(|| (!args.foreground).then(|| local_dir.join("s4db-mount.log")));
    let log_level = match init_logging(&args, log_file.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            readiness.failed(&e);
            return ExitCode::from(2);
        }
    };
    // A daemon's stderr is /dev/null: panics must reach the log.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!("{info}");
        default_hook(info);
    }));
    match serve(
        &args,
        &target,
        &local_dir,
        &mut readiness,
        started,
        log_level,
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            notify(&[sd_notify::NotifyState::Status(&format!("failed: {e}"))]);
            // In the foreground the log is stderr, where `failed` prints it.
            if !args.foreground {
                tracing::error!("{e}");
            }
            readiness.failed(&e);
            ExitCode::from(2)
        }
    }
}

/// Validates the mount point and settles the local directory.
fn prepare(args: &mut MountArgs) -> Result<(DbTarget, PathBuf), String> {
    let target = DbTarget::parse(&args.db).map_err(|e| e.to_string())?;
    args.mountpoint = absolute(&args.mountpoint);
    let mp = &args.mountpoint;
    match std::fs::metadata(mp) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("mount point {} is not a directory", mp.display())),
        Err(e) => return Err(format!("mount point {}: {e}", mp.display())),
    }
    if is_mounted(mp) {
        return Err(format!(
            "{} is already a mount point; unmount it first (fusermount3 -u {})",
            mp.display(),
            mp.display()
        ));
    }
    if !args.nonempty {
        check_empty(mp)?;
    }
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    check_fuse_device(root)?;
    // Root mounts with mount(2); anyone else (and auto_unmount) goes through
    // the setuid fusermount3.
    if (!root || args.auto_unmount) && find_program(&["fusermount3", "fusermount"]).is_none() {
        let path = std::env::var("PATH").unwrap_or_default();
        return Err(format!(
            "fusermount3 is not installed (not found on PATH={path}): {} mounts through it; \
             install the fuse3 package (apt-get install fuse3, dnf install fuse3){}",
            if root {
                "auto_unmount"
            } else {
                "a user other than root"
            },
            if root {
                ", or drop --auto-unmount"
            } else {
                ", or mount as root"
            }
        ));
    }
    if args.allow_other && !root && !fuse_conf_allows_other(FUSE_CONF) {
        return Err(format!(
            "--allow-other needs a line `user_allow_other` in {FUSE_CONF} when a user other \
             than root mounts: add it (as root), mount as root, or drop --allow-other \
             (-o allow_other)"
        ));
    }
    if let Some(root) = &args.local_store {
        args.local_store = Some(absolute(root));
    }
    let local_dir = match &args.local_dir {
        Some(d) => absolute(d),
        None => args.default_local_dir(&target),
    };
    crate::db::create_private_dir(&local_dir).map_err(|e| local_dir_error(&local_dir, &e))?;
    if let Some(w) = crate::db::privacy_warning(&local_dir) {
        eprintln!("s4db-mount: warning: {w}");
    }
    check_writable(&local_dir)?;
    if let Some(log) = &args.log_file {
        args.log_file = Some(absolute(log));
    }
    Ok((target, local_dir))
}

const FUSE_CONF: &str = "/etc/fuse.conf";

/// Whether fuse.conf has an uncommented `user_allow_other` line.
fn fuse_conf_allows_other(path: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|conf| {
        conf.lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .any(|l| l == "user_allow_other")
    })
}

/// The first of `names` found on `PATH`.
fn find_program(names: &[&str]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    })
}

/// `/dev/fuse` must be the FUSE character device, and root's to open (a
/// user mounts through fusermount3, which opens it).
fn check_fuse_device(root: bool) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    const DEV: &str = "/dev/fuse";
    const HOW: &str = "load the module (modprobe fuse) or, in a container, run it with \
                       --device /dev/fuse --cap-add SYS_ADMIN";
    match std::fs::metadata(DEV) {
        Ok(m) if m.file_type().is_char_device() => {}
        Ok(_) => {
            return Err(format!(
                "{DEV} is not the FUSE device (not a character device): {HOW}"
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "{DEV} does not exist: this system has no FUSE; {HOW}"
            ))
        }
        Err(e) => return Err(format!("cannot use {DEV}: {e}; {HOW}")),
    }
    if !root {
        return Ok(());
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(DEV) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("cannot open {DEV}: {e}; {HOW}")),
    }
}

/// Files in the mount point would be hidden while mounted: refused unless
/// `--nonempty`. An autofs trigger (systemd automount) is left alone:
/// reading it would wait for the very mount being made.
fn check_empty(mp: &Path) -> Result<(), String> {
    const AUTOFS_SUPER_MAGIC: i64 = 0x0187;
    if let Ok(c) = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes()) {
        // SAFETY: statfs fills the struct it is given; the path is NUL-terminated.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0
            && st.f_type as i64 == AUTOFS_SUPER_MAGIC
        {
            return Ok(());
        }
    }
    let Ok(mut entries) = std::fs::read_dir(mp) else {
        return Ok(());
    };
    match entries.next() {
        Some(Ok(first)) => Err(format!(
            "mount point {} is not empty (it holds {:?}{}): those files would be hidden \
             while mounted; empty it, mount somewhere else, or pass --nonempty (-o nonempty)",
            mp.display(),
            first.file_name(),
            if entries.next().is_some() {
                " and more"
            } else {
                ""
            }
        )),
        _ => Ok(()),
    }
}

/// What to say when the local directory cannot be made or written.
fn local_dir_error(dir: &Path, e: &std::io::Error) -> String {
    let d = dir.display();
    match e.raw_os_error() {
        Some(libc::EROFS) => format!(
            "the local directory {d} is on a read-only filesystem: data files and unsynced \
             writes are kept there, so pick a writable --local-dir"
        ),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            let free = free_bytes(dir).map_or(String::new(), |b| format!(" ({b} bytes free)"));
            format!(
                "the filesystem of the local directory {d} is full{free}: free some space \
                 there or pick another --local-dir"
            )
        }
        Some(libc::EACCES) | Some(libc::EPERM) => format!(
            "cannot write in the local directory {d}: permission denied; pick a --local-dir \
             this user may write in"
        ),
        _ => format!("cannot use the local directory {d}: {e}; pick another --local-dir"),
    }
}

/// Bytes available to this user on the filesystem of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills the struct it is given; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0)
        .then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Writes (and removes) a small file in the local directory: a read-only or
/// full filesystem is refused now, not at the first write through the mount.
fn check_writable(dir: &Path) -> Result<(), String> {
    let probe = dir.join(format!(".s4db-mount-probe-{}", std::process::id()));
    let wrote = (|| {
        let mut f = std::fs::File::create(&probe)?;
        f.write_all(&[0u8; 64 * 1024])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&probe);
    wrote.map_err(|e| local_dir_error(dir, &e))
}

/// Adds what to do to an error of opening the database: check the endpoint
/// and the network, or the credentials.
fn advise(msg: String, args: &MountArgs) -> String {
    let lower = msg.to_ascii_lowercase();
    let refused = [
        "invalidaccesskeyid",
        "signaturedoesnotmatch",
        "accessdenied",
        "access denied",
        "403 forbidden",
        "expiredtoken",
        "invalidtoken",
        "no usable aws credentials",
    ];
    if refused.iter().any(|w| lower.contains(w)) {
        let profile = match &args.profile {
            Some(p) => format!("the profile {p:?} in ~/.aws"),
            None => "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, --profile, or the instance role"
                .to_string(),
        };
        return format!(
            "{msg}\nS3 refused the credentials: check {profile}, and that they may read and \
             write {}",
            args.db
        );
    }
    let unreachable = [
        "could not connect",
        "timed out",
        "dns error",
        "failed to lookup",
        "connection refused",
    ];
    if unreachable.iter().any(|w| lower.contains(w)) {
        let endpoint = match &args.endpoint_url {
            Some(u) => format!("the endpoint {u} (--endpoint-url)"),
            None => "the region (--region) and the endpoint (--endpoint-url)".to_string(),
        };
        return format!(
            "{msg}\nS3 is not reachable from here: check {endpoint}, the network and any \
             proxy (HTTPS_PROXY)"
        );
    }
    msg
}

/// Runs a background loop of the daemon (`make` starts it) for as long as
/// the daemon lives: a panic in it is logged with what it was doing and the
/// loop starts again a second later, so uploads never stop silently.
fn supervise<F, Fut>(rt: &tokio::runtime::Handle, what: &'static str, make: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let handle = rt.clone();
    rt.spawn(async move {
        loop {
            match handle.spawn(make()).await {
                Ok(()) => return,
                Err(e) if e.is_panic() => {
                    tracing::error!("{what} panicked; starting it again: {e}");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(_) => return,
            }
        }
    });
}

fn mount_options(args: &MountArgs, db: &str) -> Vec<MountOption> {
    let mut opts = vec![
        MountOption::FSName(format!("s4db:{db}")),
        MountOption::Subtype("s4db".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        if args.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    if args.allow_other {
        opts.push(MountOption::AllowOther);
    }
    if args.allow_root {
        opts.push(MountOption::AllowRoot);
    }
    if args.auto_unmount {
        opts.push(MountOption::AutoUnmount);
    }
    opts
}

fn serve(
    args: &MountArgs,
    target: &DbTarget,
    local_dir: &Path,
    readiness: &mut Readiness,
    started: std::time::Instant,
    (log_filter, log_level): (FilterHandle, usize),
) -> Result<(), String> {
    use sd_notify::NotifyState;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(4, |n| n.get().max(4)))
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.spawn(cycle_log_level_on_sigusr2(log_filter, log_level));
    // Bound before the mount, so a taken port fails the start, not later.
    let metrics = match args.metrics_addr {
        Some(addr) => Some(
            rt.block_on(tokio::net::TcpListener::bind(addr))
                .map_err(|e| {
                    format!(
                        "cannot serve metrics on {addr}: {e}; pick another --metrics-addr \
                         (or stop what listens there)"
                    )
                })?,
        ),
        None => None,
    };
    notify(&[NotifyState::Status(&format!("opening {}", args.db))]);
    let (fs, store) = rt.block_on(open_fs(args, target, local_dir))?;
    let adapter = FuseAdapter::new(fs.clone(), rt.handle().clone());
    let mut session =
        fuser::Session::new(adapter, &args.mountpoint, &mount_options(args, &args.db))
            .map_err(|e| format!("cannot mount on {}: {e}", args.mountpoint.display()))?;
    fs.set_invalidator(Arc::new(crate::fuse::KernelCaches(session.notifier())));
    tracing::info!(
        "mounted {} ({}) on {}, local directory {}",
        args.db,
        store.describe(),
        args.mountpoint.display(),
        local_dir.display()
    );
    let maintain = maintain_config(args, local_dir);
    supervise(rt.handle(), "background upload", {
        let fs = fs.clone();
        move || fs.clone().run_uploader()
    });
    supervise(rt.handle(), "background refresh", {
        let fs = fs.clone();
        move || fs.clone().run_refresher()
    });
    rt.spawn(fs.clone().preload_hints());
    supervise(rt.handle(), "background maintenance", {
        let fs = fs.clone();
        move || fs.clone().run_maintainer(maintain.clone())
    });
    let unmounter = session.unmount_callable();
    rt.spawn(unmount_on_signal(unmounter, args.mountpoint.clone()));
    if let Some(listener) = metrics {
        let weak = Arc::downgrade(&fs);
        crate::metrics::set_source(move || weak.upgrade().map(|fs| fs.metrics_snapshot()));
        match listener.local_addr() {
            Ok(a) => tracing::info!("metrics at http://{a}/metrics"),
            Err(_) => tracing::info!("metrics served"),
        }
        rt.spawn(crate::metrics::serve(listener));
    }
    readiness.ready();
    let status = format!(
        "mounted {} on {}: {} keys",
        args.db,
        args.mountpoint.display(),
        fs.db().len()
    );
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() } as u32;
    notify(&[
        NotifyState::Ready,
        NotifyState::MainPid(pid),
        NotifyState::Status(&status),
    ]);
    // scripts/bench_scale.sh parses this line.
    let fetched = fs.db().index_fetched_at().duration_since(started);
    let ready = started.elapsed();
    tracing::info!(
        "ready {:.3} s after start: index GET returned at {:.3} s, {} keys loaded {:.3} s after it",
        ready.as_secs_f64(),
        fetched.as_secs_f64(),
        fs.db().len(),
        ready.saturating_sub(fetched).as_secs_f64()
    );
    if !args.foreground {
        detach_stdio();
    }
    let served = session.run();
    drop(session);
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("unmounted; uploading what is left"),
    ]);
    tracing::info!("unmounted; uploading what is left");
    let shut = rt.block_on(fs.shutdown());
    served.map_err(|e| format!("the FUSE session failed: {e}"))?;
    shut.map_err(|e| {
        format!(
            "at unmount: {e} (the writes stay in {} and are published by the next mount)",
            local_dir.display()
        )
    })?;
    tracing::info!("done");
    Ok(())
}

/// The background maintenance from the options.
fn maintain_config(args: &MountArgs, local_dir: &Path) -> crate::fs::maintain::MaintainConfig {
    crate::fs::maintain::MaintainConfig {
        compact_interval: args.compact.0,
        compact: crate::db::CompactOptions {
            min_files: args.compact_min_files.max(2),
            dead_ratio: args.compact_dead_ratio,
            max_round_bytes: args.compact_max_bytes,
            // Writes are published soon anyway (unless uploads are manual).
            publish_unsynced: args.upload_delay.0.is_some(),
        },
        gc_interval: args.gc.0,
        gc_grace: args.gc_grace,
        max_cache_size: match args.max_cache_size {
            Some(CacheSize(cap)) => cap,
            None => Some(crate::fs::maintain::default_cache_cap(local_dir)),
        },
    }
}

async fn open_fs(
    args: &MountArgs,
    target: &DbTarget,
    local_dir: &Path,
) -> Result<(Arc<S4Fs>, Arc<MeteredStore>), String> {
    let fail = |e: &dyn std::fmt::Display| advise(format!("cannot open {}: {e}", args.db), args);
    let inner = args
        .store_options()
        .connect(target)
        .await
        .map_err(|e| fail(&e))?;
    let store = Arc::new(MeteredStore::new(inner));
    let opts = OpenOptions {
        local_dir: Some(local_dir.to_path_buf()),
        max_file_size: args.max_file_size.unwrap_or(DEFAULT_MAX_FILE_SIZE),
        ..OpenOptions::default()
    };
    // Merging sits above metering: the stats count requests actually sent.
    let merged = Arc::new(crate::remote::CoalescingStore::new(store.clone()));
    let db = S4db::open(merged, &target.prefix, opts)
        .await
        .map_err(|e| fail(&e))?;
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let cfg = FsConfig {
        uid: args.uid.unwrap_or(uid),
        gid: args.gid.unwrap_or(gid),
        file_mode: args.file_mode,
        dir_mode: args.dir_mode,
        read_only: args.read_only,
        upload_delay: args.upload_delay.0,
        upload_max_delay: args.upload_max_delay.0,
        refresh_interval: args.refresh_interval.0,
        spill_dir: local_dir.join("spill"),
        stream: crate::fs::stream::StreamConfig {
            part_size: args.read_part_size,
            parallelism: args.max_threads.max(1),
        },
        meta_path: Some(local_dir.join("s4db-mount.meta")),
    };
    let fs = S4Fs::new(db, store.clone(), cfg).map_err(|e| fail(&e))?;
    Ok((fs, store))
}

/// SIGTERM or SIGINT: unmount, which ends the session loop; the upload
/// follows in `serve`. A busy mount is detached lazily instead.
async fn unmount_on_signal(mut unmounter: fuser::SessionUnmounter, mountpoint: PathBuf) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot watch SIGTERM/SIGINT; unmount with fusermount3 -u");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received: unmounting {}", mountpoint.display());
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("signal received: unmounting"),
    ]);
    let _ = unmounter.unmount();
    if is_mounted(&mountpoint) {
        let status = std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(&mountpoint)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            tracing::error!(
                "cannot unmount {}; run fusermount3 -u",
                mountpoint.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_options_fold_into_flags() {
        let mut a = MountArgs::parse_from([
            "s4db-mount",
            "b/p",
            "/mnt",
            "-o",
            "ro,allow_other,uid=7,file_mode=0600,upload_delay=never,refresh_interval=2.5,_netdev,x-systemd.automount",
            "-o",
            "local_dir=/tmp/x",
        ]);
        a.apply_fstab_options().unwrap();
        assert!(a.read_only && a.allow_other);
        assert_eq!(a.uid, Some(7));
        assert_eq!(a.file_mode, 0o600);
        assert_eq!(a.upload_delay, Interval(None));
        assert_eq!(
            a.refresh_interval,
            Interval(Some(Duration::from_millis(2500)))
        );
        assert_eq!(a.local_dir, Some(PathBuf::from("/tmp/x")));
        let mut bad = MountArgs::parse_from(["s4db-mount", "b", "/m", "-o", "frobnicate"]);
        assert!(bad
            .apply_fstab_options()
            .unwrap_err()
            .contains("frobnicate"));
    }

    #[test]
    fn default_local_dir_is_stable_per_database() {
        let a = MountArgs::parse_from(["s4db-mount", "b/p", "/mnt"]);
        let t = DbTarget::parse("b/p").unwrap();
        let d1 = a.default_local_dir(&t);
        assert_eq!(d1, a.default_local_dir(&t));
        assert_ne!(d1, a.default_local_dir(&DbTarget::parse("b/q").unwrap()));
        assert!(d1.to_string_lossy().contains("s4db/mounts/b/p-"));
    }
}
