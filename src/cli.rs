//! The `s4db` command line: argument parsing and the commands.
//!
//! Exit codes: 0 success, 1 key not found, 2 any other error, with a one-line
//! reason on stderr. Long operations draw a progress bar only on a terminal.

use crate::db::attrs::{Attrs, FileKind, Op};
use crate::db::{OpenOptions, Progress, S4db, ScanMode};
use crate::error::{Error, Result};
use crate::remote::s3::ChecksumMode;
use crate::target::{DbTarget, StoreOptions};
use crate::Value;
use base64::Engine as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "s4db",
    version,
    about = "A key-value store in S3: get, put and maintain an s4db database",
    after_help = "DB is bucket or bucket/prefix (the Python S4DB(bucket, \"prefix/\")).\n\
                  Exit codes: 0 success, 1 key not found, 2 any other error."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// S3 endpoint (also AWS_ENDPOINT_URL), e.g. http://127.0.0.1:9000
    #[arg(long, global = true, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// AWS region (default: from the environment or profile, else us-east-1)
    #[arg(long, global = true, value_name = "R")]
    pub region: Option<String>,
    /// Path-style addressing (http://host/bucket/key), for MinIO, moto and friends
    #[arg(long, global = true)]
    pub force_path_style: bool,
    /// AWS profile from ~/.aws/config
    #[arg(long, global = true, value_name = "P")]
    pub profile: Option<String>,
    /// Working directory for data files; keeps unsynced writes across runs
    #[arg(long, global = true, value_name = "DIR")]
    pub local_dir: Option<PathBuf>,
    /// Use the embedded local-directory backend rooted at DIR instead of S3
    /// (objects are files under DIR/bucket/)
    #[arg(long, global = true, value_name = "DIR", env = "S4DB_LOCAL_STORE")]
    pub local_store: Option<PathBuf>,
    /// Writing commands: keep the writes in --local-dir, do not upload
    #[arg(long, global = true)]
    pub no_upload: bool,
    /// Plain PUTs for services without conditional writes (can lose concurrent commits)
    #[arg(long, global = true)]
    pub unfenced: bool,
    /// Request checksums: when-required works with most S3-compatible services
    #[arg(long, global = true, value_enum, default_value = "when-required")]
    pub checksums: Checksums,
    /// Soft size limit of a data file, in bytes
    #[arg(long, global = true, value_name = "BYTES")]
    pub max_file_size: Option<u64>,
    /// Part size of multipart uploads to S3, in bytes (5 MiB to 5 GiB; default
    /// 8 MiB); data files from 16 MiB (or one part) on are uploaded in parts
    #[arg(long, global = true, value_name = "BYTES")]
    pub write_part_size: Option<u64>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Checksums {
    WhenRequired,
    WhenSupported,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a value's bytes on stdout (exit 1 if the key does not exist)
    Get { db: String, key: String },
    /// Store a value from the argument, or from stdin when omitted
    Put {
        db: String,
        key: String,
        value: Option<String>,
    },
    /// Delete keys (absent keys are skipped)
    Delete {
        db: String,
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// List keys, one per line
    Keys {
        db: String,
        /// Separate keys with NUL bytes instead of newlines
        #[arg(long)]
        null: bool,
        /// Only keys starting with this
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Read JSON Lines from stdin: {"key": K, "value": "text"} or {"key": K, "value_base64": B64},
    /// optionally with "attrs" (see `s4db stat --help`), and {"dir": PATH, "attrs": A} lines
    Import {
        db: String,
        /// Keys per put batch
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Write every key and value to stdout as JSON Lines (the import format), with attributes
    Export { db: String },
    /// Publish local writes (from --local-dir) to the store
    Upload { db: String },
    /// Download every data file and the index into --local-dir
    Download {
        db: String,
        /// Discard unsynced local writes
        #[arg(long)]
        force: bool,
    },
    /// Compact: by default incrementally (merge small data files by size tier,
    /// rewrite mostly dead ones; what they replace is deleted by a later `gc`
    /// once the grace period has passed), or rewrite everything with --full
    Compact {
        db: String,
        /// Rewrite every live entry into new files and delete the old objects at once
        #[arg(long, conflicts_with = "incremental")]
        full: bool,
        /// Bounded rounds until nothing is left to merge (the default)
        #[arg(long)]
        incremental: bool,
        /// Merge a size tier once it holds this many data files
        #[arg(long, default_value_t = 4)]
        min_files: usize,
        /// Rewrite a data file whose live bytes are below this share of its size
        #[arg(long, default_value_t = 0.5)]
        dead_ratio: f64,
        /// Most bytes of data files one round reads
        #[arg(long, default_value_t = 256 * 1024 * 1024)]
        max_bytes: u64,
    },
    /// Rebuild the index by replaying data files and commit it (with --no-upload: only report)
    RebuildIndex {
        db: String,
        /// Download every data file under the prefix first (recovers a lost index)
        #[arg(long)]
        from_s3: bool,
    },
    /// Delete data objects the index does not reference
    Gc {
        db: String,
        /// Keep objects younger than this many seconds
        #[arg(long, default_value_t = 86400)]
        grace: u64,
    },
    /// Print statistics as JSON
    Stats { db: String },
    /// Print a key's file attributes as JSON (exit 1 if the key does not exist)
    #[command(after_help = ATTRS_HELP)]
    Stat { db: String, key: String },
}

const ATTRS_HELP: &str = "Output: {\"key\": K, \"attrs\": A} where A is null when the key has no \
attributes (it was written without them, e.g. by the Python package: the mount's defaults apply), \
else {\"kind\": \"regular\"|\"dir\"|\"symlink\"|\"fifo\"|\"socket\"|\"char-device\"|\"block-device\", \
\"mode\": \"0644\" (octal permission bits), \"mode_numeric\": 420, \"uid\", \"gid\", \"rdev\", \
\"atime\"/\"mtime\"/\"ctime\": {\"secs\": seconds since 1970 (negative before), \"nanos\": 0..999999999}, \
\"link_id\" (hard-link group, 0 = none), \"xattrs\": {name: base64 value}}. \
A path that is not a key but an explicit directory prints {\"dir\": PATH, \"attrs\": A}. \
export writes the same \"attrs\" object on each key's line, and {\"dir\": PATH, \"attrs\": A} lines; \
import reads them back (lines without \"attrs\" import as before).";

/// What `main` exits with.
pub enum Outcome {
    Ok,
    NotFound,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<Outcome> {
    let g = &cli.global;
    let writes = matches!(
        cli.command,
        Command::Put { .. } | Command::Delete { .. } | Command::Import { .. }
    );
    if writes && g.no_upload && g.local_dir.is_none() {
        return Err(Error::Usage(
            "--no-upload needs --local-dir: without it the writes would be lost when s4db exits"
                .into(),
        ));
    }
    if matches!(cli.command, Command::Download { .. }) && g.local_dir.is_none() {
        return Err(Error::Usage(
            "download needs --local-dir (where to put the files)".into(),
        ));
    }
    let db_spec = match &cli.command {
        Command::Get { db, .. }
        | Command::Put { db, .. }
        | Command::Delete { db, .. }
        | Command::Keys { db, .. }
        | Command::Import { db, .. }
        | Command::Export { db }
        | Command::Upload { db }
        | Command::Download { db, .. }
        | Command::Compact { db, .. }
        | Command::RebuildIndex { db, .. }
        | Command::Gc { db, .. }
        | Command::Stats { db }
        | Command::Stat { db, .. } => db.clone(),
    };
    let target = DbTarget::parse(&db_spec)?;
    let store = StoreOptions {
        local_store: g.local_store.clone(),
        endpoint_url: g.endpoint_url.clone(),
        region: g.region.clone(),
        force_path_style: g.force_path_style,
        profile: g.profile.clone(),
        checksums: match g.checksums {
            Checksums::WhenRequired => ChecksumMode::WhenRequired,
            Checksums::WhenSupported => ChecksumMode::WhenSupported,
        },
        write_part_size: g.write_part_size,
    }
    .connect(&target)
    .await?;
    let mut opts = OpenOptions {
        local_dir: g.local_dir.clone(),
        fenced: !g.unfenced,
        ignore_corrupt_index: matches!(cli.command, Command::RebuildIndex { .. }),
        progress: TerminalProgress::new().map(|p| Arc::new(p) as Arc<dyn Progress>),
        ..OpenOptions::default()
    };
    if let Some(max) = g.max_file_size {
        opts.max_file_size = max;
    }
    let store = Arc::new(crate::remote::CoalescingStore::new(store));
    let db = S4db::open(store, &target.prefix, opts).await?;
    let upload = !g.no_upload;
    let mut stdout = std::io::stdout().lock();
    let out = |e: std::io::Error| Error::io("write", "stdout", e);

    match cli.command {
        Command::Get { key, .. } => match db.get(&key).await? {
            Some(value) => {
                stdout.write_all(value.as_bytes()).map_err(out)?;
                stdout.flush().map_err(out)?;
            }
            None => {
                eprintln!("s4db: key {key:?} not found in {db_spec}");
                return Ok(Outcome::NotFound);
            }
        },
        Command::Put { key, value, .. } => {
            let bytes = match value {
                Some(v) => v.into_bytes(),
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .map_err(|e| Error::io("read", "stdin", e))?;
                    buf
                }
            };
            db.put([(key, Value::from_bytes_guess(bytes))])?;
            finish_writes(&db, upload).await?;
        }
        Command::Delete { keys, .. } => {
            let n = db.delete(&keys)?;
            if n < keys.len() {
                eprintln!(
                    "s4db: {} of {} keys did not exist",
                    keys.len() - n,
                    keys.len()
                );
            }
            finish_writes(&db, upload).await?;
        }
        Command::Keys { null, prefix, .. } => {
            let sep: &[u8] = if null { b"\0" } else { b"\n" };
            let keys = match prefix {
                Some(p) => db.keys_with_prefix(&p),
                None => db.keys(),
            };
            let mut w = std::io::BufWriter::new(stdout);
            for k in keys {
                w.write_all(k.as_bytes())
                    .and_then(|_| w.write_all(sep))
                    .map_err(out)?;
            }
            w.flush().map_err(out)?;
        }
        Command::Import { batch, .. } => {
            let n = match import(&db, batch.max(1)) {
                Ok(n) => n,
                Err(e) => {
                    // All or nothing: batches written before the bad line must
                    // not be published by a later command on this --local-dir.
                    db.discard_own_unsynced().await?;
                    return Err(e);
                }
            };
            eprintln!("s4db: imported {n} keys");
            finish_writes(&db, upload).await?;
        }
        Command::Export { .. } => {
            let mut w = std::io::BufWriter::new(stdout);
            let dirs: Vec<(String, AttrsJson)> = db.read_dirs(|d| {
                d.iter()
                    .map(|(p, a)| (p.to_string(), AttrsJson::from(&**a)))
                    .collect()
            });
            for (dir, attrs) in dirs {
                let line = serde_json::json!({ "dir": dir, "attrs": attrs });
                serde_json::to_writer(&mut w, &line)
                    .map_err(std::io::Error::from)
                    .and_then(|_| w.write_all(b"\n"))
                    .map_err(out)?;
            }
            db.scan(ScanMode::Local, |key, value| {
                let attrs = db.attrs(&key).map(|a| AttrsJson::from(&*a));
                let mut line = match value {
                    Value::Text(text) => serde_json::json!({ "key": key, "value": text }),
                    Value::Binary(b) => serde_json::json!({
                        "key": key,
                        "value_base64": base64::engine::general_purpose::STANDARD.encode(b),
                    }),
                };
                if let Some(a) = attrs {
                    line["attrs"] = serde_json::to_value(a).expect("plain JSON");
                }
                serde_json::to_writer(&mut w, &line)
                    .map_err(std::io::Error::from)
                    .and_then(|_| w.write_all(b"\n"))
                    .map_err(out)
            })
            .await?;
            w.flush().map_err(out)?;
        }
        Command::Upload { .. } => {
            let report = db.upload().await?;
            print_json(&mut stdout, &report)?;
        }
        Command::Download { force, .. } => db.download(force).await?,
        Command::Compact { full: true, .. } => {
            db.upload().await?;
            let report = db.compact().await?;
            print_json(&mut stdout, &report)?;
        }
        Command::Compact {
            min_files,
            dead_ratio,
            max_bytes,
            ..
        } => {
            db.upload().await?;
            let opts = crate::db::CompactOptions {
                min_files: min_files.max(2),
                dead_ratio,
                max_round_bytes: max_bytes,
                publish_unsynced: false,
            };
            let mut total = crate::db::RoundReport::default();
            let mut rounds = 0u32;
            while rounds < 1000 {
                let r = db.compact_round(&opts).await?;
                rounds += 1;
                if !r.did_work() {
                    break;
                }
                total.files_merged += r.files_merged;
                total.files_written += r.files_written;
                total.files_retired += r.files_retired;
                total.bytes_read += r.bytes_read;
                total.bytes_written += r.bytes_written;
                total.keys_moved += r.keys_moved;
            }
            let stats = db.stats();
            print_json(
                &mut stdout,
                &serde_json::json!({
                    "mode": "incremental",
                    "rounds": rounds,
                    "files_merged": total.files_merged,
                    "files_written": total.files_written,
                    "files_retired": total.files_retired,
                    "bytes_read": total.bytes_read,
                    "bytes_written": total.bytes_written,
                    "keys_moved": total.keys_moved,
                    "keys": stats.keys,
                    "files_after": stats.data_files,
                }),
            )?;
        }
        Command::RebuildIndex { from_s3, .. } => {
            let report = db.rebuild_index(from_s3).await?;
            for torn in &report.torn {
                eprintln!("s4db: warning: {torn}");
            }
            if upload {
                db.upload().await?;
            }
            print_json(&mut stdout, &report)?;
        }
        Command::Gc { grace, .. } => {
            let deleted = db.gc(Duration::from_secs(grace)).await?;
            print_json(&mut stdout, &serde_json::json!({ "deleted": deleted }))?;
        }
        Command::Stats { .. } => print_json(&mut stdout, &db.stats())?,
        Command::Stat { key, .. } => {
            if db.contains_key(&key) {
                let attrs = db.attrs(&key).map(|a| AttrsJson::from(&*a));
                if attrs.is_none() {
                    eprintln!("s4db: key {key:?} has no attributes (the defaults apply)");
                }
                print_json(
                    &mut stdout,
                    &serde_json::json!({ "key": key, "attrs": attrs }),
                )?;
            } else if let Some(a) = db.dir_attrs(&key) {
                let attrs = AttrsJson::from(&*a);
                print_json(
                    &mut stdout,
                    &serde_json::json!({ "dir": key, "attrs": attrs }),
                )?;
            } else {
                eprintln!("s4db: key {key:?} not found in {db_spec}");
                return Ok(Outcome::NotFound);
            }
        }
    }
    Ok(Outcome::Ok)
}

async fn finish_writes(db: &S4db, upload: bool) -> Result<()> {
    if upload {
        db.upload().await?;
    } else {
        db.flush()?;
    }
    Ok(())
}

fn print_json(w: &mut impl Write, value: &impl serde::Serialize) -> Result<()> {
    serde_json::to_writer_pretty(&mut *w, value)
        .map_err(std::io::Error::from)
        .and_then(|_| w.write_all(b"\n"))
        .map_err(|e| Error::io("write", "stdout", e))
}

/// One import line: `{"key": K, "value": "text"}` or `{"key": K, "value_base64": B64}`,
/// optionally with `"attrs"`; or `{"dir": PATH, "attrs": A}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportLine {
    key: Option<String>,
    dir: Option<String>,
    value: Option<String>,
    value_base64: Option<String>,
    attrs: Option<AttrsJson>,
}

/// Attributes as `stat`, `export` and `import` write them (see [`ATTRS_HELP`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttrsJson {
    pub kind: String,
    pub mode: String,
    pub mode_numeric: u16,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub atime: TimeJson,
    pub mtime: TimeJson,
    pub ctime: TimeJson,
    pub link_id: u64,
    pub xattrs: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeJson {
    pub secs: i64,
    pub nanos: u32,
}

const KINDS: [(FileKind, &str); 7] = [
    (FileKind::Regular, "regular"),
    (FileKind::Dir, "dir"),
    (FileKind::Symlink, "symlink"),
    (FileKind::Fifo, "fifo"),
    (FileKind::Socket, "socket"),
    (FileKind::CharDevice, "char-device"),
    (FileKind::BlockDevice, "block-device"),
];

impl From<&Attrs> for AttrsJson {
    fn from(a: &Attrs) -> Self {
        let t = |t| {
            let (secs, nanos) = crate::db::attr_codec::split_time(t);
            TimeJson { secs, nanos }
        };
        let b64 = &base64::engine::general_purpose::STANDARD;
        AttrsJson {
            kind: KINDS
                .iter()
                .find(|(k, _)| *k == a.kind)
                .map_or("regular", |(_, n)| n)
                .to_string(),
            mode: format!("{:04o}", a.mode),
            mode_numeric: a.mode,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            atime: t(a.atime),
            mtime: t(a.mtime),
            ctime: t(a.ctime),
            link_id: a.link_id,
            xattrs: a
                .xattrs
                .iter()
                .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), b64.encode(v)))
                .collect(),
        }
    }
}

