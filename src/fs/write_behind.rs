//! Write-behind of large files: the parts of a file being written go up to
//! S3 while it is written, so publishing it later sends only what is left.
//!
//! Once an open file's content reaches the store's multipart threshold, a
//! multipart upload of the data file the value will end up in is started
//! (its id reserved in the engine, `db::own_file`), and each part is sent as
//! soon as a write crosses its end: part `k` holds data-file bytes
//! `[(k-1)·P, k·P)`, the value's bytes shifted by the headers before it.
//! Part 1 (the headers) and the last (the entry CRC) are sent when the file
//! is published, with any part the writer changed after it was sent: the
//! engine checks each sent part's CRC against the finished file.
//!
//! Memory stays at the parts in flight (the store's `parts_in_flight`, 8, ×
//! `--write-part-size`); parts waiting for a slot hold no bytes. A close
//! does not wait for S3: the parts still to go keep going up in the
//! background, and the publish waits for them. A write-behind that is
//! dropped (the file unlinked, truncated to nothing, its content replaced)
//! aborts its upload.

use crate::buffer_pool::BufferPool;
use crate::db::{PartsAhead, S4db};
use crate::remote::{ObjectStore, PartLayout, SentPart};
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

#[derive(Debug)]
pub struct WriteBehind {
    /// The key the parts were cut for (its length fixes the layout).
    key: String,
    file_id: u64,
    object: String,
    upload_id: String,
    part_size: u64,
    /// Where the value starts in the data file.
    value_offset: u64,
    spill: Arc<File>,
    /// Where the value starts in `spill`.
    spill_base: u64,
    store: Arc<dyn ObjectStore>,
    /// Where each part's bytes are read into.
    buffers: Arc<BufferPool>,
    db: S4db,
    /// Where the parts are sent from (writes may come on the FUSE thread).
    rt: tokio::runtime::Handle,
    slots: Arc<Semaphore>,
    /// Set when the upload is aborted: parts still waiting for a slot are
    /// not sent.
    closing: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<SentPart>>>,
    scheduled: BTreeSet<i32>,
    tasks: Vec<JoinHandle<()>>,
    /// Handed to the engine: nothing to abort on drop.
    finished: bool,
}

