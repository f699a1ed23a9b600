//! Which keys can be paths, and which names can be keys.
//!
//! A key `a/b/c` is file `c` in directories `a/b`. Keys that cannot be paths
//! are hidden from the tree (and listed in `.s4db/unmapped`); names that
//! cannot be keys are refused with an errno, never rewritten.

use super::error::{FsError, FsResult};
use crate::format::{range_from, Key};
use std::collections::BTreeMap;
use std::ffi::OsStr;

/// Longest name component Linux accepts.
pub const MAX_NAME_BYTES: usize = 255;
/// The control directory at the mount root; keys under it are never shown.
pub const CONTROL_DIR: &str = ".s4db";

/// Whether every component of `key` is a usable path component and the key
/// is not under the control directory. Shadowing (a file `d` beside keys
/// `d/...`) needs the index: see [`is_shadowed`].
pub fn key_is_path(key: &str) -> bool {
    !key.is_empty()
        && key.split('/').enumerate().all(|(i, c)| {
            !(c.is_empty()
                || c == "."
                || c == ".."
                || c.len() > MAX_NAME_BYTES
                || c.contains('\0')
                || (i == 0 && c == CONTROL_DIR))
        })
}

/// Whether a shown key lies under `key/`: the directory wins and file `key` is hidden.
pub fn is_shadowed<V>(index: &BTreeMap<Key, V>, key: &str) -> bool {
    has_path_under(index, &format!("{key}/"))
}

/// Whether a key that can be a path starts with `prefix`: what makes a
/// directory exist (hidden keys imply nothing).
pub fn has_path_under<V>(index: &BTreeMap<Key, V>, prefix: &str) -> bool {
    range_from(index, prefix)
        .take_while(|(k, _)| k.starts_with(prefix))
        .any(|(k, _)| key_is_path(k))
}

/// Keys the tree does not show, in key order.
pub fn unmapped_keys<V>(index: &BTreeMap<Key, V>) -> Vec<String> {
    index
        .keys()
        .filter(|k| !key_is_path(k) || is_shadowed(index, k))
        .map(Key::to_string)
        .collect()
}

/// A name a program gives for a new file or directory, checked to be a key component.
pub fn new_component(name: &OsStr) -> FsResult<&str> {
    let s = name
        .to_str()
        .ok_or_else(|| FsError::InvalidName(format!("{name:?} is not UTF-8; keys are UTF-8")))?;
    if s.len() > MAX_NAME_BYTES {
        return Err(FsError::NameTooLong(s.len()));
    }
    if s.is_empty() || s == "." || s == ".." || s.contains('\0') {
        return Err(FsError::InvalidName(format!("{s:?}")));
    }
    Ok(s)
}

/// The path of `name` inside directory `parent` ("" is the root).
pub fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        // Not `format!`: this runs for every entry of every listing.
        let mut path = String::with_capacity(parent.len() + 1 + name.len());
        path.push_str(parent);
        path.push('/');
        path.push_str(name);
        path
    }
}

/// The first key after every key under `dir/`: the range scan of a listing
/// skips a whole subdirectory with it ('0' sorts right after '/').
pub fn after_subtree(dir_prefix: &str, child: &str) -> String {
    format!("{dir_prefix}{child}0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_are_paths() {
        for ok in ["a", "a/b/c", "ü/x", ".hidden", "a/.s4db"] {
            assert!(key_is_path(ok), "{ok}");
        }
        let long = "x".repeat(256);
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "./y",
            "a/../b",
            ".s4db",
            ".s4db/k",
            long.as_str(),
        ] {
            assert!(!key_is_path(bad), "{bad}");
        }
    }

    #[test]
    fn shadowed_files_are_unmapped() {
        let index: BTreeMap<Key, ()> = ["d", "d!", "d/e", "h", "h//x", "x//y", "z"]
            .into_iter()
            .map(|k| (k.into(), ()))
            .collect();
        assert_eq!(unmapped_keys(&index), vec!["d", "h//x", "x//y"]);
        assert!(!has_path_under(&index, "x/"));
    }

    #[test]
    fn new_names() {
        assert!(matches!(
            new_component(OsStr::new(&"n".repeat(256))),
            Err(FsError::NameTooLong(256))
        ));
        assert!(new_component(OsStr::new("ok.txt")).is_ok());
        assert!(new_component(OsStr::new("..")).is_err());
    }
}