impl AttrsJson {
    /// The attributes, or why they cannot be.
    pub fn to_attrs(&self) -> std::result::Result<Attrs, String> {
        let kind = KINDS
            .iter()
            .find(|(_, n)| *n == self.kind)
            .map(|(k, _)| *k)
            .ok_or_else(|| format!("unknown kind {:?}", self.kind))?;
        let mode = u16::from_str_radix(&self.mode, 8)
            .map_err(|e| format!("mode {:?} is not octal: {e}", self.mode))?;
        if mode != self.mode_numeric || mode > 0o7777 {
            return Err(format!(
                "mode {:?} and mode_numeric {} disagree or exceed 07777",
                self.mode, self.mode_numeric
            ));
        }
        let t = |t: TimeJson| {
            crate::db::attr_codec::join_time(t.secs, t.nanos)
                .ok_or_else(|| format!("bad time {} s {} ns", t.secs, t.nanos))
        };
        let b64 = &base64::engine::general_purpose::STANDARD;
        let mut xattrs = std::collections::BTreeMap::new();
        for (n, v) in &self.xattrs {
            let v = b64
                .decode(v)
                .map_err(|e| format!("xattr {n:?} is not base64: {e}"))?;
            xattrs.insert(n.as_bytes().to_vec(), v);
        }
        Ok(Attrs {
            kind,
            mode,
            uid: self.uid,
            gid: self.gid,
            rdev: self.rdev,
            atime: t(self.atime)?,
            mtime: t(self.mtime)?,
            ctime: t(self.ctime)?,
            link_id: self.link_id,
            xattrs,
        })
    }
}

