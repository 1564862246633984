//! `fleetdb lease|blob|gc`: leases, the content store and the garbage collector.
//!
//! `blob put` streams its input through a [`fleetdb::BlobWriter`] and `blob get` reads ranges,
//! so neither holds a whole blob in memory.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};
use fleetdb::core::content::{INGEST_TTL_DEFAULT, INGEST_TTL_UNNAMED};
use fleetdb::core::gc::{BlobInfo, GcKind, GcStats, Lease, Resource};
use fleetdb::{Error, IngestStatus, LeaseSpec, ObjectKey, Store, Timestamp};
use serde_json::{json, Value};

use crate::output::{self, Format};
use crate::parse_labels;

/// Bytes read from the input and sent per write by `blob put`.
const PUT_CHUNK_BYTES: usize = 1 << 20;
/// Recorded collections `gc status` shows.
const RECENT_RUNS: usize = 10;
/// Bytes read per call by `blob get`.
const GET_CHUNK_BYTES: u64 = 4 << 20;

// ---- arguments ----

/// `lease create --expire-in`: a positive duration of at most ten years (the store's bound),
/// checked while parsing so that the message names the flag and the value as typed.
fn parse_expire_in(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("a lease expiry must be positive".into());
    }
    if d > fleetdb::gc::LEASE_EXPIRE_IN_MAX {
        return Err(
            "a lease expiry must be at most 10 years (omit --expire-in for a lease that lives until deleted)"
                .into(),
        );
    }
    Ok(d)
}

