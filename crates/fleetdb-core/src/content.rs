//! The content store's types and limits: content-addressed blobs (sha256) written through
//! resumable, expiring uploads ("ingests"). The bytes are the backend's business (files in the
//! embedded store's folder; chunk rows in PostgreSQL); the metadata is committed like any other
//! write (`Op::BlobCommit`), so it joins leases and garbage collection.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gc::BlobInfo;
use crate::time::Timestamp;
use crate::world::validate_digest;

/// Largest blob, in bytes.
pub const BLOB_BYTES_MAX: u64 = 8 << 30;
/// Largest single write to an ingest, in bytes.
pub const INGEST_WRITE_BYTES_MAX: usize = 4 << 20;
/// Bytes per chunk row (PostgreSQL) and per read of a blob file.
pub const CHUNK_BYTES: usize = 256 << 10;
/// How long an untouched ingest lives by default: its expiry is this long after it was started,
/// resumed or last written.
pub const INGEST_TTL_DEFAULT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// How long an upload nobody can resume by name lives after it was last touched: `Store::blob_put`'s
/// and `fleetdb blob put`'s without `--ref` (a random reference). A process killed midway leaves
/// it, and its bytes are reclaimed by the first collection after this, not a day later.
pub const INGEST_TTL_UNNAMED: std::time::Duration = std::time::Duration::from_secs(10 * 60);
/// The longest expiry an upload may be given ([`INGEST_TTL_DEFAULT`] is the default).
pub const INGEST_TTL_MAX: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);
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

// ---- checks shared by every backend's content store ----

/// Check what an upload says it will be.
pub fn check_expected(expected: Option<(&str, u64)>) -> Result<()> {
    if let Some((digest, size)) = expected {
        validate_digest(digest)?;
        if size > BLOB_BYTES_MAX {
            return Err(Error::TooLarge {
                field: "blob".into(),
                size: usize::try_from(size).unwrap_or(usize::MAX),
                max: BLOB_BYTES_MAX as usize,
            });
        }
    }
    Ok(())
}

/// An existing upload resumed with `expected`: the expectations must agree.
pub fn check_resume(
    reference: &str,
    stored: &IngestStatus,
    expected: Option<(&str, u64)>,
) -> Result<()> {
    let Some((digest, size)) = expected else {
        return Ok(());
    };
    if let Some(d) = &stored.expected_digest {
        if d != digest {
            return Err(Error::invalid(
                "expected digest",
                digest,
                format!("the upload {reference:?} in progress expects {d}; abort it first"),
            ));
        }
    }
    if let Some(s) = stored.expected_size {
        if s != size {
            return Err(Error::invalid(
                "expected size",
                size.to_string(),
                format!("the upload {reference:?} in progress expects {s} bytes; abort it first"),
            ));
        }
    }
    if stored.offset > size {
        return Err(Error::invalid(
            "expected size",
            size.to_string(),
            format!(
                "the upload {reference:?} has {} bytes already",
                stored.offset
            ),
        ));
    }
    Ok(())
}

/// The checks of a write at `offset` of `len` bytes to an upload standing at `status`.
pub fn check_write(status: &IngestStatus, offset: u64, len: usize) -> Result<()> {
    if offset != status.offset {
        return Err(Error::invalid(
            "ingest offset",
            offset.to_string(),
            format!(
                "the upload {:?} stands at offset {}; write from there",
                status.reference, status.offset
            ),
        ));
    }
    if len > INGEST_WRITE_BYTES_MAX {
        return Err(Error::TooLarge {
            field: "ingest write".into(),
            size: len,
            max: INGEST_WRITE_BYTES_MAX,
        });
    }
    let end = offset + len as u64;
    if let Some(size) = status.expected_size {
        if end > size {
            return Err(Error::invalid(
                "ingest write",
                format!("{len} bytes at offset {offset}"),
                format!("the upload was declared as {size} bytes"),
            ));
        }
    }
    if end > BLOB_BYTES_MAX {
        return Err(Error::TooLarge {
            field: "blob".into(),
            size: usize::try_from(end).unwrap_or(usize::MAX),
            max: BLOB_BYTES_MAX as usize,
        });
    }
    Ok(())
}

/// The checks of a commit of `digest`/`size` against the upload (before hashing).
pub fn check_commit(status: &IngestStatus, digest: &str, size: u64) -> Result<()> {
    if status.offset != size {
        return Err(Error::invalid(
            "blob size",
            size.to_string(),
            format!(
                "the upload {:?} has {} bytes; nothing was committed",
                status.reference, status.offset
            ),
        ));
    }
    if let Some(d) = &status.expected_digest {
        if d != digest {
            return Err(Error::invalid(
                "blob digest",
                digest,
                format!("the upload was started expecting {d}; nothing was committed"),
            ));
        }
    }
    Ok(())
}

pub fn digest_mismatch(reference: &str, digest: &str, actual: &str) -> Error {
    Error::invalid(
        "blob digest",
        digest,
        format!("the bytes of upload {reference:?} hash to {actual}; nothing was committed"),
    )
}

/// The byte range `[start, end)` a read of `len` (or to the end) from `offset` covers.
pub fn range(info: &BlobInfo, offset: u64, len: Option<u64>) -> Result<(u64, u64)> {
    if offset > info.size {
        return Err(Error::invalid(
            "offset",
            offset.to_string(),
            format!("blob {} has {} bytes", info.digest, info.size),
        ));
    }
    let end = match len {
        Some(l) => offset.saturating_add(l).min(info.size),
        None => info.size,
    };
    Ok((offset, end))
}

/// The checks of a new or resumed upload: its reference, what it says it will be, its expiry.
pub fn check_ingest_start(
    reference: &str,
    expected: Option<(&str, u64)>,
    now: Timestamp,
    expires_at: Timestamp,
) -> Result<()> {
    validate_ingest_ref(reference)?;
    check_expected(expected)?;
    if expires_at <= now {
        return Err(Error::invalid(
            "ingest expiry",
            expires_at.to_rfc3339(),
            "must be in the future",
        ));
    }
    Ok(())
}
