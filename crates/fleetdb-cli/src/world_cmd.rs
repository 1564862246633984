//! `fleetdb watch|export|collect|unexport|kv|map|deploy|schedule|members`: watches and the World.
//!
//! Streaming commands (`watch`, `kv watch`, `schedule watch`, `schedule register`) print one JSON
//! document per line whatever `-o` says, flushing after each, until interrupted (Ctrl-C or
//! SIGTERM), until `--max-events` lines were printed, or until the watch ends with an error.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use fleetdb::core::gc::Resource;
use fleetdb::core::world::{
    self as w, Deploy, DeployDraft, DeployFileDraft, Export, ExportFilter, ExportId, ExportOutcome,
    ExportRecord, KvEntry, Lifetime, Schedule, ScheduleOptions, Strategy,
};
use fleetdb::{
    Change, Error, Revision, SessionSpec, Store, WatchEvent, WatchRequest, WatchScope, Written,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::gc_cmd;
use crate::output::{self, Format};
use crate::work_cmd;

// ---- arguments ----

/// What `watch --world` follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorldScope {
    /// Objects and tags of the namespace (the default; `--kind`, `--prefix` narrow).
    Objects,
    /// Every change of the database (no snapshot items).
    All,
    /// Key-values (`--prefix`: key prefix).
    Kv,
    /// Exports (`--kind`: export kind; `--host`: only what that host may see).
    Exports,
    /// The per-host map named by `--namespace`.
    Map,
    Deploys,
    /// The schedule of `--namespace` (every namespace if `--namespace` is not given).
    Schedule,
    /// Sessions joining and leaving.
    Members,
}