#[derive(Subcommand, Debug)]
pub enum LeaseCmd {
    /// Create a lease (its id is generated when omitted) and print it.
    Create {
        id: Option<String>,
        /// The lease expires this long from now (e.g. 10m, 2h); default: until deleted.
        #[arg(long, value_parser = parse_expire_in)]
        expire_in: Option<Duration>,
        /// KEY=VALUE, repeatable.
        #[arg(short, long = "label")]
        labels: Vec<String>,
        /// Hold only the resources themselves, not what they reference.
        #[arg(long)]
        flat: bool,
    },
    /// List leases (expired ones not yet collected too), ordered by id.
    Ls {
        /// Label selector: KEY=VALUE, KEY!=VALUE, KEY, !KEY, comma-separated (all must hold).
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Page size (1..=1000).
        #[arg(long, default_value_t = 100, value_parser = crate::output::page_limit)]
        limit: usize,
        /// Continue after this cursor (the `next` of a previous page).
        #[arg(long)]
        cursor: Option<String>,
        /// Follow cursors and list everything.
        #[arg(long)]
        all: bool,
    },
    /// Show a lease and the resources it holds.
    Show { id: String },
    /// Delete a lease (what it held becomes collectable).
    Rm {
        id: String,
        /// Return only after a collection that could free what the lease held; print its stats.
        #[arg(long)]
        sync: bool,
    },
    /// Add an object (of the `-n` namespace) or a blob to a live lease.
    Add {
        id: String,
        #[command(flatten)]
        resource: ResourceArg,
    },
    /// Remove an object or a blob from a lease.
    Remove {
        id: String,
        #[command(flatten)]
        resource: ResourceArg,
    },
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("resource").required(true).args(["object", "blob"])))]
pub struct ResourceArg {
    /// An object of the `-n` namespace.
    #[arg(long, value_name = "KIND/ID")]
    object: Option<String>,
    /// A blob.
    #[arg(long, value_name = "sha256:HEX")]
    blob: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum BlobCmd {
    /// Store a file ('-': stdin) as a blob, streaming it; print its digest.
    Put {
        file: PathBuf,
        /// Add the blob to this (live) lease in the same transaction.
        #[arg(long)]
        lease: Option<String>,
        /// Upload under this reference: a put that did not finish (killed, failed) is resumed by
        /// running it again with the same reference and input (the bytes received already are
        /// read, not sent again), for 24 h after its last write. Without it the upload is
        /// unnamed and its bytes are reclaimed 10 minutes after a put that did not finish.
        #[arg(long = "ref", value_name = "REF")]
        reference: Option<String>,
        /// KEY=VALUE, repeatable.
        #[arg(short, long = "label")]
        labels: Vec<String>,
    },
    /// Write a blob's bytes (or a range of them) to stdout or a file.
    Get {
        digest: String,
        /// Write to this file (created or truncated) instead of stdout. (`--output` is the
        /// global output format.)
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Start at this byte.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// At most this many bytes (default: to the end).
        #[arg(long)]
        length: Option<u64>,
    },
    /// List blobs, ordered by digest.
    Ls {
        /// Page size (1..=1000).
        #[arg(long, default_value_t = 100, value_parser = crate::output::page_limit)]
        limit: usize,
        /// Continue after this digest (the `next` of a previous page).
        #[arg(long)]
        cursor: Option<String>,
        /// Follow cursors and list everything.
        #[arg(long)]
        all: bool,
    },
    /// Show a blob's metadata.
    Info { digest: String },
    /// Delete a blob.
    Rm { digest: String },
    /// List uploads in progress.
    Ingests,
    /// Drop an upload in progress and its bytes.
    Abort { reference: String },
}

#[derive(Subcommand, Debug)]
pub enum GcCmd {
    /// Run a full collection now and print its stats.
    Run,
    /// The collector's state in this process, declared kinds, leases and uploads.
    Status,
    /// Declare whether objects of KIND are collected when nothing needs them.
    #[command(group(ArgGroup::new("collectability").required(true).args(["collectable", "not_collectable"])))]
    Kind {
        kind: String,
        #[arg(long)]
        collectable: bool,
        #[arg(long)]
        not_collectable: bool,
    },
    /// Declared kinds (undeclared kinds are never collected).
    Kinds,
}

// ---- JSON shapes (stable, see docs/cli.md) ----

fn opt_time(t: Option<Timestamp>) -> Value {
    t.map_or(Value::Null, |t| json!(t.to_rfc3339()))
}

pub(crate) fn lease_json(l: &Lease, now: Timestamp) -> Value {
    json!({
        "id": l.id,
        "labels": l.labels,
        "flat": l.flat,
        "expires_at": opt_time(l.expires_at),
        "alive": l.alive_at(now),
        "created_at": l.created_at.to_rfc3339(),
        "revision": l.revision.0,
    })
}

pub(crate) fn resource_json(r: &Resource) -> Value {
    match r {
        Resource::Object { key } => json!({
            "type": "object", "namespace": key.namespace, "kind": key.kind, "id": key.id,
        }),
        Resource::Blob { digest } => json!({"type": "blob", "digest": digest}),
    }
}

pub(crate) fn blob_json(b: &BlobInfo) -> Value {
    json!({
        "digest": b.digest,
        "size": b.size,
        "labels": b.labels,
        "created_at": b.created_at.to_rfc3339(),
        "updated_at": b.updated_at.to_rfc3339(),
        "revision": b.revision.0,
    })
}

fn ingest_json(i: &IngestStatus) -> Value {
    json!({
        "reference": i.reference,
        "expected_digest": i.expected_digest,
        "expected_size": i.expected_size,
        "offset": i.offset,
        "started_at": i.started_at.to_rfc3339(),
        "updated_at": i.updated_at.to_rfc3339(),
        "expires_at": i.expires_at.to_rfc3339(),
    })
}

pub(crate) fn stats_json(s: &GcStats) -> Value {
    json!({
        "started_at": s.started_at.to_rfc3339(),
        "trigger": s.trigger,
        "marked": s.marked,
        "swept_objects": s.swept_objects,
        "swept_blobs": s.swept_blobs,
        "expired_leases": s.expired_leases,
        "bytes_freed": s.bytes_freed,
        "spared": s.spared,
        "orphans_removed": s.orphans_removed,
        "mark_ms": s.mark_ms,
        "sweep_ms": s.sweep_ms,
        "writers_blocked_ms": s.writers_blocked_ms,
        "writers_blocked_max_ms": s.writers_blocked_max_ms,
        "collector_errors": s.collector_errors,
    })
}

fn kind_json(k: &GcKind) -> Value {
    json!({"kind": k.kind, "collectable": k.collectable, "declared_at": k.declared_at.to_rfc3339()})
}

fn print_stats(s: &GcStats) {
    println!("started:           {} ({})", s.started_at, s.trigger);
    println!("marked:            {}", s.marked);
    println!("swept objects:     {}", s.swept_objects);
    println!("swept blobs:       {}", s.swept_blobs);
    println!("expired leases:    {}", s.expired_leases);
    println!("bytes freed:       {}", s.bytes_freed);
    println!("spared:            {}", s.spared);
    println!("orphans removed:   {}", s.orphans_removed);
    println!("mark:              {:.1} ms", s.mark_ms);
    println!("sweep:             {:.1} ms", s.sweep_ms);
    println!(
        "writers blocked:   {:.1} ms total, {:.1} ms max",
        s.writers_blocked_ms, s.writers_blocked_max_ms
    );
    if s.collector_errors.is_empty() {
        println!("collector errors:  none");
    } else {
        for e in &s.collector_errors {
            println!("collector error:   {e}");
        }
    }
}

fn lease_row(l: &Lease, now: Timestamp) -> Vec<String> {
    vec![
        l.id.clone(),
        output::labels_text(&l.labels),
        l.flat.to_string(),
        l.expires_at.map_or_else(|| "-".into(), |t| t.to_rfc3339()),
        l.alive_at(now).to_string(),
        l.created_at.to_rfc3339(),
    ]
}

const LEASE_HEADER: [&str; 6] = ["ID", "LABELS", "FLAT", "EXPIRES", "ALIVE", "CREATED"];

// ---- leases ----

/// The object `KIND/ID` of namespace `ns`, given with `flag`.
pub(crate) fn object_resource(ns: &str, flag: &str, o: &str) -> Result<Resource, Error> {
    let Some((kind, id)) = o.split_once('/') else {
        return Err(Error::invalid(flag, o, "must be KIND/ID"));
    };
    Ok(Resource::Object {
        key: ObjectKey::new(ns, kind, id)?,
    })
}

/// The blob `sha256:HEX`.
pub(crate) fn blob_resource(digest: String) -> Result<Resource, Error> {
    fleetdb::core::world::validate_digest(&digest)?;
    Ok(Resource::Blob { digest })
}

fn resource(ns: &str, r: ResourceArg) -> Result<Resource, Error> {
    match (r.object, r.blob) {
        (Some(o), None) => object_resource(ns, "--object", &o),
        (None, Some(digest)) => blob_resource(digest),
        _ => Err(Error::invalid(
            "resource",
            "",
            "give exactly one of --object KIND/ID and --blob sha256:HEX",
        )),
    }
}

/// One page of leases, ordered by id. `Store::lease_list` documents "" as "every lease", but its
/// selector parser rejects an empty selector; without one, read the backend's listing directly.
async fn lease_page(
    store: &Store,
    selector: Option<&str>,
    after: Option<&str>,
    limit: usize,
) -> Result<fleetdb::Page<Lease>, Error> {
    if let Some(sel) = selector {
        return store.lease_list(sel, after, limit).await;
    }
    let max = fleetdb::core::query::LIST_PAGE_MAX;
    if limit == 0 || limit > max {
        return Err(Error::invalid(
            "limit",
            limit.to_string(),
            format!("must be between 1 and {max}"),
        ));
    }
    if let Some(a) = after {
        fleetdb::core::validate::name("lease id", a)?;
    }
    // One more than asked for tells whether another page follows.
    let mut items = store.backend().lease_list(after, limit + 1).await?;
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|l| l.id.clone())
    } else {
        None
    };
    Ok(fleetdb::Page { items, next })
}

