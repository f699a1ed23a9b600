//! The mount's background maintenance: incremental compaction rounds, gc,
//! the size cap of the local directory, and pruning of per-file memory, so a
//! mount can run for months with a bounded object count, a bounded local
//! directory and flat memory (README, "A mount that runs for months").
//!
//! Every `tick` the loop evicts published data files past the cache cap;
//! every `compact_interval` it runs compaction rounds (each bounded by its
//! read budget, holding the engine's maintenance lock for one round: an
//! upload waits at most that long) while they find work; every `gc_interval`
//! it runs gc with `gc_grace` (at most `GC_MAX_OBJECTS` deletions a run).
//! gc keeps what the committed index may name while writes are unsynced;
//! compaction starts with writes unsynced only when uploads are automatic
//! (its commit publishes them), else at the next quiet turn.

use super::*;
use crate::db::CompactOptions;
use std::collections::HashSet;

/// How the background maintenance runs.
#[derive(Debug, Clone)]
pub struct MaintainConfig {
    /// Compaction rounds this often; `None`: never (`.s4db/compact` still works).
    pub compact_interval: Option<Duration>,
    pub compact: CompactOptions,
    /// gc this often; `None`: never.
    pub gc_interval: Option<Duration>,
    /// What gc leaves alone: unreferenced objects younger than this, and
    /// retired ones retired less than this ago.
    pub gc_grace: Duration,
    /// Cap of the data files in the local directory; `None`: unlimited.
    pub max_cache_size: Option<u64>,
}

/// Rounds run back to back while they find work, at most.
const ROUNDS_PER_TURN: usize = 8;
/// How often the cache cap and memory are checked, at most.
const TICK: Duration = Duration::from_secs(5);
/// Data files one gc run deletes at most (and their hints), concurrently.
const GC_MAX_OBJECTS: usize = 500;
/// How often per-file memory is pruned (one pass over the index).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

impl Default for MaintainConfig {
    fn default() -> Self {
        MaintainConfig {
            compact_interval: Some(Duration::from_secs(60)),
            compact: CompactOptions::default(),
            gc_interval: Some(Duration::from_secs(3600)),
            gc_grace: Duration::from_secs(3600),
            max_cache_size: Some(4 << 30),
        }
    }
}

/// The default cap of the local directory: 10% of its file system, at most 4 GiB
/// (at least 64 MiB).
pub fn default_cache_cap(dir: &std::path::Path) -> u64 {
    const MAX: u64 = 4 << 30;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return MAX;
    };
    // SAFETY: statvfs fills the struct we pass; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return MAX;
    }
    let size = st.f_blocks as u64 * st.f_frsize as u64;
    (size / 10).clamp(64 << 20, MAX)
}

/// What the loop reports in `.s4db/stats`.
#[derive(Debug, Default)]
pub(super) struct MaintState {
    pub cfg: Option<MaintainConfig>,
    pub last_error: Option<String>,
}

impl S4Fs {
    /// Runs the background maintenance forever (spawn it once).
    pub async fn run_maintainer(self: Arc<Self>, cfg: MaintainConfig) {
        lock(&self.maint).cfg = Some(cfg.clone());
        let writes = !self.cfg.read_only;
        let tick = [cfg.compact_interval, cfg.gc_interval]
            .into_iter()
            .flatten()
            .chain([TICK])
            .min()
            .unwrap_or(TICK)
            .max(Duration::from_millis(10));
        let start = Instant::now();
        let (mut next_compact, mut next_gc) = (
            cfg.compact_interval.map(|d| start + d),
            cfg.gc_interval.map(|d| start + d),
        );
        let mut next_prune = start + PRUNE_EVERY;
        loop {
            tokio::time::sleep(tick).await;
            if let Some(cap) = cfg.max_cache_size {
                if let Err(e) = self.db.evict_local(cap) {
                    self.maint_error("evicting from the local directory", &e);
                }
            }
            let now = Instant::now();
            let quiet = cfg.compact.publish_unsynced || !self.db.has_unsynced_writes();
            if writes && next_compact.is_some_and(|t| now >= t) && quiet {
                next_compact = cfg.compact_interval.map(|d| now + d);
                self.compact_turn(&cfg.compact).await;
            }
            if writes && next_gc.is_some_and(|t| now >= t) {
                next_gc = cfg.gc_interval.map(|d| now + d);
                match self.db.gc_round(cfg.gc_grace, GC_MAX_OBJECTS).await {
                    Ok(deleted) => crate::metrics::global().gc(true, deleted.len() as u64, 0),
                    Err(crate::Error::Unsynced(_)) => {}
                    Err(e) => {
                        crate::metrics::global().gc(false, 0, 0);
                        self.maint_error("background gc", &e);
                    }
                }
            }
            if now >= next_prune {
                next_prune = now + PRUNE_EVERY;
                self.prune_memory();
            }
        }
    }