fn import(db: &S4db, batch: usize) -> Result<u64> {
    let progress = TerminalProgress::new();
    if let Some(p) = &progress {
        p.start("importing", 0, "keys");
    }
    let mut items = Vec::with_capacity(batch);
    let mut count = 0u64;
    // Bytes, not `lines()`: a line that is not UTF-8 must be reported with its number.
    for (i, line) in std::io::stdin().lock().split(b'\n').enumerate() {
        let line = line.map_err(|e| Error::io("read", "stdin", e))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let bad = |why: String| Error::Usage(format!("stdin line {}: {why}", i + 1));
        let parsed: ImportLine = serde_json::from_slice(&line).map_err(|e| bad(e.to_string()))?;
        let attrs = match &parsed.attrs {
            Some(a) => Some(a.to_attrs().map_err(|e| bad(format!("attrs: {e}")))?),
            None => None,
        };
        let key = match (parsed.key, parsed.dir) {
            (Some(key), None) => key,
            (None, Some(dir)) if parsed.value.is_none() && parsed.value_base64.is_none() => {
                crate::db::validate_key(&dir).map_err(|e| bad(e.to_string()))?;
                items.push(Op::SetDir { path: dir, attrs });
                continue;
            }
            _ => {
                return Err(bad(
                    "a line needs \"key\" (with a value) or \"dir\" (with only \"attrs\")".into(),
                ))
            }
        };
        let value = match (parsed.value, parsed.value_base64) {
            (Some(text), None) => Value::Text(text),
            (None, Some(b64)) => Value::Binary(
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|e| bad(format!("value_base64 of {key:?}: {e}")))?,
            ),
            _ => {
                return Err(bad(format!(
                    "key {key:?} needs exactly one of \"value\" and \"value_base64\""
                )))
            }
        };
        crate::db::validate_key(&key).map_err(|e| bad(e.to_string()))?;
        items.push(Op::Put { key, value, attrs });
        if items.len() >= batch {
            count += write_imported(db, std::mem::take(&mut items))?;
            if let Some(p) = &progress {
                p.advance(batch as u64);
            }
        }
    }
    count += write_imported(db, items)?;
    if let Some(p) = &progress {
        p.finish();
    }
    Ok(count)
}