pub async fn lease(store: &Store, fmt: Format, ns: &str, cmd: LeaseCmd) -> Result<(), Error> {
    let now = store.clock().now();
    match cmd {
        LeaseCmd::Create {
            id,
            expire_in,
            labels,
            flat,
        } => {
            let l = store
                .lease_create(LeaseSpec {
                    id,
                    labels: parse_labels(&labels)?,
                    flat,
                    expire_in,
                })
                .await?;
            match fmt {
                Format::Json => output::print_json(&lease_json(&l, store.clock().now())),
                Format::Table => println!(
                    "created lease {}{} (revision {})",
                    l.id,
                    l.expires_at
                        .map(|t| format!(", expires {t}"))
                        .unwrap_or_default(),
                    l.revision
                ),
            }
        }
        LeaseCmd::Ls {
            selector,
            limit,
            cursor,
            all,
        } => {
            let mut items = Vec::new();
            let mut after = cursor;
            let next = loop {
                let page = lease_page(store, selector.as_deref(), after.as_deref(), limit).await?;
                items.extend(page.items);
                match page.next {
                    Some(c) if all => after = Some(c),
                    other => break other,
                }
            };
            output::print_page(
                fmt,
                &items,
                next,
                |l| lease_json(l, now),
                &LEASE_HEADER,
                |l| lease_row(l, now),
                "--cursor",
            );
        }
        LeaseCmd::Show { id } => {
            let l = store
                .lease_get(&id)
                .await?
                .ok_or_else(|| Error::not_found(format!("lease {id:?}")))?;
            let resources = store.lease_resources(&id).await?;
            match fmt {
                Format::Json => {
                    let mut v = lease_json(&l, now);
                    v["resources"] = resources.iter().map(resource_json).collect();
                    output::print_json(&v);
                }
                Format::Table => {
                    println!("id:        {}", l.id);
                    println!("labels:    {}", output::labels_text(&l.labels));
                    println!("flat:      {}", l.flat);
                    println!(
                        "expires:   {}",
                        l.expires_at
                            .map_or_else(|| "never".into(), |t| t.to_rfc3339())
                    );
                    println!("alive:     {}", l.alive_at(now));
                    println!("created:   {}", l.created_at);
                    println!("revision:  {}", l.revision);
                    for r in &resources {
                        println!("holds:     {r}");
                    }
                }
            }
        }
        LeaseCmd::Rm { id, sync } => {
            let stats = store.lease_delete(&id, sync).await?;
            match fmt {
                Format::Json => output::print_json(&json!({
                    "deleted": id,
                    "gc": stats.as_ref().map_or(Value::Null, stats_json),
                })),
                Format::Table => {
                    println!("deleted lease {id}");
                    if let Some(s) = &stats {
                        print_stats(s);
                    }
                }
            }
        }
        LeaseCmd::Add { id, resource: r } => {
            let r = resource(ns, r)?;
            let changed = store.lease_add(&id, r.clone()).await?;
            lease_resource_out(fmt, &id, &r, changed, "added", "already held");
        }
        LeaseCmd::Remove { id, resource: r } => {
            let r = resource(ns, r)?;
            let changed = store.lease_remove_resource(&id, r.clone()).await?;
            lease_resource_out(fmt, &id, &r, changed, "removed", "not held");
        }
    }
    Ok(())
}

