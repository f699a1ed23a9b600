//! Control files, the debounced upload, the periodic refresh and the upload at unmount.

use super::*;

/// The figures of `statfs(2)`, in blocks of `bsize` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

impl S4Fs {
    pub(super) fn control_contents(&self, c: ControlFile) -> Vec<u8> {
        match c {
            ControlFile::Stats => {
                let mut s = serde_json::to_string_pretty(&self.stats_json()).unwrap_or_default();
                s.push('\n');
                s.into_bytes()
            }
            ControlFile::LastError => lock(&self.last_error).clone().into_bytes(),
            ControlFile::Unmapped => {
                let keys = self.db.read_index(names::unmapped_keys);
                let mut out = String::new();
                for k in keys {
                    out.push_str(&serde_json::to_string(&k).unwrap_or_default());
                    out.push('\n');
                }
                out.into_bytes()
            }
            _ => c.help().as_bytes().to_vec(),
        }
    }

    /// What `df` shows: the live bytes and keys as used, of a capacity as
    /// large as other S3 filesystems state (1 PiB, 2^32 files).
    pub fn statfs(&self) -> StatFs {
        const BSIZE: u32 = 4096;
        const CAPACITY: u64 = 1 << 50;
        const FILES: u64 = 1 << 32;
        let s = self.db.stats();
        let blocks = CAPACITY / BSIZE as u64;
        let used = s.live_bytes.div_ceil(BSIZE as u64).min(blocks);
        let files = (s.keys as u64).max(FILES);
        StatFs {
            blocks,
            bfree: blocks - used,
            files,
            ffree: files - s.keys as u64,
            bsize: BSIZE,
            namelen: names::MAX_NAME_BYTES as u32,
        }
    }

    pub fn stats_json(&self) -> serde_json::Value {
        let s = self.db.stats();
        serde_json::json!({
            "store": s.store,
            "prefix": s.prefix,
            "keys": s.keys,
            "files": s.data_files,
            "bytes": s.live_bytes,
            "unsynced_writes": s.unsynced_changes,
            "unpublished_files": s.unpublished_files,
            "open_files": lock(&self.open_files).len(),
            "s3_requests": self.store.counts(),
            "cache_hits": self.cache_hits.load(Ordering::Relaxed),
            "index_etag": s.index_etag,
            "writer_id": s.writer_id,
            "local_dir": s.local_dir,
            "read_only": self.cfg.read_only,
            "upload_delay_seconds": self.cfg.upload_delay.map(|d| d.as_secs_f64()),
            "upload_max_delay_seconds": self.cfg.upload_max_delay.map(|d| d.as_secs_f64()),
            "oldest_unsynced_write_seconds": self.oldest_unsynced_age().map(|d| d.as_secs_f64()),
            "refresh_interval_seconds": self.cfg.refresh_interval.map(|d| d.as_secs_f64()),
            "last_error": lock(&self.last_error).clone(),
            "maintenance": self.maintenance_json(),
            "memory": self.memory_json(),
        })
    }

