//! The content store's types and limits: content-addressed blobs (sha256) written through
//! resumable, expiring uploads ("ingests"). The bytes are the backend's business (files in the
//! embedded store's folder; chunk rows in PostgreSQL); the metadata is committed like any other
//! write (`Op::BlobCommit`), so it joins leases and garbage collection.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::time::Timestamp;

pub use crate::gc::BlobInfo;

/// Largest blob, in bytes.
pub const BLOB_BYTES_MAX: u64 = 8 << 30;
/// Largest single write to an ingest, in bytes.
pub const INGEST_WRITE_BYTES_MAX: usize = 4 << 20;
/// Bytes per chunk row (PostgreSQL) and per read of a blob file.
pub const CHUNK_BYTES: usize = 256 << 10;
/// How long an untouched ingest lives by default.
pub const INGEST_TTL_DEFAULT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Longest ingest reference, in bytes.
pub const INGEST_REF_BYTES_MAX: usize = 256;

/// An upload in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestStatus {
    pub reference: String,
    pub expected_digest: Option<String>,
    pub expected_size: Option<u64>,
    /// Bytes received so far (where the next write must start).
    pub offset: u64,
    pub started_at: Timestamp,
    pub updated_at: Timestamp,
    pub expires_at: Timestamp,
}

/// Check an ingest reference: 1 to 256 bytes of letters, digits, '.', '_', '-', ':', '/'.
pub fn validate_ingest_ref(r: &str) -> Result<()> {
    let ok = !r.is_empty()
        && r.len() <= INGEST_REF_BYTES_MAX
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:/".contains(&b))
        && !r.contains("..");
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "ingest reference",
            r.chars().take(80).collect::<String>(),
            "must be 1 to 256 bytes of letters, digits, '.', '_', '-', ':' and '/', without '..'",
        ))
    }
}
