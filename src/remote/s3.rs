// placeholder until the S3 backend lands (helper is writing it)
use std::time::Duration;
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChecksumMode {
    #[default]
    WhenRequired,
    WhenSupported,
}
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub force_path_style: bool,
    pub profile: Option<String>,
    pub credentials: Option<(String, String)>,
    pub checksums: ChecksumMode,
    pub max_attempts: u32,
    pub connect_timeout: Duration,
    pub attempt_timeout: Duration,
}
impl S3Config {
    pub fn new(bucket: impl Into<String>) -> Self {
        S3Config {
            bucket: bucket.into(),
            region: None,
            endpoint_url: None,
            force_path_style: false,
            profile: None,
            credentials: None,
            checksums: ChecksumMode::WhenRequired,
            max_attempts: 5,
            connect_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(60),
        }
    }
}
#[derive(Debug, Clone)]
pub struct S3Store;
impl S3Store {
    pub async fn connect(_c: S3Config) -> super::StoreResult<S3Store> {
        Err(super::StoreError::io("connect", "", "not yet"))
    }
}
#[async_trait::async_trait]
impl super::ObjectStore for S3Store {
    fn describe(&self) -> String {
        todo!()
    }
    async fn get(&self, _key: &str) -> super::StoreResult<super::GetResult> {
        todo!()
    }
    async fn get_range(
        &self,
        _key: &str,
        _offset: u64,
        _len: u64,
    ) -> super::StoreResult<bytes::Bytes> {
        todo!()
    }
    async fn put(
        &self,
        _key: &str,
        _data: bytes::Bytes,
        _c: super::PutCondition,
    ) -> super::StoreResult<String> {
        todo!()
    }
    async fn delete(&self, _key: &str) -> super::StoreResult<()> {
        todo!()
    }
    async fn head(&self, _key: &str) -> super::StoreResult<super::ObjectMeta> {
        todo!()
    }
    async fn list_page(&self, _p: &str, _c: Option<String>) -> super::StoreResult<super::ListPage> {
        todo!()
    }
}