fn lease_resource_out(fmt: Format, id: &str, r: &Resource, changed: bool, done: &str, not: &str) {
    match fmt {
        Format::Json => output::print_json(&json!({
            "lease": id, "resource": resource_json(r), "changed": changed,
        })),
        Format::Table if changed => println!("{done} {r} (lease {id})"),
        Format::Table => println!("unchanged: {r} {not} by lease {id}"),
    }
}

// ---- blobs ----

fn io_invalid(field: &str, path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::invalid(
        field,
        path.display().to_string(),
        format!("cannot {what} it: {e}"),
    )
}

/// Fill `buf` as far as the input allows; 0 only at the end.
fn read_chunk(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

async fn blob_put(
    store: &Store,
    file: &Path,
    lease: Option<&str>,
    labels: &[String],
    reference: Option<&str>,
) -> Result<BlobInfo, Error> {
    let labels = parse_labels(labels)?;
    fleetdb::core::validate::blob_labels(&labels)?;
    if let Some(r) = reference {
        fleetdb::core::content::validate_ingest_ref(r)?;
    }
    if let Some(l) = lease {
        // Fail before uploading anything (the commit checks again, in its transaction).
        match store.lease_get(l).await? {
            None => return Err(Error::not_found(format!("lease {l:?}"))),
            Some(lease) if !lease.alive_at(store.clock().now()) => {
                return Err(Error::Refused {
                    what: format!("lease {l:?}"),
                    reason: "it has expired".into(),
                })
            }
            Some(_) => {}
        }
    }
    let input: Box<dyn Read + Send> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        let f = std::fs::File::open(file).map_err(|e| io_invalid("file", file, "open", e))?;
        if f.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(Error::invalid(
                "file",
                file.display().to_string(),
                "is a folder: name a file, or '-' for stdin",
            ));
        }
        Box::new(f)
    };
    // A named upload can be resumed (it lives as long as any); an unnamed one cannot, so it
    // lives only INGEST_TTL_UNNAMED after its last touch: a put killed midway leaves its bytes
    // to the first collection after that.
    let named = reference.is_some();
    let (reference, ttl) = match reference {
        Some(r) => (r.to_string(), INGEST_TTL_DEFAULT),
        None => (
            format!("cli-put-{}", uuid::Uuid::new_v4().simple()),
            INGEST_TTL_UNNAMED,
        ),
    };
    let mut w = store
        .blob_writer_with_ttl(&reference, None, lease, ttl)
        .await?;
    let (digest, size) = match put_stream(&mut w, input, file, ttl).await {
        Ok(sent) => sent,
        Err(e) => {
            // Best effort: the upload would expire soon anyway. A named one is kept to be
            // resumed, unless it holds nothing.
            if !named || w.offset() == 0 {
                let _ = w.abort().await;
            }
            return Err(e);
        }
    };
    let result = w.commit_as(&digest, size, labels).await;
    if result.is_err() && !named {
        let _ = store.ingest_abort(&reference).await;
    }
    result
}