/// A record's TTL (`--ttl` of `export`, `kv set`, `kv cas`; `"ttl"` of `export sync`): positive
/// and at most a week (`world::TTL_MAX_MS`), checked while parsing so that the message names
/// the flag and the value as typed (the store's says milliseconds).
fn record_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    let max = Duration::from_millis(w::TTL_MAX_MS);
    if d.is_zero() || d > max {
        return Err(format!(
            "must be positive and at most a week ({})",
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// `schedule register --ttl`, `worker --ttl`: a session TTL, within the store's bounds.
pub(crate) fn session_ttl(s: &str) -> Result<Duration, String> {
    use fleetdb::core::work::{SESSION_TTL_MAX, SESSION_TTL_MIN};
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < SESSION_TTL_MIN || d > SESSION_TTL_MAX {
        return Err(format!(
            "a session TTL must be between {} and {}",
            humantime::format_duration(SESSION_TTL_MIN),
            humantime::format_duration(SESSION_TTL_MAX)
        ));
    }
    Ok(d)
}

/// `--max-events`: a count of lines to print before exiting; 0 would print nothing.
fn at_least_one(s: &str) -> Result<u64, String> {
    output::at_least(
        s,
        1,
        "must be at least 1 (leave it out to run until interrupted)",
    )
}

/// `deploy prune --before`: a deploy id, 1 or more (no deploy has an id lower than 1, so 0
/// would prune nothing while reading as a request).
fn deploy_id(s: &str) -> Result<u64, String> {
    output::at_least(s, 1, "must be a deploy id (1 or more)")
}

/// `deploy prune --keep`: at least 1.
fn prune_keep(s: &str) -> Result<u64, String> {
    output::at_least(s, 1, "must be at least 1 (the newest deploy always stays)")
}

/// `--buffer`: events a watch may hold for a slow reader, within the store's bounds (checked
/// while parsing so that the message names the flag).
fn watch_buffer(s: &str) -> Result<usize, String> {
    let max = fleetdb::watch::WATCH_BUFFER_MAX;
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("must be between 1 and {max}")),
    }
}

/// Options of every streaming command.
#[derive(Args, Debug, Clone)]
pub struct StreamArgs {
    /// Exit (status 0) after printing this many lines (at least 1); the snapshot is one line.
    #[arg(long, value_parser = at_least_one)]
    max_events: Option<u64>,
    /// Events buffered before a reader that falls behind is cut off (exit 6, `watch_lagged`;
    /// 1 to 1048576).
    #[arg(long, value_parser = watch_buffer)]
    buffer: Option<usize>,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Objects of this kind (with --world exports: exports of this kind).
    #[arg(long)]
    kind: Option<String>,
    /// Object ids with this prefix (needs --kind); with --world kv: keys with this prefix.
    #[arg(long)]
    prefix: Option<String>,
    /// Replay the change log after this revision instead of starting with a snapshot.
    #[arg(long, value_parser = crate::output::revision)]
    from_revision: Option<i64>,
    /// Watch World data instead of objects.
    #[arg(long, value_enum)]
    world: Option<WorldScope>,
    /// Watch as this host: exports directed to other hosts are not shown.
    #[arg(long)]
    host: Option<String>,
    #[command(flatten)]
    stream: StreamArgs,
}

#[derive(Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    group(ArgGroup::new("export_data").args(["data", "data_file"]).required(true))
)]
pub struct ExportArgs {
    #[command(subcommand)]
    sync: Option<ExportSub>,
    /// The exporting host.
    #[arg(long, required = true)]
    host: Option<String>,
    #[arg(long, required = true)]
    kind: Option<String>,
    #[arg(long, required = true)]
    name: Option<String>,
    /// The host it is for, or '*' for every host.
    #[arg(long, required = true)]
    to: Option<String>,
    /// The data, as text.
    #[arg(long)]
    data: Option<String>,
    /// Read the data (any bytes) from this file ('-': stdin).
    #[arg(long)]
    data_file: Option<PathBuf>,
    /// Remove the export this long after the write (default: it stays until unexported).
    #[arg(long, value_parser = record_ttl)]
    ttl: Option<Duration>,
    /// Hold this object (of the `-n` namespace) alive while the export lives (the garbage
    /// collector keeps it and what it references). Repeatable.
    #[arg(long, value_name = "KIND/ID")]
    hold_object: Vec<String>,
    /// Hold this blob alive while the export lives. Repeatable.
    #[arg(long, value_name = "sha256:HEX")]
    hold_blob: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum ExportSub {
    /// Make a JSON list of records (from a file, or stdin) the host's complete export set,
    /// atomically: its other exports are removed.
    Sync {
        #[arg(long)]
        host: String,
        /// JSON array of {"kind", "name", "to", "data" | "data_base64", "ttl"?, "holds"?}
        /// ('-': stdin); holds: [{"type": "blob", "digest"} | {"type": "object", "key":
        /// {"namespace", "kind", "id"}} | {"type": "object", "namespace", "kind", "id"}].
        /// `collect -o json`'s output of this host is taken as it is.
        #[arg(long, default_value = "-")]
        file: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct CollectArgs {
    /// The collecting host: it sees its own exports, those to it and those to '*'.
    #[arg(long)]
    host: String,
    #[arg(long)]
    kind: Option<String>,
    #[arg(long)]
    name: Option<String>,
    /// Only exports of this host.
    #[arg(long)]
    from: Option<String>,
}

#[derive(Args, Debug)]
pub struct UnexportArgs {
    #[arg(long)]
    host: String,
    #[arg(long)]
    kind: String,
    #[arg(long)]
    name: String,
    /// The target host, or '*'.
    #[arg(long)]
    to: String,
}

#[derive(Subcommand, Debug)]
pub enum KvCmd {
    /// Show one key (exit 3 if it does not exist).
    Get { key: String },
    /// Set a key (the value is read from stdin if omitted).
    Set {
        key: String,
        value: Option<String>,
        /// Remove the key this long after the write.
        #[arg(long, value_parser = record_ttl)]
        ttl: Option<Duration>,
    },
    /// Set a key only if its revision is R (0: only if it does not exist); exit 4 otherwise.
    Cas {
        key: String,
        value: String,
        #[arg(long, value_parser = crate::output::expected_revision)]
        expect_revision: i64,
        #[arg(long, value_parser = record_ttl)]
        ttl: Option<Duration>,
    },
    /// Delete a key (exit 3 if it does not exist).
    Rm {
        key: String,
        /// Only if the key is at this revision (exit 4 otherwise).
        #[arg(long, value_parser = crate::output::expected_revision)]
        expect_revision: Option<i64>,
    },
    /// List keys with a prefix, in key order.
    Ls {
        prefix: Option<String>,
        #[arg(long, default_value_t = 100, value_parser = crate::output::page_limit)]
        limit: usize,
        /// Continue after this key (the `next` of a previous page).
        #[arg(long)]
        cursor: Option<String>,
        /// Follow cursors and list everything.
        #[arg(long)]
        all: bool,
    },
    /// Stream changes of keys with a prefix as JSON lines.
    Watch {
        prefix: Option<String>,
        #[arg(long, value_parser = crate::output::revision)]
        from_revision: Option<i64>,
        #[command(flatten)]
        stream: StreamArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum MapCmd {
    /// Every host's value in a map.
    Get {
        #[arg(value_name = "MAP")]
        map: String,
    },
    /// Set a host's value in a map.
    Set {
        #[arg(value_name = "MAP")]
        map: String,
        value: String,
        #[arg(long)]
        host: String,
    },
    /// Delete a host's value in a map (exit 3 if it has none).
    Rm {
        #[arg(value_name = "MAP")]
        map: String,
        #[arg(long)]
        host: String,
    },
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("content").args(["payload", "payload_file", "tree"]).required(true).multiple(true)))]
pub struct DeployAddArgs {
    /// The deploy id: 1 for the first, then the next one each time.
    id: u64,
    /// This deploy's hash.
    #[arg(long)]
    hash: Option<String>,
    /// The previous deploy's hash (checked when both hashes are given).
    #[arg(long)]
    parent_hash: Option<String>,
    /// The payload, as text.
    #[arg(long, conflicts_with = "payload_file")]
    payload: Option<String>,
    /// Read the payload (any bytes) from this file ('-': stdin).
    #[arg(long)]
    payload_file: Option<PathBuf>,
    /// Add the regular files under this directory (relative paths, unix permission bits).
    #[arg(long)]
    tree: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum DeployCmd {
    /// Add the next deploy.
    Add(DeployAddArgs),
    /// Show a deploy (exit 3 if it does not exist).
    Get {
        id: u64,
        /// Write the deploy's file tree into this directory (created; must be empty).
        #[arg(long)]
        extract: Option<PathBuf>,
    },
    /// List deploys in id order.
    Ls {
        /// Deploys after this id.
        #[arg(long)]
        after: Option<u64>,
        #[arg(long, default_value_t = 100, value_parser = crate::output::page_limit)]
        limit: usize,
        /// Follow pages and list everything.
        #[arg(long)]
        all: bool,
    },
    /// Remove old deploys (the newest always stays).
    #[command(group(ArgGroup::new("which").args(["before", "keep"]).required(true)))]
    Prune {
        /// Remove deploys with an id lower than this (1 or more).
        #[arg(long, value_parser = deploy_id)]
        before: Option<u64>,
        /// Keep the newest N deploys (at least 1).
        #[arg(long, value_parser = prune_keep)]
        keep: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ScheduleCmd {
    /// Register a host for a scheduler namespace and stay registered (renewing its session)
    /// until interrupted, printing the schedule as a JSON line whenever it changes.
    Register {
        #[arg(value_name = "SCHEDULER_NS")]
        scheduler: String,
        #[arg(long)]
        host: String,
        /// rr (keep the order, append newcomers) or alpha (host name order).
        #[arg(long, default_value = "rr")]
        strategy: String,
        /// Schedule at most this many hosts (0: no limit).
        #[arg(long, default_value_t = 0)]
        max_count: u32,
        /// Session TTL: the host drops out this long after this command stops renewing.
        #[arg(long, default_value = "10s", value_parser = session_ttl)]
        ttl: Duration,
        /// Component name recorded in the session.
        #[arg(long, default_value = "fleetdb-schedule")]
        component: String,
        /// Exit (unregistering) after printing this many schedules (at least 1).
        #[arg(long, value_parser = at_least_one)]
        max_events: Option<u64>,
    },
    /// Show the schedule of a namespace and its live registrations (exit 3 if nobody ever
    /// registered).
    Show {
        #[arg(value_name = "SCHEDULER_NS")]
        scheduler: String,
    },
    /// Stream changes of a namespace's schedule as JSON lines.
    Watch {
        #[arg(value_name = "SCHEDULER_NS")]
        scheduler: String,
        #[arg(long, value_parser = crate::output::revision)]
        from_revision: Option<i64>,
        #[command(flatten)]
        stream: StreamArgs,
    },
}

// ---- JSON shapes (stable; documented in docs/cli.md) ----

/// Bytes as base64 text (through the library's own encoder).
#[derive(Serialize, Deserialize)]
struct B64(#[serde(with = "fleetdb::core::world::b64")] Vec<u8>);

fn base64(bytes: &[u8]) -> Value {
    serde_json::to_value(B64(bytes.to_vec())).unwrap_or(Value::Null)
}

fn from_base64(field: &str, text: &str) -> Result<Vec<u8>, Error> {
    serde_json::from_value::<B64>(Value::String(text.to_string()))
        .map(|b| b.0)
        .map_err(|e| {
            Error::invalid(
                field,
                text.chars().take(64).collect::<String>(),
                e.to_string(),
            )
        })
}

/// Bytes as text when they are UTF-8, else null.
fn text_or_null(bytes: &[u8]) -> Value {
    std::str::from_utf8(bytes).map_or(Value::Null, |s| Value::String(s.to_string()))
}

fn ts_opt(t: Option<fleetdb::Timestamp>) -> Value {
    t.map_or(Value::Null, |t| Value::String(t.to_rfc3339()))
}

fn kv_json(e: &KvEntry) -> Value {
    json!({
        "key": e.key, "value": e.value, "revision": e.revision.0,
        "create_revision": e.create_revision.0, "session_id": e.session_id,
        "expires_at": ts_opt(e.expires_at), "updated_at": e.updated_at.to_rfc3339(),
    })
}

fn export_id_json(id: &ExportId) -> Value {
    json!({"kind": id.kind, "name": id.name, "to": id.to})
}

fn outcome_json(o: &ExportOutcome) -> Value {
    let list = |v: &[ExportId]| v.iter().map(export_id_json).collect::<Vec<_>>();
    json!({"changed": list(&o.changed), "unchanged": list(&o.unchanged), "removed": list(&o.removed)})
}

fn export_json(e: &Export) -> Value {
    json!({
        "from": e.from, "kind": e.id.kind, "name": e.id.name, "to": e.id.to,
        "data": text_or_null(&e.data), "data_base64": base64(&e.data),
        "session_id": e.session_id, "expires_at": ts_opt(e.expires_at),
        "holds": e.holds.iter().map(gc_cmd::resource_json).collect::<Vec<_>>(),
        "revision": e.revision.0, "updated_at": e.updated_at.to_rfc3339(),
    })
}

fn deploy_json(d: &Deploy) -> Value {
    json!({
        "id": d.id, "hash": d.hash, "parent_hash": d.parent_hash,
        "payload": text_or_null(&d.payload), "payload_base64": base64(&d.payload),
        "files": d.files.iter().map(|f| json!({
            "path": f.path, "mode": f.mode, "digest": f.digest, "size": f.size,
        })).collect::<Vec<_>>(),
        "revision": d.revision.0, "created_at": d.created_at.to_rfc3339(),
    })
}

fn deploy_summary_json(d: &Deploy) -> Value {
    json!({
        "id": d.id, "hash": d.hash, "parent_hash": d.parent_hash,
        "payload_bytes": d.payload.len(), "file_count": d.files.len(),
        "tree_bytes": d.files.iter().map(|f| f.size).sum::<u64>(),
        "revision": d.revision.0, "created_at": d.created_at.to_rfc3339(),
    })
}

fn strategy_str(s: Strategy) -> &'static str {
    match s {
        Strategy::Rr => "rr",
        Strategy::Alpha => "alpha",
    }
}

fn schedule_json(s: &Schedule) -> Value {
    json!({
        "namespace": s.namespace, "hosts": s.hosts,
        "strategy": strategy_str(s.options.strategy), "max_count": s.options.max_count,
        "revision": s.revision.0, "updated_at": s.updated_at.to_rfc3339(),
    })
}

/// One watch event as one JSON line.
pub fn event_json(ev: &WatchEvent) -> Value {
    match ev {
        WatchEvent::Snapshot { revision, items } => json!({
            "type": "snapshot",
            "revision": revision.0,
            "items": items.iter().map(output::change).collect::<Vec<_>>(),
        }),
        WatchEvent::Change(c) => {
            let mut v = output::change(c.as_ref() as &Change);
            v["type"] = json!("change");
            v
        }
        WatchEvent::Progress { revision } => json!({"type": "progress", "revision": revision.0}),
    }
}

// ---- streaming ----

/// Print one JSON line and flush. False if stdout is gone (the reader stopped): stop quietly.
fn emit(v: &Value) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}").and_then(|()| out.flush()).is_ok()
}

/// Completes on Ctrl-C or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled: a signal that arrives right after the first line is printed (before
/// the select loop polled this) must still end the command cleanly rather than kill it.
fn interrupted() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        let int = signal(SignalKind::interrupt()).ok();
        let term = signal(SignalKind::terminate()).ok();
        async fn recv(s: Option<Signal>) {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        async move {
            tokio::select! {
                _ = recv(int) => {}
                _ = recv(term) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Open a watch and print its events as JSON lines (see the module documentation).
async fn stream(
    store: &Store,
    scope: WatchScope,
    from: Option<i64>,
    viewer: Option<String>,
    s: &StreamArgs,
) -> Result<(), Error> {
    let mut req = WatchRequest::new(scope);
    // Checked while parsing (`output::revision`): 0 or more.
    req.from_revision = from.map(Revision);
    req.viewer = viewer;
    req.buffer = s.buffer;
    let mut watch = store.watch(req).await?;
    let stop = interrupted();
    tokio::pin!(stop);
    let mut printed = 0u64;
    loop {
        let ev = tokio::select! {
            ev = watch.next() => ev,
            _ = &mut stop => return Ok(()),
        };
        match ev {
            None => return Ok(()),
            Some(Err(e)) => return Err(e),
            Some(Ok(ev)) => {
                if !emit(&event_json(&ev)) {
                    return Ok(());
                }
                printed += 1;
                if s.max_events.is_some_and(|m| printed >= m) {
                    return Ok(());
                }
            }
        }
    }
}

fn only_for(flag: &str, value: Option<&String>, applies: bool, scopes: &str) -> Result<(), Error> {
    match value {
        Some(v) if !applies => Err(Error::invalid(
            flag,
            v.as_str(),
            format!("only applies to {scopes}"),
        )),
        _ => Ok(()),
    }
}

/// `fleetdb watch`. `namespace_given`: whether -n/--namespace (or its env) was set.
pub async fn watch(
    store: &Store,
    ns: &str,
    namespace_given: bool,
    a: WatchArgs,
) -> Result<(), Error> {
    let world = a.world.unwrap_or(WorldScope::Objects);
    let kind_ok = matches!(world, WorldScope::Objects | WorldScope::Exports);
    only_for(
        "--kind",
        a.kind.as_ref(),
        kind_ok,
        "--world objects and exports",
    )?;
    let prefix_ok = matches!(world, WorldScope::Objects | WorldScope::Kv);
    only_for(
        "--prefix",
        a.prefix.as_ref(),
        prefix_ok,
        "--world objects and kv",
    )?;
    if let Some(h) = &a.host {
        fleetdb::core::validate::name("host", h)?;
    }
    let scope = match world {
        WorldScope::Objects => {
            if a.prefix.is_some() && a.kind.is_none() {
                return Err(Error::invalid(
                    "--prefix",
                    a.prefix.unwrap_or_default(),
                    "needs --kind (object ids are prefixed within a kind)",
                ));
            }
            WatchScope::Objects {
                namespace: ns.to_string(),
                kind: a.kind,
                id_prefix: a.prefix,
            }
        }
        WorldScope::All => WatchScope::All,
        WorldScope::Kv => WatchScope::Kv {
            prefix: a.prefix.unwrap_or_default(),
        },
        WorldScope::Exports => WatchScope::Exports { kind: a.kind },
        WorldScope::Map => WatchScope::Map {
            namespace: ns.to_string(),
        },
        WorldScope::Deploys => WatchScope::Deploys,
        WorldScope::Schedule => WatchScope::Schedule {
            namespace: namespace_given.then(|| ns.to_string()),
        },
        WorldScope::Members => WatchScope::Members,
    };
    stream(store, scope, a.from_revision, a.host, &a.stream).await
}

// ---- exports ----

/// Reads `path` (`-`: stdin), refusing more than `max` bytes: a regular file by its size before
/// anything is read, anything else (stdin, a pipe) by reading at most one byte past `max`.
fn read_bytes(field: &str, path: &Path, max: usize) -> Result<Vec<u8>, Error> {
    let stdin = path == Path::new("-");
    let shown = if stdin {
        "<stdin>".to_string()
    } else {
        path.display().to_string()
    };
    let cannot = |e: std::io::Error| Error::invalid(field, &shown, format!("cannot read it: {e}"));
    let mut buf = Vec::new();
    if stdin {
        std::io::stdin()
            .take(max as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(cannot)?;
    } else {
        let f = std::fs::File::open(path).map_err(cannot)?;
        let md = f.metadata().map_err(cannot)?;
        if md.is_file() && md.len() > max as u64 {
            return Err(Error::TooLarge {
                field: format!("{field} {shown}"),
                size: usize::try_from(md.len()).unwrap_or(usize::MAX),
                max,
            });
        }
        f.take(max as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(cannot)?;
    }
    if buf.len() > max {
        return Err(Error::TooLargeInput {
            field: format!("{field} {shown}"),
            max,
        });
    }
    Ok(buf)
}

fn lifetime(ttl: Option<Duration>) -> Lifetime {
    ttl.map_or_else(Lifetime::persistent, Lifetime::ttl)
}

/// A record of `export sync`'s input. An element of `collect -o json` is one too (a round
/// trip): its holds are printed flat, it carries `data` and `data_base64` both, and the fields
/// only collect prints are checked (`from`, `session_id`, `expires_at`) or ignored
/// (`revision`, `updated_at`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncRecord {
    kind: String,
    name: String,
    to: String,
    data: Option<String>,
    data_base64: Option<String>,
    ttl: Option<String>,
    #[serde(default)]
    holds: Vec<SyncHold>,
    from: Option<String>,
    session_id: Option<String>,
    expires_at: Option<String>,
    #[allow(dead_code)]
    revision: Option<serde::de::IgnoredAny>,
    #[allow(dead_code)]
    updated_at: Option<serde::de::IgnoredAny>,
}

/// A hold of `export sync`'s input: the nested shape (`{"type": "object", "key": {…}}`,
/// `{"type": "blob", "digest"}`) or an object printed flat, as `collect` and `lease show` print
/// it (`{"type": "object", "namespace", "kind", "id"}`).
#[derive(Deserialize)]
#[serde(untagged)]
enum SyncHold {
    Nested(Resource),
    Flat(FlatObjectHold),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlatObjectHold {
    #[serde(rename = "type")]
    _type: FlatObjectType,
    namespace: String,
    kind: String,
    id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum FlatObjectType {
    Object,
}

impl SyncHold {
    fn resource(self) -> Result<Resource, Error> {
        match self {
            SyncHold::Nested(r) => Ok(r),
            SyncHold::Flat(f) => Ok(Resource::Object {
                key: fleetdb::ObjectKey::new(f.namespace, f.kind, f.id)?,
            }),
        }
    }
}

fn print_outcome(fmt: Format, o: &ExportOutcome) {
    match fmt {
        Format::Json => output::print_json(&outcome_json(o)),
        Format::Table => {
            for (what, ids) in [
                ("exported", &o.changed),
                ("unchanged", &o.unchanged),
                ("removed", &o.removed),
            ] {
                for id in ids {
                    println!("{what} {id}");
                }
            }
            if o.changed.is_empty() && o.unchanged.is_empty() && o.removed.is_empty() {
                println!("nothing changed");
            }
        }
    }
}

pub async fn export(store: &Store, ns: &str, fmt: Format, a: ExportArgs) -> Result<(), Error> {
    if let Some(ExportSub::Sync { host, file }) = a.sync {
        let world = store.world(&host)?;
        let text = read_bytes(
            "export records",
            &file,
            w::EXPORTS_PER_CALL_MAX * (w::EXPORT_DATA_BYTES_MAX / 8),
        )?;
        let parsed: Vec<SyncRecord> = serde_json::from_slice(&text).map_err(|e| {
            Error::invalid(
                "export records",
                file.display().to_string(),
                format!(
                    "must be a JSON array of {{\"kind\", \"name\", \"to\", \"data\" | \"data_base64\", \"ttl\"?, \"holds\"?}} (or collect -o json's output); a hold is {{\"type\": \"blob\", \"digest\"}} or {{\"type\": \"object\", \"key\": {{\"namespace\", \"kind\", \"id\"}}}} or {{\"type\": \"object\", \"namespace\", \"kind\", \"id\"}}: {e}"
                ),
            )
        })?;
        let mut records = Vec::with_capacity(parsed.len());
        for r in parsed {
            let shown = format!("{}/{} to {}", r.kind, r.name, r.to);
            if let Some(from) = &r.from {
                if *from != host {
                    return Err(Error::invalid(
                        "export from",
                        from,
                        format!(
                            "a record exported by another host; sync --host {from} takes it \
                             (record {shown})"
                        ),
                    ));
                }
            }
            for (field, set) in [
                ("session_id", r.session_id.is_some()),
                ("expires_at", r.expires_at.is_some()),
            ] {
                if set {
                    return Err(Error::invalid(
                        "export record",
                        &shown,
                        format!(
                            "has a {field} (as collect prints a session-bound or expiring \
                             export): sync writes persistent records or \"ttl\" ones; give \
                             \"ttl\" and leave out {field}"
                        ),
                    ));
                }
            }
            let data = match (r.data, r.data_base64) {
                (Some(t), None) => t.into_bytes(),
                (None, Some(b)) => from_base64("export data_base64", &b)?,
                (Some(t), Some(b)) => {
                    // As collect prints them: the same bytes twice.
                    let bytes = from_base64("export data_base64", &b)?;
                    if bytes != t.as_bytes() {
                        return Err(Error::invalid(
                            "export record",
                            &shown,
                            "\"data\" and \"data_base64\" differ (give one)",
                        ));
                    }
                    bytes
                }
                (None, None) => {
                    return Err(Error::invalid(
                        "export record",
                        &shown,
                        "needs \"data\" or \"data_base64\"",
                    ))
                }
            };
            let ttl = r
                .ttl
                .map(|t| record_ttl(&t).map_err(|e| Error::invalid("export ttl", &t, e)))
                .transpose()?;
            let rec = ExportRecord {
                id: ExportId::new(r.kind, r.name, r.to),
                data,
                lifetime: lifetime(ttl),
                holds: r
                    .holds
                    .into_iter()
                    .map(SyncHold::resource)
                    .collect::<Result<_, _>>()?,
            };
            rec.validate()?;
            records.push(rec);
        }
        let o = world.sync_exports(records).await?;
        print_outcome(fmt, &o);
        return Ok(());
    }
    // clap requires these when there is no subcommand.
    let missing = |f: &str| Error::invalid(f, "", "is required");
    let host = a.host.ok_or_else(|| missing("--host"))?;
    let id = ExportId::new(
        a.kind.ok_or_else(|| missing("--kind"))?,
        a.name.ok_or_else(|| missing("--name"))?,
        a.to.ok_or_else(|| missing("--to"))?,
    );
    let world = store.world(&host)?;
    let data = match (a.data, a.data_file) {
        (Some(d), _) => d.into_bytes(),
        (None, Some(f)) => read_bytes("export data file", &f, w::EXPORT_DATA_BYTES_MAX)?,
        (None, None) => return Err(missing("--data")),
    };
    let mut holds = Vec::new();
    for o in &a.hold_object {
        holds.push(gc_cmd::object_resource(ns, "--hold-object", o)?);
    }
    for d in a.hold_blob {
        holds.push(gc_cmd::blob_resource(d)?);
    }
    let rec = ExportRecord {
        id,
        data,
        lifetime: lifetime(a.ttl),
        holds,
    };
    rec.validate()?;
    let o = world.export(vec![rec]).await?;
    print_outcome(fmt, &o);
    Ok(())
}

pub async fn collect(store: &Store, fmt: Format, a: CollectArgs) -> Result<(), Error> {
    let world = store.world(&a.host)?;
    let filter = ExportFilter {
        kind: a.kind,
        name: a.name,
        from: a.from,
    };
    let filters = if filter == ExportFilter::default() {
        Vec::new()
    } else {
        vec![filter]
    };
    let items = world.collect(&filters).await?;
    match fmt {
        Format::Json => output::print_json(&items.iter().map(export_json).collect::<Vec<_>>()),
        Format::Table => output::table(
            &["FROM", "KIND", "NAME", "TO", "DATA", "REVISION"],
            &items
                .iter()
                .map(|e| {
                    // Another host's data: `output::table` escapes it, so the row stays one
                    // line and no control sequence reaches the terminal.
                    let data = match std::str::from_utf8(&e.data) {
                        Ok(s) => s.chars().take(60).collect(),
                        Err(_) => format!("<{} bytes>", e.data.len()),
                    };
                    vec![
                        e.from.clone(),
                        e.id.kind.clone(),
                        e.id.name.clone(),
                        e.id.to.clone(),
                        data,
                        e.revision.to_string(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
    Ok(())
}

pub async fn unexport(store: &Store, fmt: Format, a: UnexportArgs) -> Result<(), Error> {
    let world = store.world(&a.host)?;
    let id = ExportId::new(a.kind, a.name, a.to);
    id.validate()?;
    let o = world.unexport(vec![id]).await?;
    print_outcome(fmt, &o);
    Ok(())
}

// ---- key-values ----

fn print_kv_written(fmt: Format, w: &Written<KvEntry>) {
    match fmt {
        Format::Json => {
            let mut v = kv_json(&w.item);
            v["changed"] = json!(w.changed);
            output::print_json(&v);
        }
        Format::Table => println!(
            "{} {} (revision {})",
            if w.changed { "set" } else { "unchanged" },
            w.item.key,
            w.item.revision
        ),
    }
}

pub async fn kv(store: &Store, fmt: Format, cmd: KvCmd) -> Result<(), Error> {
    match cmd {
        KvCmd::Get { key } => {
            let e = store
                .kv_get(&key)
                .await?
                .ok_or_else(|| Error::not_found(format!("key {key:?}")))?;
            match fmt {
                Format::Json => output::print_json(&kv_json(&e)),
                Format::Table => println!("{}", e.value),
            }
        }
        KvCmd::Set { key, value, ttl } => {
            w::validate_kv_key(&key)?;
            let value = match value {
                Some(v) => v,
                None => {
                    let bytes = read_bytes("value", Path::new("-"), w::KV_VALUE_BYTES_MAX)?;
                    String::from_utf8(bytes)
                        .map_err(|_| Error::invalid("value", "<stdin>", "must be UTF-8 text"))?
                }
            };
            let w = store.kv_set_with(&key, &value, None, lifetime(ttl)).await?;
            print_kv_written(fmt, &w);
        }
        KvCmd::Cas {
            key,
            value,
            expect_revision,
            ttl,
        } => {
            let expect = Revision(expect_revision);
            let w = store
                .kv_set_with(&key, &value, Some(expect), lifetime(ttl))
                .await?;
            print_kv_written(fmt, &w);
        }
        KvCmd::Rm {
            key,
            expect_revision,
        } => {
            let expect = expect_revision.map(Revision);
            let r = store.kv_delete(&key, expect).await?;
            match fmt {
                Format::Json => output::print_json(&json!({"deleted": key, "revision": r.0})),
                Format::Table => println!("deleted {key} (revision {r})"),
            }
        }
        KvCmd::Ls {
            prefix,
            limit,
            cursor,
            all,
        } => {
            let prefix = prefix.unwrap_or_default();
            let mut after = cursor;
            let mut items = Vec::new();
            let next = loop {
                let page = store.kv_list(&prefix, after.as_deref(), limit).await?;
                items.extend(page.items);
                match page.next {
                    Some(k) if all => after = Some(k),
                    other => break other,
                }
            };
            output::print_page(
                fmt,
                &items,
                next,
                kv_json,
                &["KEY", "VALUE", "REVISION", "EXPIRES"],
                |e| {
                    vec![
                        e.key.clone(),
                        e.value.chars().take(60).collect(),
                        e.revision.to_string(),
                        e.expires_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                    ]
                },
                "--cursor",
            );
        }
        KvCmd::Watch {
            prefix,
            from_revision,
            stream: s,
        } => {
            let scope = WatchScope::Kv {
                prefix: prefix.unwrap_or_default(),
            };
            stream(store, scope, from_revision, None, &s).await?;
        }
    }
    Ok(())
}

// ---- per-host maps ----

pub async fn map(store: &Store, fmt: Format, cmd: MapCmd) -> Result<(), Error> {
    match cmd {
        MapCmd::Get { map } => {
            let values: BTreeMap<String, String> = store.map_get(&map).await?;
            match fmt {
                Format::Json => output::print_json(&json!({"map": map, "values": values})),
                Format::Table => output::table(
                    &["HOST", "VALUE"],
                    &values
                        .iter()
                        .map(|(h, v)| vec![h.clone(), v.clone()])
                        .collect::<Vec<_>>(),
                ),
            }
        }
        MapCmd::Set { map, value, host } => {
            fleetdb::core::validate::name("map namespace", &map)?;
            w::validate_map_value(&value)?;
            let wr = store.world(&host)?.map_set(&map, &value).await?;
            match fmt {
                Format::Json => output::print_json(
                    &json!({"map": map, "host": host, "value": wr.item, "changed": wr.changed}),
                ),
                Format::Table => println!(
                    "{} {host}'s value in map {map}",
                    if wr.changed { "set" } else { "unchanged" }
                ),
            }
        }
        MapCmd::Rm { map, host } => {
            let r = store.world(&host)?.map_delete(&map).await?;
            match fmt {
                Format::Json => output::print_json(
                    &json!({"deleted": format!("{map}/{host}"), "revision": r.0}),
                ),
                Format::Table => println!("deleted {host}'s value in map {map} (revision {r})"),
            }
        }
    }
    Ok(())
}

// ---- deploys ----

/// The regular files under `root`, with '/'-separated relative paths and permission bits, in
/// path order. Symbolic links and special files are refused; empty directories are not kept.
fn read_tree(root: &Path) -> Result<Vec<DeployFileDraft>, Error> {
    let shown = root.display().to_string();
    let meta = std::fs::symlink_metadata(root)
        .map_err(|e| Error::invalid("--tree", &shown, format!("cannot read it: {e}")))?;
    if !meta.is_dir() {
        return Err(Error::invalid("--tree", &shown, "must be a directory"));
    }
    let mut files = Vec::new();
    let mut total = 0usize;
    let mut stack: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| {
            Error::invalid(
                "--tree",
                dir.display().to_string(),
                format!("cannot list it: {e}"),
            )
        })?;
        for entry in entries {
            let entry = entry.map_err(|e| {
                Error::invalid(
                    "--tree",
                    dir.display().to_string(),
                    format!("cannot list it: {e}"),
                )
            })?;
            let path = entry.path();
            let name = entry.file_name().into_string().map_err(|n| {
                Error::invalid(
                    "deploy tree path",
                    n.to_string_lossy().into_owned(),
                    "must be UTF-8",
                )
            })?;
            let rel_path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let md = std::fs::symlink_metadata(&path).map_err(|e| {
                Error::invalid(
                    "deploy tree path",
                    &rel_path,
                    format!("cannot read it: {e}"),
                )
            })?;
            let ft = md.file_type();
            if ft.is_symlink() {
                return Err(Error::invalid(
                    "deploy tree path",
                    &rel_path,
                    "is a symbolic link; a deploy tree holds only regular files and directories",
                ));
            } else if ft.is_dir() {
                stack.push((path, rel_path));
            } else if ft.is_file() {
                w::validate_tree_path(&rel_path)?;
                if files.len() >= w::DEPLOY_FILES_MAX {
                    return Err(Error::invalid(
                        "deploy tree",
                        shown,
                        format!("at most {} files", w::DEPLOY_FILES_MAX),
                    ));
                }
                total += md.len() as usize;
                if total > w::DEPLOY_TREE_BYTES_MAX {
                    return Err(Error::TooLarge {
                        field: format!("deploy tree {shown}"),
                        size: total,
                        max: w::DEPLOY_TREE_BYTES_MAX,
                    });
                }
                let content = std::fs::read(&path).map_err(|e| {
                    Error::invalid(
                        "deploy tree path",
                        &rel_path,
                        format!("cannot read it: {e}"),
                    )
                })?;
                files.push(DeployFileDraft {
                    path: rel_path,
                    mode: file_mode(&md),
                    content,
                });
            } else {
                return Err(Error::invalid(
                    "deploy tree path",
                    &rel_path,
                    "is not a regular file or directory",
                ));
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

#[cfg(unix)]
fn file_mode(md: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    md.permissions().mode() & 0o7777
}

#[cfg(not(unix))]
fn file_mode(md: &std::fs::Metadata) -> u32 {
    if md.permissions().readonly() {
        0o444
    } else {
        0o644
    }
}

/// Write a deploy's files under `dir` (created; must not hold anything yet).
async fn extract(store: &Store, id: u64, dir: &Path) -> Result<usize, Error> {
    let shown = dir.display().to_string();
    let io = |what: &str, p: &Path, e: std::io::Error| {
        Error::invalid(
            "--extract",
            p.display().to_string(),
            format!("cannot {what}: {e}"),
        )
    };
    if let Ok(mut entries) = std::fs::read_dir(dir) {
        if entries.next().is_some() {
            return Err(Error::invalid(
                "--extract",
                &shown,
                "must be an empty or new directory",
            ));
        }
    } else if dir.exists() {
        return Err(Error::invalid("--extract", &shown, "must be a directory"));
    }
    let files = store.deploy_files(id).await?;
    let write_tree = |root: &Path| -> Result<(), Error> {
        for (f, content) in &files {
            w::validate_tree_path(&f.path)?;
            let path = root.join(&f.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io("create it", parent, e))?;
            }
            std::fs::write(&path, content).map_err(|e| io("write it", &path, e))?;
            // Permission bits only, whatever a deploy stored before they were checked: never
            // a setuid, setgid or sticky file.
            set_mode(&path, f.mode & w::DEPLOY_FILE_MODE_MAX)
                .map_err(|e| io("set its mode", &path, e))?;
        }
        Ok(())
    };
    if dir.exists() {
        // An empty directory that exists (a mount point, one made with its owner and mode) is
        // kept and written into; a failure empties it again.
        if let Err(e) = write_tree(dir) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    let p = entry.path();
                    let _ = if p.is_dir() && !p.is_symlink() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                }
            }
            return Err(e);
        }
        return Ok(files.len());
    }
    // A new DIR: written as a folder of our own beside it, renamed into place at the end, so a
    // failure (a full disk) leaves no half-written tree.
    let name = dir.file_name().ok_or_else(|| {
        Error::invalid("--extract", &shown, "must name a directory, not end in ..")
    })?;
    let mut part_name = std::ffi::OsString::from(".");
    part_name.push(name);
    part_name.push(format!(".part-{}", std::process::id()));
    let part = dir.with_file_name(part_name);
    let written = std::fs::create_dir_all(&part)
        .map_err(|e| io("create it", &part, e))
        .and_then(|()| write_tree(&part))
        .and_then(|()| {
            std::fs::rename(&part, dir).map_err(|e| io("move the tree into it", dir, e))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&part);
        return Err(e);
    }
    Ok(files.len())
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> std::io::Result<()> {
    Ok(())
}

pub async fn deploy(store: &Store, fmt: Format, cmd: DeployCmd) -> Result<(), Error> {
    match cmd {
        DeployCmd::Add(a) => {
            let payload = match (a.payload, &a.payload_file) {
                (Some(p), _) => p.into_bytes(),
                (None, Some(f)) => read_bytes("payload file", f, w::DEPLOY_PAYLOAD_BYTES_MAX)?,
                (None, None) => Vec::new(),
            };
            let files = match &a.tree {
                Some(dir) => read_tree(dir)?,
                None => Vec::new(),
            };
            let draft = DeployDraft {
                id: a.id,
                hash: a.hash,
                parent_hash: a.parent_hash,
                payload,
                files,
            };
            draft.validate()?;
            let d = store.deploy_add(draft).await?;
            match fmt {
                Format::Json => output::print_json(&deploy_json(&d)),
                Format::Table => println!(
                    "added deploy {} ({} payload bytes, {} files; revision {})",
                    d.id,
                    d.payload.len(),
                    d.files.len(),
                    d.revision
                ),
            }
        }
        DeployCmd::Get { id, extract: dir } => {
            let d = store
                .deploy_get(id)
                .await?
                .ok_or_else(|| Error::not_found(format!("deploy {id}")))?;
            let extracted = match &dir {
                Some(dir) => Some(extract(store, id, dir).await?),
                None => None,
            };
            match fmt {
                Format::Json => {
                    let mut v = deploy_json(&d);
                    if let Some(dir) = &dir {
                        v["extracted_to"] = json!(dir.display().to_string());
                    }
                    output::print_json(&v);
                }
                Format::Table => {
                    println!("id:          {}", d.id);
                    println!("hash:        {}", d.hash.as_deref().unwrap_or("-"));
                    println!("parent hash: {}", d.parent_hash.as_deref().unwrap_or("-"));
                    match std::str::from_utf8(&d.payload) {
                        Ok(s) if !s.is_empty() => println!("payload:     {}", output::one_line(s)),
                        _ => println!("payload:     {} bytes", d.payload.len()),
                    }
                    println!("created:     {}", d.created_at);
                    println!("revision:    {}", d.revision);
                    for f in &d.files {
                        println!("file:        {:04o} {:>10} {}", f.mode, f.size, f.path);
                    }
                    if let (Some(dir), Some(n)) = (&dir, extracted) {
                        println!("extracted {n} file(s) to {}", dir.display());
                    }
                }
            }
        }
        DeployCmd::Ls { after, limit, all } => {
            let mut after = after;
            let mut items = Vec::new();
            let next = loop {
                let page = store.deploy_list(after, limit).await?;
                let full = page.len() == limit;
                let last = page.last().map(|d| d.id);
                items.extend(page);
                // A full page is the last one when nothing follows it: no cursor then, as
                // for every other listing.
                let more = match last {
                    Some(id) if full => !store.deploy_list(Some(id), 1).await?.is_empty(),
                    _ => false,
                };
                match last {
                    Some(id) if more && all => after = Some(id),
                    Some(id) if more => break Some(id),
                    _ => break None,
                }
            };
            output::print_page(
                fmt,
                &items,
                next,
                deploy_summary_json,
                &["ID", "HASH", "PARENT", "PAYLOAD", "FILES", "CREATED"],
                |d| {
                    vec![
                        d.id.to_string(),
                        d.hash.clone().unwrap_or_default(),
                        d.parent_hash.clone().unwrap_or_default(),
                        d.payload.len().to_string(),
                        d.files.len().to_string(),
                        d.created_at.to_rfc3339(),
                    ]
                },
                "--after",
            );
        }
        DeployCmd::Prune { before, keep } => {
            let before = match (before, keep) {
                (Some(b), _) => b,
                // --keep is at least 1 (checked while parsing: `prune_keep`); keeping more
                // deploys than there are prunes below id 1, that is nothing.
                (None, Some(k)) => match store.deploy_max_id().await? {
                    Some(max) => (max + 1).saturating_sub(k).max(1),
                    None => 1,
                },
                (None, None) => return Err(Error::invalid("--before", "", "is required")),
            };
            let n = if before > 1 {
                store.deploy_prune(before).await?
            } else {
                0
            };
            match fmt {
                Format::Json => output::print_json(&json!({"pruned": n, "before": before})),
                Format::Table => println!("pruned {n} deploy(s) with an id lower than {before}"),
            }
        }
    }
    Ok(())
}

// ---- scheduler and membership ----

async fn schedule_of(store: &Store, ns: &str) -> Result<Value, Error> {
    let s = store.schedule_get(ns).await?;
    Ok(match s {
        Some(s) => schedule_json(&s),
        None => json!({
            "namespace": ns, "hosts": [], "strategy": null, "max_count": null,
            "revision": 0, "updated_at": null,
        }),
    })
}

pub async fn schedule(store: &Store, fmt: Format, cmd: ScheduleCmd) -> Result<(), Error> {
    match cmd {
        ScheduleCmd::Show { scheduler } => {
            let s = store
                .schedule_get(&scheduler)
                .await?
                .ok_or_else(|| Error::not_found(format!("schedule {scheduler:?}")))?;
            let regs = store.schedule_registrations(&scheduler).await?;
            match fmt {
                Format::Json => {
                    let mut v = schedule_json(&s);
                    v["registrations"] = regs
                        .iter()
                        .map(|r| {
                            json!({
                                "host": r.host, "session_id": r.session_id,
                                "strategy": strategy_str(r.options.strategy),
                                "max_count": r.options.max_count,
                                "registered_at": r.registered_at.to_rfc3339(),
                            })
                        })
                        .collect();
                    output::print_json(&v);
                }
                Format::Table => {
                    println!("namespace: {}", s.namespace);
                    println!("hosts:     {}", s.hosts.join(","));
                    println!(
                        "options:   strategy {}, max count {}",
                        strategy_str(s.options.strategy),
                        s.options.max_count
                    );
                    println!("revision:  {}", s.revision);
                    output::table(
                        &["HOST", "SESSION", "STRATEGY", "MAX", "REGISTERED"],
                        &regs
                            .iter()
                            .map(|r| {
                                vec![
                                    r.host.clone(),
                                    r.session_id.clone(),
                                    strategy_str(r.options.strategy).into(),
                                    r.options.max_count.to_string(),
                                    r.registered_at.to_rfc3339(),
                                ]
                            })
                            .collect::<Vec<_>>(),
                    );
                }
            }
            Ok(())
        }
        ScheduleCmd::Watch {
            scheduler,
            from_revision,
            stream: s,
        } => {
            let scope = WatchScope::Schedule {
                namespace: Some(scheduler),
            };
            stream(store, scope, from_revision, None, &s).await
        }
        ScheduleCmd::Register {
            scheduler,
            host,
            strategy,
            max_count,
            ttl,
            component,
            max_events,
        } => {
            fleetdb::core::validate::name("scheduler namespace", &scheduler)?;
            let options = ScheduleOptions {
                strategy: Strategy::parse(&strategy)?,
                max_count,
            };
            let world = store.world(&host)?;
            let spec = SessionSpec::new(&component, &host)
                .runtime_info(format!(
                    "fleetdb schedule register {scheduler} pid {}",
                    std::process::id()
                ))
                .ttl(ttl);
            spec.validate()?;
            let session = store.session_start(spec).await?;
            let result = async {
                world
                    .schedule_register(&scheduler, &session, options)
                    .await?;
                let mut watch = store
                    .watch(WatchRequest::new(WatchScope::Schedule {
                        namespace: Some(scheduler.clone()),
                    }))
                    .await?;
                let stop = interrupted();
                tokio::pin!(stop);
                let mut last: Option<Value> = None;
                let mut printed = 0u64;
                loop {
                    tokio::select! {
                        ev = watch.next() => match ev {
                            None => return Ok(()),
                            Some(Err(e)) => return Err(e),
                            Some(Ok(WatchEvent::Progress { .. })) => {}
                            Some(Ok(_)) => {
                                let v = schedule_of(store, &scheduler).await?;
                                if last.as_ref() != Some(&v) {
                                    if !emit(&v) {
                                        return Ok(());
                                    }
                                    last = Some(v);
                                    printed += 1;
                                    if max_events.is_some_and(|m| printed >= m) {
                                        return Ok(());
                                    }
                                }
                            }
                        },
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {
                            if stdout_gone() {
                                // Its reader went away (`| head -1`): stop, and leave (nothing
                                // would print again until the schedule changed).
                                return Ok(());
                            }
                            if session.is_expired() {
                                return Err(Error::SessionExpired {
                                    session_id: session.id().to_string(),
                                });
                            }
                        }
                        _ = &mut stop => return Ok(()),
                    }
                }
            }
            .await;
            // Closing the session drops the registration and reschedules at once.
            if !session.is_expired() {
                let _ = session.close().await;
            }
            result
        }
    }
}

pub async fn members(store: &Store, fmt: Format) -> Result<(), Error> {
    let now = store.clock().now();
    let all = store.members().await?;
    match fmt {
        Format::Json => output::print_json(
            &all.iter()
                .map(|s| work_cmd::session_json(s, now))
                .collect::<Vec<_>>(),
        ),
        Format::Table => output::table(
            &["ID", "COMPONENT", "HOST", "RUNTIME INFO", "DEADLINE"],
            &all.iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        s.component.clone(),
                        s.host.clone(),
                        output::one_line(&s.runtime_info.chars().take(60).collect::<String>()),
                        s.deadline.to_rfc3339(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
    Ok(())
}

/// Whether stdout is a pipe whose reader has gone (the write end then polls as an error).
fn stdout_gone() -> bool {
    let mut fd = libc::pollfd {
        fd: 1,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout: poll only reports on the descriptor.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
}