    /// The database's state for a metrics scrape.
    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        let s = self.db.stats();
        crate::metrics::Snapshot {
            keys: s.keys as u64,
            live_bytes: s.live_bytes,
            data_files: s.data_files as u64,
            unsynced_entries: (s.unsynced_changes + s.unsynced_attr_changes) as u64,
            unpublished_files: s.unpublished_files as u64,
            oldest_unsynced_write: self.oldest_unsynced_age(),
            open_files: lock(&self.open_files).len() as u64,
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
        }
    }

    pub(super) fn record_error(&self, what: &str, e: &dyn std::fmt::Display) {
        let when = humantime_now();
        let msg = format!("{when} {what}: {e}\n");
        tracing::error!("{}", msg.trim_end());
        *lock(&self.last_error) = msg;
    }

    /// Runs the operation of an action control file and waits for it.
    pub async fn run_control(&self, c: ControlFile) -> FsResult<()> {
        if !c.is_action() {
            return Err(FsError::NotPermitted("this control file is read-only"));
        }
        let mutates = !matches!(c, ControlFile::Refresh | ControlFile::Download);
        if mutates {
            self.check_writable()?;
        }
        let result = self.control_op(c).await;
        // Keys may have moved or come in (compaction, download, refresh).
        self.changes.changed();
        if let Err(e) = &result {
            self.record_error(c.name(), e);
        }
        result
    }

    pub(super) async fn control_op(&self, c: ControlFile) -> FsResult<()> {
        let db = &self.db;
        match c {
            ControlFile::Upload => self.upload().await,
            ControlFile::Download => Ok(db.download(false).await?),
            ControlFile::Compact => {
                self.upload().await?;
                let before: Vec<(crate::format::Key, Location)> =
                    db.read_index(|idx| idx.iter().map(|(k, l)| (k.clone(), *l)).collect());
                let compacted = db.compact().await;
                crate::metrics::global().compaction(&compacted);
                compacted?;
                // Values did not change, only where they are: their sizes and
                // put times move along (so `rsync -a` sees nothing new).
                for (key, old) in before {
                    if let (Some(m), Some(new)) = (self.meta.get(old), db.location(&key)) {
                        self.meta.insert(new, m);
                    }
                }
                self.meta.save()?;
                Ok(())
            }
            ControlFile::RebuildIndex => {
                db.rebuild_index(true).await?;
                self.upload().await
            }
            ControlFile::Gc => {
                // The sizes of what gc may delete, for the metrics (gc names
                // the files it deleted, not their sizes).
                let sizes: HashMap<String, u64> =
                    match crate::remote::ObjectStore::list(&*self.store, db.prefix()).await {
                        Ok(objects) => objects
                            .into_iter()
                            .map(|o| (o.key.trim_start_matches(db.prefix()).to_string(), o.size))
                            .collect(),
                        Err(_) => HashMap::new(),
                    };
                let r = db.gc(Duration::from_secs(24 * 3600)).await;
                let deleted = r.as_ref().map_or(&[][..], |d| d.as_slice());
                let bytes = deleted.iter().filter_map(|n| sizes.get(n)).sum();
                crate::metrics::global().gc(r.is_ok(), deleted.len() as u64, bytes);
                r?;
                Ok(())
            }
            ControlFile::Refresh => {
                if db.has_unsynced_data() {
                    return Err(crate::Error::Unsynced(
                        "refresh would mix in unpublished writes; write to .s4db/upload first"
                            .into(),
                    )
                    .into());
                }
                self.refresh().await?;
                Ok(())
            }
            ControlFile::Stats | ControlFile::LastError | ControlFile::Unmapped => {
                Err(FsError::NotPermitted("this control file is read-only"))
            }
        }
    }

    pub(super) async fn upload(&self) -> FsResult<()> {
        if self.db.has_unsynced_writes() {
            // Writes from here on are not in this upload: they start a new wait.
            let pending = lock(&self.first_unsynced).take();
            let taken = crate::metrics::global().upload_started();
            let uploaded = self.db.upload().await;
            crate::metrics::global().upload_finished(taken, &uploaded);
            if uploaded.as_ref().is_ok_and(|r| r.rebases > 0) {
                // The commit took in another writer's changes.
                self.invalidate_changed().await;
            }
            if let Err(e) = uploaded {
                let mut first = lock(&self.first_unsynced);
                *first = match (pending, *first) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                return Err(e.into());
            }
        }
        self.meta.save()?;
        Ok(())
    }

    /// Something was put or deleted: schedule the debounced upload.
    pub(super) fn wrote(&self) {
        self.changes.changed();
        let now = Instant::now();
        *lock(&self.last_write) = now;
        lock(&self.first_unsynced).get_or_insert(now);
        self.upload_wanted.notify_one();
    }

    /// How long the oldest unpublished write has waited.
    pub fn oldest_unsynced_age(&self) -> Option<Duration> {
        lock(&self.first_unsynced).map(|t| t.elapsed())
    }

    /// Uploads `upload_delay` after the last write, or `upload_max_delay`
    /// after the oldest unpublished one if writes never pause that long,
    /// forever (spawn it once).
    pub async fn run_uploader(self: Arc<Self>) {
        let Some(delay) = self.cfg.upload_delay else {
            return;
        };
        loop {
            self.upload_wanted.notified().await;
            loop {
                let quiet = lock(&self.last_write).elapsed();
                if quiet >= delay {
                    break;
                }
                let mut wait = delay - quiet;
                if let (Some(max), Some(age)) =
                    (self.cfg.upload_max_delay, self.oldest_unsynced_age())
                {
                    if age >= max {
                        break;
                    }
                    wait = wait.min(max - age);
                }
                tokio::time::sleep(wait).await;
            }
            if let Err(e) = self.upload().await {
                self.record_error("background upload", &e);
                tokio::time::sleep(UPLOAD_RETRY).await;
                self.upload_wanted.notify_one();
            }
        }
    }

    /// Picks up other writers' commits every `refresh_interval`, skipping a
    /// turn while this mount has writes to publish (forever; spawn it once).
    pub async fn run_refresher(self: Arc<Self>) {
        let Some(every) = self.cfg.refresh_interval else {
            return;
        };
        loop {
            tokio::time::sleep(every).await;
            // Pending attribute changes alone (atimes) rebase record by record.
            if self.db.has_unsynced_data() {
                continue;
            }
            match self.refresh().await {
                Ok(true) => tracing::info!("picked up another writer's commit"),
                Ok(false) => {}
                Err(e) => self.record_error("background refresh", &e),
            }
        }
    }

    /// At unmount: put what open files still hold, upload, and make the
    /// local directory durable.
    pub async fn shutdown(&self) -> FsResult<()> {
        let opens: Vec<(u64, Arc<OpenFile>)> = lock(&self.open_files)
            .iter()
            .map(|(i, o)| (*i, o.clone()))
            .collect();
        for (ino, open) in opens {
            if let Err(e) = self.commit_open(ino, &open).await {
                self.record_error("saving an open file at unmount", &e);
            }
        }
        let mut result = Ok(());
        if !self.cfg.read_only {
            for attempt in 1..=3 {
                result = self.upload().await;
                match &result {
                    Ok(()) => break,
                    Err(e) => {
                        self.record_error(&format!("upload at unmount (attempt {attempt})"), e)
                    }
                }
            }
        }
        self.db.flush()?;
        self.meta.save()?;
        result
    }
}