/// Send `input` to the upload `w`; the digest and size of the whole input. The input is read on
/// a thread of its own, so that the upload is kept alive meanwhile (a slow pipe outlives no
/// TTL). The bytes the upload holds already (a resumed `--ref`) are read and hashed, not sent
/// again; the commit checks that the whole upload hashes to the input's digest.
async fn put_stream(
    w: &mut fleetdb::BlobWriter,
    input: Box<dyn Read + Send>,
    file: &Path,
    ttl: Duration,
) -> Result<(String, u64), Error> {
    use sha2::Digest as _;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(1);
    std::thread::Builder::new()
        .name("blob-put-input".into())
        .spawn(move || {
            let mut input = input;
            loop {
                let mut buf = vec![0u8; PUT_CHUNK_BYTES];
                match read_chunk(input.as_mut(), &mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.blocking_send(Ok(buf)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        break;
                    }
                }
            }
        })
        .map_err(|e| Error::Backend(format!("cannot start the input thread: {e}")))?;
    let mut hasher = sha2::Sha256::new();
    let mut total: u64 = 0;
    let mut skip = w.offset();
    let received = skip;
    loop {
        let chunk = tokio::select! {
            c = rx.recv() => c,
            _ = tokio::time::sleep(ttl / 3) => {
                w.keep_alive().await?;
                continue;
            }
        };
        let Some(chunk) = chunk else { break };
        let chunk = chunk.map_err(|e| io_invalid("file", file, "read", e))?;
        hasher.update(&chunk);
        total += chunk.len() as u64;
        let held = usize::try_from(skip).unwrap_or(usize::MAX).min(chunk.len());
        skip -= held as u64;
        if held < chunk.len() {
            w.write(&chunk[held..]).await?;
        }
    }
    if skip > 0 {
        let reference = w.status().reference.clone();
        return Err(Error::invalid(
            "file",
            file.display().to_string(),
            format!(
                "has {total} bytes, fewer than the {received} the upload {reference:?} received \
                 already: give the input it was started with, or drop it (`fleetdb blob abort \
                 {reference}`)"
            ),
        ));
    }
    Ok((format!("sha256:{:x}", hasher.finalize()), total))
}