impl WriteBehind {
    /// Starts a multipart upload for `key`'s value (whose bytes are in
    /// `spill`) when the store has multipart uploads and the content is
    /// already `layout.threshold` bytes or more. `None` when it does not
    /// apply; a failed start is logged and the file is published whole.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        db: &S4db,
        store: Arc<dyn ObjectStore>,
        buffers: Arc<BufferPool>,
        rt: &tokio::runtime::Handle,
        key: &str,
        spill: File,
        spill_base: u64,
        len: u64,
    ) -> Option<WriteBehind> {
        let PartLayout {
            threshold,
            part_size,
            parts_in_flight,
        } = store.part_layout()?;
        if len < threshold {
            return None;
        }
        let file_id = match db.reserve_file_id() {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!("no write-behind for {key:?}: {e}");
                return None;
            }
        };
        let object = db.object_key(&crate::format::data_file_name(file_id));
        let upload_id = match store.start_multipart_upload(&object).await {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!("no write-behind for {key:?} (it is sent when published): {e}");
                return None;
            }
        };
        tracing::debug!("write-behind of {key:?} into {object}, upload {upload_id}");
        Some(WriteBehind {
            key: key.to_string(),
            file_id,
            object,
            upload_id,
            part_size,
            value_offset: S4db::own_file_value_offset(key),
            spill: Arc::new(spill),
            spill_base,
            store,
            buffers,
            db: db.clone(),
            rt: rt.clone(),
            slots: Arc::new(Semaphore::new(parts_in_flight.max(1))),
            closing: Arc::new(AtomicBool::new(false)),
            sent: Arc::new(Mutex::new(Vec::new())),
            scheduled: BTreeSet::new(),
            tasks: Vec::new(),
            finished: false,
        })
    }

    /// A write put `len` bytes at `offset` of the value: sends each part
    /// (but the first, which holds the headers) whose end it crossed.
    pub fn wrote(&mut self, offset: u64, len: u64) {
        let (start, end) = (self.value_offset + offset, self.value_offset + offset + len);
        // Parts whose end e satisfies start < e <= end.
        let first = (start / self.part_size + 1).max(2);
        let last = end / self.part_size;
        for number in first..=last {
            let number = number as i32;
            if self.scheduled.insert(number) {
                self.send(number);
            }
        }
        self.tasks.retain(|t| !t.is_finished());
    }

    fn send(&mut self, number: i32) {
        let part_offset = (number as u64 - 1) * self.part_size;
        let spill_at = part_offset - self.value_offset + self.spill_base;
        let len = self.part_size as usize;
        let (spill, store, buffers, slots, closing, sent) = (
            self.spill.clone(),
            self.store.clone(),
            self.buffers.clone(),
            self.slots.clone(),
            self.closing.clone(),
            self.sent.clone(),
        );
        let (object, upload_id) = (self.object.clone(), self.upload_id.clone());
        self.tasks.push(self.rt.spawn(async move {
            let Ok(_slot) = slots.acquire().await else {
                return;
            };
            if closing.load(Ordering::Relaxed) {
                return; // the upload is being aborted
            }
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = buffers.take(len);
                spill.read_exact_at(&mut buf, spill_at).map(|_| buf)
            })
            .await;
            let data = match read {
                Ok(Ok(data)) => data,
                Ok(Err(e)) => {
                    tracing::debug!("write-behind part {number} of {object}: read: {e}");
                    return;
                }
                Err(_) => return,
            };
            match store
                .upload_part(&object, &upload_id, number, data.into_bytes())
                .await
            {
                Ok(part) => super::lock(&sent).push(part),
                // The publish sends the part from the file instead.
                Err(e) => tracing::debug!("write-behind: {e}"),
            }
        }));
    }

    /// At close (or any put of the value): hands the engine the upload,
    /// whose parts keep going up in the background (a close never waits
    /// for S3; the publish waits for them), when the value is still `key`'s
    /// (a rename changes the layout; the upload is then aborted).
    pub fn finish(mut self, key: &str) -> Option<PartsAhead> {
        if key != self.key {
            return None; // dropped: aborted
        }
        self.finished = true;
        let tasks = std::mem::take(&mut self.tasks);
        let sent = self.sent.clone();
        let all_sent = async move {
            for task in tasks {
                let _ = task.await;
            }
            std::mem::take(&mut *super::lock(&sent))
        };
        Some(PartsAhead {
            file_id: self.file_id,
            upload_id: std::mem::take(&mut self.upload_id),
            part_size: self.part_size,
            sent: Box::pin(all_sent),
            stop: self.closing.clone(),
        })
    }

    /// Parts sent so far (for tests and stats).
    pub fn parts_sent(&self) -> usize {
        super::lock(&self.sent).len()
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.slots.close();
        let ahead = PartsAhead {
            file_id: self.file_id,
            upload_id: std::mem::take(&mut self.upload_id),
            part_size: self.part_size,
            sent: Box::pin(async { Vec::new() }),
            stop: self.closing.clone(),
        };
        let _runtime = self.rt.enter();
        self.db.abort_early_upload(ahead);
    }
}

impl super::S4Fs {
    /// After a write of `len` bytes at `offset` of `path`'s open content:
    /// starts the content's write-behind once it is large enough (sending
    /// the parts already written since the last put), and sends the parts
    /// this write completed.
    pub(super) async fn write_behind(
        &self,
        path: &str,
        content: &mut super::Content,
        offset: u64,
        len: u64,
    ) {
        let (Some(layout), Some(buffers)) = (self.store.part_layout(), &self.part_buffers) else {
            return;
        };
        if content.wants_write_behind(layout.threshold) {
            // Laid out as the data file it will be (the put then links it
            // into place instead of copying it).
            let base = S4db::own_file_value_offset(path);
            if !content.is_laid_out_at(base) {
                if let Err(e) = content.lay_out_as_data_file(base) {
                    tracing::warn!("{path:?} stays in its spill file: {e}");
                }
            }
            let started = match content.spill_handle() {
                Some(Ok((spill, base))) => {
                    let store: Arc<dyn ObjectStore> = self.store.clone();
                    let len = content.len();
                    let buffers = buffers.clone();
                    WriteBehind::start(&self.db, store, buffers, &self.rt, path, spill, base, len)
                        .await
                }
                Some(Err(e)) => {
                    tracing::warn!("no write-behind for {path:?}: {e}");
                    None
                }
                None => None,
            };
            let (from, to) = (content.put_len(), content.len());
            content.set_write_behind(started);
            if let Some(behind) = content.write_behind() {
                behind.wrote(from, to.saturating_sub(from));
            }
        }
        if let Some(behind) = content.write_behind() {
            behind.wrote(offset, len);
        }
    }
}