/// Writes one batch of imported lines; returns how many keys it put. A
/// batch without attributes goes through `put` (the bulk-load path).
fn write_imported(db: &S4db, items: Vec<Op>) -> Result<u64> {
    let keys = items.iter().filter(|o| matches!(o, Op::Put { .. })).count() as u64;
    let plain = items
        .iter()
        .all(|o| matches!(o, Op::Put { attrs: None, .. }));
    if plain {
        db.put(items.into_iter().filter_map(|o| match o {
            Op::Put { key, value, .. } => Some((key, value)),
            _ => None,
        }))?;
    } else {
        db.write(items)?;
    }
    Ok(keys)
}

/// A progress bar on stderr, only when stderr is a terminal.
struct TerminalProgress {
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl TerminalProgress {
    fn new() -> Option<TerminalProgress> {
        std::io::stderr().is_terminal().then(|| TerminalProgress {
            bar: Mutex::new(None),
        })
    }
}

impl Progress for TerminalProgress {
    fn start(&self, what: &str, total: u64, unit: &str) {
        let bar = if total == 0 {
            indicatif::ProgressBar::new_spinner()
        } else {
            indicatif::ProgressBar::new(total)
        };
        let template = if total == 0 {
            format!("{{spinner}} {what}: {{human_pos}} {unit} ({{elapsed}})")
        } else {
            format!("{what} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} (eta {{eta}})")
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
            bar.set_style(style);
        }
        *self.bar.lock().unwrap() = Some(bar);
    }

    fn advance(&self, n: u64) {
        if let Some(bar) = &*self.bar.lock().unwrap() {
            bar.inc(n);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.lock().unwrap().take() {
            bar.finish_and_clear();
        }
    }
}