/// Where `blob get --out PATH` writes before renaming over PATH: a hidden file beside it.
fn partial_path(path: &std::path::Path) -> Result<std::path::PathBuf, Error> {
    let name = path.file_name().ok_or_else(|| {
        Error::invalid(
            "--out",
            path.display().to_string(),
            "must name a file, not a folder",
        )
    })?;
    let mut part = std::ffi::OsString::from(".");
    part.push(name);
    part.push(format!(".part-{}", std::process::id()));
    Ok(path.with_file_name(part))
}

/// The blob `digest`, checked to exist and to reach `offset` — before anything is written.
async fn blob_at(store: &Store, digest: &str, offset: u64) -> Result<BlobInfo, Error> {
    fleetdb::core::world::validate_digest(digest)?;
    let info = store
        .blob_info(digest)
        .await?
        .ok_or_else(|| Error::not_found(format!("blob {digest}")))?;
    if offset > info.size {
        return Err(Error::invalid(
            "offset",
            offset.to_string(),
            format!("blob {digest} has {} bytes", info.size),
        ));
    }
    Ok(info)
}

/// Copy `[offset, offset + length)` of the blob `info` (checked by [`blob_at`]; clamped to its
/// end) into `out`; the bytes copied.
async fn blob_copy(
    store: &Store,
    info: &BlobInfo,
    offset: u64,
    length: Option<u64>,
    out: &mut dyn Write,
) -> Result<Result<u64, std::io::Error>, Error> {
    let digest = info.digest.as_str();
    let end = length.map_or(info.size, |l| offset.saturating_add(l).min(info.size));
    let mut pos = offset;
    while pos < end {
        let n = (end - pos).min(GET_CHUNK_BYTES);
        let bytes = store.blob_read_range(digest, pos, Some(n)).await?;
        if bytes.is_empty() {
            return Err(Error::Backend(format!(
                "blob {digest} ended at byte {pos}, before its size {}",
                info.size
            )));
        }
        if let Err(e) = out.write_all(&bytes) {
            return Ok(Err(e));
        }
        pos += bytes.len() as u64;
    }
    Ok(out.flush().map(|()| pos - offset))
}

