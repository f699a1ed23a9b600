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
    /// Upload at most this many seconds after the oldest unpublished write,
    /// even while writes keep coming (a steady writer never leaves the
    /// debounce quiet), or `never`
    #[arg(long, value_name = "SECONDS|never", value_parser = parse_delay, default_value = "10")]
    pub upload_max_delay: Interval,
    /// Load what other writers committed every SECONDS while nothing is
    /// unsynced (one GET of the index), or `never` (only .s4db/refresh)
    #[arg(long, value_name = "SECONDS|never", value_parser = parse_delay, default_value = "60")]
    pub refresh_interval: Interval,
    /// Stay in the foreground
    #[arg(short, long)]
    pub foreground: bool,
    /// Verbose logging
    #[arg(short, long)]
    pub debug: bool,
    /// Where the daemon logs (default: LOCAL_DIR/s4db-mount.log; stderr with -f)
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// Options in fstab style: ro, allow_other, uid=N, upload_delay=never, ...
    #[arg(short = 'o', value_name = "OPT[,OPT...]")]
    pub options: Vec<String>,
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
                "file_mode" => self.file_mode = parse_mode(need()?)?,
                "dir_mode" => self.dir_mode = parse_mode(need()?)?,
                "upload_delay" => self.upload_delay = parse_delay(need()?)?,
                "upload_max_delay" => self.upload_max_delay = parse_delay(need()?)?,
                "refresh_interval" => self.refresh_interval = parse_delay(need()?)?,
                "endpoint_url" => self.endpoint_url = Some(need()?.to_string()),
                "region" => self.region = Some(need()?.to_string()),
                "profile" => self.profile = Some(need()?.to_string()),
                "local_dir" => self.local_dir = Some(need()?.into()),
                "local_store" => self.local_store = Some(need()?.into()),
                "log_file" => self.log_file = Some(need()?.into()),
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

fn init_logging(args: &MountArgs, log_file: Option<&Path>) -> Result<(), String> {
    let default = if args.debug {
        "s4db=debug,fuser=info"
    } else {
        "s4db=info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("S4DB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

/// glibc raises its mmap threshold to the largest block freed (up to 32 MB):
/// after the first large buffer, the start-up's others (the index object and
/// its parsed entries, hint objects) come from the heap and stay resident
/// once freed. A fixed threshold keeps each in a mapping of its own, returned
/// to the system when freed.
fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: sets one allocator parameter; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Everything from arguments to exit: mount, serve, upload at unmount.
pub fn main() -> ExitCode {
    let started = std::time::Instant::now();
    return_large_buffers_to_the_system();
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
    if let Err(e) = init_logging(&args, log_file.as_deref()) {
        readiness.failed(&e);
        return ExitCode::from(2);
    }
    // A daemon's stderr is /dev/null: panics must reach the log.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!("{info}");
        default_hook(info);
    }));
    match serve(&args, &target, &local_dir, &mut readiness, started) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
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
    if let Some(root) = &args.local_store {
        args.local_store = Some(absolute(root));
    }
    let local_dir = match &args.local_dir {
        Some(d) => absolute(d),
        None => args.default_local_dir(&target),
    };
    std::fs::create_dir_all(&local_dir).map_err(|e| {
        format!(
            "cannot create the local directory {}: {e}",
            local_dir.display()
        )
    })?;
    if let Some(log) = &args.log_file {
        args.log_file = Some(absolute(log));
    }
    Ok((target, local_dir))
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
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(4, |n| n.get().max(4)))
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let (fs, store) = rt.block_on(open_fs(args, target, local_dir))?;
    let adapter = FuseAdapter::new(fs.clone(), rt.handle().clone());
    let mut session =
        fuser::Session::new(adapter, &args.mountpoint, &mount_options(args, &args.db))
            .map_err(|e| format!("cannot mount on {}: {e}", args.mountpoint.display()))?;
    tracing::info!(
        "mounted {} ({}) on {}, local directory {}",
        args.db,
        store.describe(),
        args.mountpoint.display(),
        local_dir.display()
    );
    rt.spawn(fs.clone().run_uploader());
    rt.spawn(fs.clone().run_refresher());
    rt.spawn(fs.clone().preload_hints());
    let unmounter = session.unmount_callable();
    rt.spawn(unmount_on_signal(unmounter, args.mountpoint.clone()));
    readiness.ready();
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

async fn open_fs(
    args: &MountArgs,
    target: &DbTarget,
    local_dir: &Path,
) -> Result<(Arc<S4Fs>, Arc<MeteredStore>), String> {
    let fail = |e: &dyn std::fmt::Display| format!("cannot open {}: {e}", args.db);
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
