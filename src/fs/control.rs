//! The files of `.s4db/`: writing to an action file runs that operation and
//! the write returns when it is done; reading any of them runs nothing, so
//! `grep -r`, `find` and backup tools can walk in safely.

use super::inodes::CONTROL_DIR_INO;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlFile {
    Upload,
    Download,
    Compact,
    RebuildIndex,
    Gc,
    Refresh,
    Stats,
    LastError,
    Unmapped,
}

impl ControlFile {
    pub const ALL: [ControlFile; 9] = [
        ControlFile::Upload,
        ControlFile::Download,
        ControlFile::Compact,
        ControlFile::RebuildIndex,
        ControlFile::Gc,
        ControlFile::Refresh,
        ControlFile::Stats,
        ControlFile::LastError,
        ControlFile::Unmapped,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ControlFile::Upload => "upload",
            ControlFile::Download => "download",
            ControlFile::Compact => "compact",
            ControlFile::RebuildIndex => "rebuild_index",
            ControlFile::Gc => "gc",
            ControlFile::Refresh => "refresh",
            ControlFile::Stats => "stats",
            ControlFile::LastError => "last_error",
            ControlFile::Unmapped => "unmapped",
        }
    }

    pub fn ino(self) -> u64 {
        let i = Self::ALL.iter().position(|c| *c == self).expect("listed");
        CONTROL_DIR_INO + 1 + i as u64
    }

    pub fn from_ino(ino: u64) -> Option<ControlFile> {
        let i = ino.checked_sub(CONTROL_DIR_INO + 1)?;
        Self::ALL.get(i as usize).copied()
    }

    pub fn from_name(name: &str) -> Option<ControlFile> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Writing runs an operation (the others are read-only reports).
    pub fn is_action(self) -> bool {
        !matches!(
            self,
            ControlFile::Stats | ControlFile::LastError | ControlFile::Unmapped
        )
    }

    /// What reading an action file shows: what writing to it does.
    pub fn help(self) -> &'static str {
        match self {
            ControlFile::Upload => "write anything here to publish unsynced writes now\n",
            ControlFile::Download => "write anything here to download every data file into the local directory\n",
            ControlFile::Compact => "write anything here to upload, then rewrite live entries into new files and delete the old ones\n",
            ControlFile::RebuildIndex => "write anything here to rebuild the index from the data files in the bucket and commit it\n",
            ControlFile::Gc => "write anything here to delete data objects no index references (older than 24 h)\n",
            ControlFile::Refresh => "write anything here to load the index other writers committed (fails while writes are unsynced)\n",
            ControlFile::Stats | ControlFile::LastError | ControlFile::Unmapped => "",
        }
    }
}