pub async fn blob(store: &Store, fmt: Format, cmd: BlobCmd) -> Result<(), Error> {
    match cmd {
        BlobCmd::Put {
            file,
            lease,
            labels,
            reference,
        } => {
            let info = blob_put(
                store,
                &file,
                lease.as_deref(),
                &labels,
                reference.as_deref(),
            )
            .await?;
            match fmt {
                Format::Json => output::print_json(&blob_json(&info)),
                Format::Table => println!("{}", info.digest),
            }
        }
        BlobCmd::Get {
            digest,
            out: None,
            offset,
            length,
        } => {
            let info = blob_at(store, &digest, offset).await?;
            let mut out = std::io::stdout().lock();
            match blob_copy(store, &info, offset, length, &mut out).await? {
                Ok(_) => {}
                // The reader went away (`| head -c N`): stop quietly.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Err(e) => {
                    return Err(Error::invalid(
                        "stdout",
                        "-",
                        format!("cannot write to it: {e}"),
                    ))
                }
            }
        }
        BlobCmd::Get {
            digest,
            out: Some(path),
            offset,
            length,
        } => {
            // Checked before anything is opened for writing, so a missing blob or an offset past
            // the end leaves no empty file behind: a symlink, device or pipe is written through,
            // and creating it truncates its target.
            let info = blob_at(store, &digest, offset).await?;
            // A regular file (or none yet) is written as a file of our own beside it, renamed
            // over it once complete (with the old file's permissions): a failure (a bad
            // offset, a full disk) never truncates or removes a file that was there, and nobody
            // sees a half-written one. Anything else (a symlink, a device, a pipe) is written
            // through, in place.
            let existing = std::fs::symlink_metadata(&path).ok();
            let replace = existing.as_ref().is_none_or(|m| m.file_type().is_file());
            let part = if replace {
                partial_path(&path)?
            } else {
                path.clone()
            };
            let file = std::fs::File::create(&part)
                .map_err(|e| io_invalid("--out", &path, "create", e))?;
            if let Some(m) = existing.as_ref().filter(|_| replace) {
                let _ = file.set_permissions(m.permissions());
            }
            let mut out = std::io::BufWriter::new(file);
            let copied = match blob_copy(store, &info, offset, length, &mut out).await {
                Ok(Ok(n)) => out
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .and_then(|f| if replace { f.sync_all() } else { Ok(()) })
                    .and_then(|()| {
                        if replace {
                            std::fs::rename(&part, &path)
                        } else {
                            Ok(())
                        }
                    })
                    .map(|()| n)
                    .map_err(|e| io_invalid("--out", &path, "write", e)),
                Ok(Err(e)) => Err(io_invalid("--out", &path, "write", e)),
                Err(e) => Err(e),
            };
            let n = match copied {
                Ok(n) => n,
                Err(e) => {
                    if replace {
                        let _ = std::fs::remove_file(&part);
                    }
                    return Err(e);
                }
            };
            match fmt {
                Format::Json => output::print_json(&json!({
                    "digest": digest, "offset": offset, "bytes": n, "written_to": path.display().to_string(),
                })),
                Format::Table => println!("wrote {n} bytes of {digest} to {}", path.display()),
            }
        }
        BlobCmd::Ls { limit, cursor, all } => {
            let mut items = Vec::new();
            let mut after = cursor;
            let next = loop {
                let page = store.blob_list(after.as_deref(), limit).await?;
                items.extend(page.items);
                match page.next {
                    Some(c) if all => after = Some(c),
                    other => break other,
                }
            };
            output::print_page(
                fmt,
                &items,
                next,
                blob_json,
                &["DIGEST", "SIZE", "LABELS", "CREATED"],
                |b| {
                    vec![
                        b.digest.clone(),
                        b.size.to_string(),
                        output::labels_text(&b.labels),
                        b.created_at.to_rfc3339(),
                    ]
                },
                "--cursor",
            );
        }
        BlobCmd::Info { digest } => {
            let b = store
                .blob_info(&digest)
                .await?
                .ok_or_else(|| Error::not_found(format!("blob {digest}")))?;
            match fmt {
                Format::Json => output::print_json(&blob_json(&b)),
                Format::Table => {
                    println!("digest:    {}", b.digest);
                    println!("size:      {}", b.size);
                    println!("labels:    {}", output::labels_text(&b.labels));
                    println!("created:   {}", b.created_at);
                    println!("updated:   {}", b.updated_at);
                    println!("revision:  {}", b.revision);
                }
            }
        }
        BlobCmd::Rm { digest } => {
            store.blob_delete(&digest).await?;
            match fmt {
                Format::Json => output::print_json(&json!({"deleted": digest})),
                Format::Table => println!("deleted blob {digest}"),
            }
        }
        BlobCmd::Ingests => {
            let items = store.ingest_list().await?;
            match fmt {
                Format::Json => {
                    output::print_json(&items.iter().map(ingest_json).collect::<Vec<_>>())
                }
                Format::Table => output::table(
                    &["REFERENCE", "OFFSET", "EXPECTED", "UPDATED", "EXPIRES"],
                    &items
                        .iter()
                        .map(|i| {
                            vec![
                                i.reference.clone(),
                                i.offset.to_string(),
                                i.expected_digest.clone().unwrap_or_else(|| "-".into()),
                                i.updated_at.to_rfc3339(),
                                i.expires_at.to_rfc3339(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
        BlobCmd::Abort { reference } => {
            store.ingest_abort(&reference).await?;
            match fmt {
                Format::Json => output::print_json(&json!({"aborted": reference})),
                Format::Table => println!("aborted upload {reference}"),
            }
        }
    }
    Ok(())
}

// ---- the collector ----

pub async fn gc(store: &Store, fmt: Format, cmd: GcCmd) -> Result<(), Error> {
    match cmd {
        GcCmd::Run => {
            let s = store.gc_run().await?;
            match fmt {
                Format::Json => output::print_json(&stats_json(&s)),
                Format::Table => print_stats(&s),
            }
        }
        GcCmd::Status => {
            let st = store.gc_status();
            let kinds = store.gc_kinds().await?;
            let now = store.clock().now();
            let (mut leases, mut expired) = (0u64, 0u64);
            let mut after: Option<String> = None;
            loop {
                let page = lease_page(
                    store,
                    None,
                    after.as_deref(),
                    fleetdb::core::query::LIST_PAGE_MAX,
                )
                .await?;
                for l in &page.items {
                    if l.alive_at(now) {
                        leases += 1;
                    } else {
                        expired += 1;
                    }
                }
                match page.next {
                    Some(c) => after = Some(c),
                    None => break,
                }
            }
            let ingests = store.ingest_list().await?.len();
            let recent = store.gc_history(RECENT_RUNS).await?;
            match fmt {
                Format::Json => output::print_json(&json!({
                    "runs": st.runs,
                    "last": st.last.as_ref().map_or(Value::Null, stats_json),
                    "recent": recent.iter().map(stats_json).collect::<Vec<_>>(),
                    "deletions_since": st.deletions_since,
                    "mutations_since": st.mutations_since,
                    "next_deadline": opt_time(st.next_deadline),
                    "kinds": kinds.iter().map(kind_json).collect::<Vec<_>>(),
                    "leases": leases,
                    "expired_leases": expired,
                    "ingests": ingests,
                })),
                Format::Table => {
                    let collectable: Vec<&str> = kinds
                        .iter()
                        .filter(|k| k.collectable)
                        .map(|k| k.kind.as_str())
                        .collect();
                    println!(
                        "collectable kinds: {}",
                        if collectable.is_empty() {
                            "none".to_string()
                        } else {
                            collectable.join(",")
                        }
                    );
                    println!(
                        "leases:            {leases} live, {expired} expired (not yet collected)"
                    );
                    println!("uploads:           {ingests} in progress");
                    println!(
                        "runs:              {} in this process (`fleetdb gc run` runs one)",
                        st.runs
                    );
                    // The newest run by any process (this one's is recorded too).
                    if let Some(s) = recent.first().or(st.last.as_ref()) {
                        println!("last run (any process):");
                        print_stats(s);
                    }
                    if recent.len() > 1 {
                        println!("earlier runs:");
                        for s in &recent[1..] {
                            println!(
                                "  {} ({}): swept {} objects, {} blobs; {:.1} ms mark, {:.1} ms sweep",
                                s.started_at,
                                s.trigger,
                                s.swept_objects,
                                s.swept_blobs,
                                s.mark_ms,
                                s.sweep_ms
                            );
                        }
                    }
                }
            }
        }
        GcCmd::Kind {
            kind,
            collectable,
            not_collectable,
        } => {
            let _ = not_collectable; // the group makes it exactly one of the two
            let changed = store.gc_kind_declare(&kind, collectable).await?;
            match fmt {
                Format::Json => output::print_json(
                    &json!({"kind": kind, "collectable": collectable, "changed": changed}),
                ),
                Format::Table => println!(
                    "{} kind {kind}: {}",
                    if changed { "declared" } else { "unchanged" },
                    if collectable {
                        "collectable"
                    } else {
                        "not collectable"
                    }
                ),
            }
        }
        GcCmd::Kinds => {
            let kinds = store.gc_kinds().await?;
            match fmt {
                Format::Json => {
                    output::print_json(&kinds.iter().map(kind_json).collect::<Vec<_>>())
                }
                Format::Table => output::table(
                    &["KIND", "COLLECTABLE", "DECLARED"],
                    &kinds
                        .iter()
                        .map(|k| {
                            vec![
                                k.kind.clone(),
                                k.collectable.to_string(),
                                k.declared_at.to_rfc3339(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
    }
    Ok(())
}