    /// Compaction rounds while they find work (bounded).
    pub(super) async fn compact_turn(&self, opts: &CompactOptions) {
        for _ in 0..ROUNDS_PER_TURN {
            let round = self.db.compact_round(opts).await;
            // Keys may have moved, even in a round that failed part way.
            self.changes.changed();
            if !matches!(&round, Ok(r) if !r.did_work())
                && !matches!(round, Err(crate::Error::Unsynced(_)))
            {
                crate::metrics::global().compaction_round(&round);
            }
            match round {
                Ok(r) => {
                    // Values did not change, only where they are: their sizes
                    // and put times move along.
                    for (_, old, new) in &r.moves {
                        if let Some(m) = self.meta.get(*old) {
                            self.meta.insert(*new, m);
                        }
                    }
                    if let Err(e) = self.meta.save() {
                        tracing::warn!("cannot save value sizes: {e}");
                    }
                    if !r.did_work() {
                        return;
                    }
                }
                // Writes came meanwhile: the upload goes first.
                Err(crate::Error::Unsynced(_)) => return,
                Err(e) => {
                    self.maint_error("background compaction", &e);
                    // The copies and moves are kept: the next upload commits them.
                    if self.db.has_unsynced_writes() {
                        lock(&self.first_unsynced).get_or_insert(Instant::now());
                        self.upload_wanted.notify_one();
                    }
                    return;
                }
            }
        }
    }

    fn maint_error(&self, what: &str, e: &dyn std::fmt::Display) {
        lock(&self.maint).last_error = Some(format!("{} {what}: {e}", humantime_now()));
        self.record_error(what, e);
    }

    /// Forgets per-file facts of data files the index no longer references
    /// (hint lookups, hint lengths) and sizes of entries that are gone, so
    /// memory follows the live data, not the history.
    pub(super) fn prune_memory(&self) {
        let hinted = lock(&self.hinted).len();
        let (files, keys): (HashSet<u64>, usize) = self
            .db
            .read_index(|idx| (idx.values().map(|l| l.file_id).collect(), idx.len()));
        if hinted > files.len() + 64 {
            lock(&self.hinted).retain(|id, _| files.contains(id));
        }
        let live = || {
            self.db
                .read_index(|idx| idx.values().map(|l| (l.file_id, l.offset)).collect())
        };
        if let Err(e) = self.meta.prune(&files, keys, live) {
            tracing::warn!("cannot rewrite the value sizes file: {e}");
        }
        self.prune_small_values();
        return_free_memory();
    }

    /// Drops cached small values of entries the index no longer names (and
    /// no open or detached inode reads): values of overwritten or deleted
    /// keys, which nothing will ask for again.
    pub(super) fn prune_small_values(&self) {
        let cached = self.small_values.files();
        if cached.is_empty() {
            return;
        }
        let mut live: HashSet<(u64, u64)> = self.db.read_index(|idx| {
            idx.values()
                .filter(|l| cached.contains(&l.file_id))
                .map(|l| (l.file_id, l.offset))
                .collect()
        });
        live.extend(lock(&self.detached).values().map(|l| (l.file_id, l.offset)));
        self.small_values
            .retain(|l| live.contains(&(l.file_id, l.offset)));
    }

    /// The `memory` part of `.s4db/stats`: entries of the main in-memory
    /// maps, which must follow the live data, not the history.
    pub(super) fn memory_json(&self) -> serde_json::Value {
        let (sizes, hint_files, hint_values) = self.meta.usage();
        let (small_values, small_value_bytes) = self.small_values.usage();
        let mut v = serde_json::to_value(self.db.memory_stats()).unwrap_or_default();
        if let serde_json::Value::Object(m) = &mut v {
            let fs = serde_json::json!({
                "inodes": lock(&self.inodes).bound().len(),
                "open_files": lock(&self.open_files).len(),
                "handles": lock(&self.handles).len(),
                "served": lock(&self.served).len(),
                "cached": lock(&self.cached).len(),
                "detached": lock(&self.detached).len(),
                "hinted": lock(&self.hinted).len(),
                "resolving": lock(&self.resolving).len(),
                "value_sizes": sizes,
                "hint_files": hint_files,
                "hint_values": hint_values,
                "small_values": small_values,
                "small_value_bytes": small_value_bytes,
            });
            if let serde_json::Value::Object(fs) = fs {
                m.extend(fs);
            }
            m.insert("rss_bytes".into(), serde_json::json!(rss_bytes()));
        }
        v
    }

    /// The `maintenance` part of `.s4db/stats`.
    pub(super) fn maintenance_json(&self) -> serde_json::Value {
        let st = lock(&self.maint);
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        let mut v = serde_json::to_value(self.db.maintenance_stats()).unwrap_or_default();
        if let serde_json::Value::Object(m) = &mut v {
            let cfg = st.cfg.as_ref();
            m.insert(
                "compact_interval_seconds".into(),
                serde_json::json!(secs(cfg.and_then(|c| c.compact_interval))),
            );
            m.insert(
                "gc_interval_seconds".into(),
                serde_json::json!(secs(cfg.and_then(|c| c.gc_interval))),
            );
            m.insert(
                "gc_grace_seconds".into(),
                serde_json::json!(cfg.map(|c| c.gc_grace.as_secs_f64())),
            );
            m.insert(
                "max_cache_size".into(),
                serde_json::json!(cfg.and_then(|c| c.max_cache_size)),
            );
            m.insert(
                "local_cache_bytes".into(),
                serde_json::json!(self.db.local_data_bytes().unwrap_or(0)),
            );
            m.insert("last_error".into(), serde_json::json!(st.last_error));
        }
        v
    }
}

/// The process's resident memory (`VmRSS`), when the system says.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Hands the allocator's free pages back to the system. glibc keeps what a
/// burst freed (an upload's buffers, a compaction's copies, a listing) in
/// each thread's arena, and trims only an arena's top, so a long-running
/// daemon's RSS creeps up with the bursts it has seen although what it
/// holds stays the same; `malloc_trim` releases the free pages inside every
/// arena too.
fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
