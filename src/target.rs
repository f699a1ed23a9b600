//! Naming a database (`bucket[/prefix]`) and connecting to its store: the
//! part of configuration the command line and the mount share.

use crate::error::{Error, Result};
use crate::remote::{s3::ChecksumMode, LocalStore, ObjectStore, S3Config, S3Store};
use std::path::PathBuf;
use std::sync::Arc;

/// `bucket/some/prefix` → bucket `bucket`, prefix `some/prefix/`, the same
/// database as the Python `S4DB("bucket", "some/prefix/")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbTarget {
    pub bucket: String,
    pub prefix: String,
}

impl DbTarget {
    pub fn parse(spec: &str) -> Result<DbTarget> {
        let spec = spec.strip_prefix("s3://").unwrap_or(spec);
        let (bucket, prefix) = match spec.split_once('/') {
            Some((b, p)) => (b, p),
            None => (spec, ""),
        };
        if bucket.is_empty() {
            return Err(Error::Usage(format!(
                "{spec:?} names no bucket; write bucket or bucket/prefix"
            )));
        }
        Ok(DbTarget {
            bucket: bucket.to_string(),
            prefix: crate::db::normalize_prefix(prefix),
        })
    }
}

/// Which store to connect to and how.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Use the local-directory backend rooted here instead of S3.
    pub local_store: Option<PathBuf>,
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
    pub profile: Option<String>,
    pub checksums: ChecksumMode,
    /// Part size of multipart uploads (`--write-part-size`); `None`: the
    /// store's default (see [`S3Config`]).
    pub write_part_size: Option<u64>,
}

impl StoreOptions {
    /// Connects to the bucket of `target`.
    pub async fn connect(&self, target: &DbTarget) -> Result<Arc<dyn ObjectStore>> {
        if let Some(root) = &self.local_store {
            return Ok(Arc::new(LocalStore::open(root, &target.bucket)?));
        }
        let mut config = S3Config::new(target.bucket.clone());
        config.endpoint_url = self.endpoint_url.clone();
        config.region = self.region.clone();
        config.force_path_style = self.force_path_style;
        config.profile = self.profile.clone();
        config.checksums = self.checksums;
        if let Some(size) = self.write_part_size {
            config.part_size = size;
        }
        Ok(Arc::new(S3Store::connect(config).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = DbTarget::parse("bucket/some/prefix").unwrap();
        assert_eq!(
            (t.bucket.as_str(), t.prefix.as_str()),
            ("bucket", "some/prefix/")
        );
        let t = DbTarget::parse("s3://bucket/p/").unwrap();
        assert_eq!(t.prefix, "p/");
        assert_eq!(DbTarget::parse("bucket").unwrap().prefix, "");
        assert!(DbTarget::parse("/x").is_err());
    }
}
