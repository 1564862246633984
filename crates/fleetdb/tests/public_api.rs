//! Compile-time checks of the public API as an embedding program uses it: every public async
//! method's future is `Send` (so it can run inside `tokio::spawn`), and the handles a program
//! shares or moves between tasks are `Send + Sync`. Nothing here runs: it must only compile.
#![allow(dead_code, unused_must_use, clippy::too_many_arguments)]

use std::time::Duration;

use fleetdb::{
    Backoff, BackoffWhich, BlobWriter, ChangeFilter, DeployDraft, ExportFilter, ExportId,
    ExportRecord, Fence, HistoryFilter, LeaseSpec, Lifetime, ObjectKey, ObjectQuery, OpenOptions,
    Resource, Revision, ScheduleOptions, Session, SessionSpec, Store, Txn, Watch, WatchRequest,
    WatchScope, Work, World,
};

fn send<T: Send>(_: T) {}
fn send_sync<T: Send + Sync>() {}

#[test]
fn handles_are_send_and_sync() {
    send_sync::<Store>();
    send_sync::<Session>();
    send_sync::<Work>();
    send_sync::<Watch>();
    send_sync::<BlobWriter>();
    send_sync::<World>();
    send_sync::<Fence>();
    send_sync::<Txn>();
    send_sync::<OpenOptions>();
    send_sync::<fleetdb::Error>();
}

async fn read_in_txn(tx: Txn, key: ObjectKey) -> fleetdb::Result<()> {
    tx.namespace_get("default").await?;
    tx.object_get(&key).await?;
    tx.tag_get(&key, "t").await?;
    Ok(())
}

fn store_futures_are_send(
    store: &Store,
    key: &ObjectKey,
    query: &ObjectQuery,
    fence: &Fence,
    spec: SessionSpec,
    lease: LeaseSpec,
    resource: Resource,
    filter: &ChangeFilter,
    hist: &HistoryFilter,
    which: BackoffWhich,
    draft: DeployDraft,
    req: WatchRequest,
) {
    let v = serde_json::json!({});
    send(Store::open(""));
    send(Store::open_with("", OpenOptions::default()));
    send(Store::from_backend(
        store.backend().clone(),
        store.clock().clone(),
        store.limits().clone(),
    ));
    send(store.metrics_refresh());
    send(store.schema_status());
    send(store.migrate());
    send(store.namespace_create("n", Default::default()));
    send(store.namespace_get("n"));
    send(store.namespace_list(None, 10));
    send(store.namespace_set_labels("n", Default::default()));
    send(store.namespace_delete("n"));
    send(store.object_put(key, Default::default()));
    send(store.object_put_mode(key, Default::default(), fleetdb::PutMode::Upsert));
    send(store.object_create("n", "k", Default::default()));
    send(store.object_get(key));
    send(store.object_list(query));
    send(store.object_delete(key));
    send(store.tag_set(key, "t", &v));
    send(store.tag_set_fenced(fence, key, "t", &v));
    send(store.tag_get(key, "t"));
    send(store.tag_list(key));
    send(store.tag_delete(key, "t"));
    send(store.tag_delete_fenced(fence, key, "t"));
    let k = key.clone();
    send(store.txn(move |tx| read_in_txn(tx, k.clone())));
    let k = key.clone();
    send(store.txn_fenced(fence, move |tx| read_in_txn(tx, k.clone())));
    send(store.changes(Revision(0), filter, 10));
    send(store.compact(Revision(0)));
    send(store.compact_older_than(Duration::from_secs(1)));
    send(store.revision());
    // Sessions and work, operator calls.
    send(store.session_start(spec));
    send(store.renew_sessions());
    send(store.sweep_sessions());
    send(store.process_define("p", &["q"]));
    send(store.process_pause("p"));
    send(store.process_resume("p"));
    send(store.process_limit("p", Some(1)));
    send(store.process_max_failures("p", Some(1)));
    send(store.work_stats());
    send(store.process_list());
    send(store.session_get("s"));
    send(store.session_list(None, 10));
    send(store.session_close("s"));
    send(store.work_list(None, 10));
    send(store.work_page(None, None, None, 10));
    send(store.work_cancel(key, "p"));
    send(store.work_explain(key, "p", None));
    send(store.backoff_list(None, true, 10));
    send(store.backoff_parked(None, 10));
    send(store.backoff_page(None, which, None, 10));
    send(store.backoff_clear(key, "p"));
    send(store.backoff_unpark(None));
    send(store.history(hist, None, 10));
    send(store.history_prune(Duration::from_secs(1)));
    send(store.select("kind = machine", None, 10));
    send(store.count("kind = machine"));
    // Watches.
    send(store.watch(req));
    // Content store.
    send(store.blob_writer("r", None, None));
    send(store.blob_writer_with_ttl("r", None, None, Duration::from_secs(1)));
    send(store.blob_put(b"x", Default::default(), None));
    send(store.blob_get("sha256:00"));
    send(store.blob_read_range("sha256:00", 0, None));
    send(store.blob_info("sha256:00"));
    send(store.blob_list(None, 10));
    send(store.blob_delete("sha256:00"));
    send(store.ingest_list());
    send(store.ingest_abort("r"));
    // GC and leases.
    send(store.gc_kind_declare("k", true));
    send(store.gc_kinds());
    send(store.lease_create(lease));
    send(store.lease_get("l"));
    send(store.lease_list("", None, 10));
    send(store.lease_delete("l", false));
    send(store.lease_add("l", resource.clone()));
    send(store.lease_remove_resource("l", resource));
    send(store.lease_resources("l"));
    send(store.object_put_leased(key, Default::default(), "l"));
    send(store.gc_maybe_run());
    send(store.gc_run());
    send(store.gc_history(10));
    // World, store-wide.
    send(store.kv_get("k"));
    send(store.kv_list("", None, 10));
    send(store.kv_set("k", "v"));
    send(store.kv_cas("k", "v", Revision(1)));
    send(store.kv_set_with("k", "v", None, Lifetime::persistent()));
    send(store.kv_delete("k", None));
    send(store.map_get("m"));
    send(store.deploy_add(draft));
    send(store.deploy_get(1));
    send(store.deploy_list(None, 10));
    send(store.deploy_max_id());
    send(store.deploy_files(1));
    send(store.deploy_prune(1));
    send(store.schedule_get("s"));
    send(store.schedule_registrations("s"));
    send(store.members());
}

fn session_futures_are_send(
    session: &Session,
    owned: Session,
    works: &mut [Work],
    key: &ObjectKey,
) {
    send(session.claim("p", "kind = machine", 1));
    send(session.claim_object(key, "p"));
    send(session.claim_wait("p", "kind = machine", 1, Duration::from_secs(1)));
    let k = key.clone();
    send(session.txn(move |tx| read_in_txn(tx, k.clone())));
    send(session.finish_many(works));
    let k = key.clone();
    send(session.finish_many_with(works, move |tx| read_in_txn(tx, k.clone())));
    let k = key.clone();
    send(session.finish_many_and_claim(
        works,
        move |tx| read_in_txn(tx, k.clone()),
        "p",
        "kind = machine",
        1,
    ));
    send(owned.close());
}

fn work_futures_are_send(work: &mut Work, backoff: &Backoff, key: &ObjectKey) {
    let k = key.clone();
    send(work.update(move |tx| read_in_txn(tx, k.clone())));
    let k = key.clone();
    send(work.finish(move |tx| read_in_txn(tx, k.clone())));
    let k = key.clone();
    send(work.finish_and_claim(move |tx| read_in_txn(tx, k.clone()), "p", "kind = x", 1));
    send(work.cancel());
    send(work.fail(backoff, "cause"));
}

fn blob_writer_futures_are_send(w: &mut BlobWriter, a: BlobWriter, b: BlobWriter, c: BlobWriter) {
    send(w.write(b"x"));
    send(w.keep_alive());
    send(a.commit(Default::default()));
    send(b.commit_as("sha256:00", 1, Default::default()));
    send(c.abort());
}

fn watch_futures_are_send(w: &mut Watch) {
    send(w.next());
    send(w.next_timeout(Duration::from_secs(1)));
}

fn world_futures_are_send(
    world: &World,
    session: &Session,
    records: Vec<ExportRecord>,
    ids: Vec<ExportId>,
    filters: &[ExportFilter],
    options: ScheduleOptions,
) {
    send(world.export(records.clone()));
    send(world.sync_exports(records));
    send(world.unexport(ids));
    send(world.collect(filters));
    send(world.map_set("m", "v"));
    send(world.map_delete("m"));
    send(world.schedule_register("s", session, options));
    send(world.schedule_unregister("s"));
    send(world.watch(
        WatchScope::Kv {
            prefix: String::new(),
        },
        None,
    ));
}

/// Every type a public method takes or returns (and the types of their public fields) is named
/// through `fleetdb::…`, as the ones of objects and tags are: an embedding program does not
/// reach into `fleetdb::core`'s modules to write down what `Store::lease_create` or
/// `Store::kv_get` returned.
fn types_are_named_at_the_crate_root(
    _gc: (
        fleetdb::GcKind,
        fleetdb::GcStats,
        fleetdb::Lease,
        fleetdb::Resource,
        fleetdb::BlobInfo,
    ),
    _world: (
        fleetdb::KvEntry,
        fleetdb::Lifetime,
        fleetdb::Deploy,
        fleetdb::DeployDraft,
        fleetdb::DeployFile,
        fleetdb::DeployFileDraft,
        fleetdb::Schedule,
        fleetdb::ScheduleOptions,
        fleetdb::Strategy,
        fleetdb::Registration,
    ),
    _exports: (
        fleetdb::Export,
        fleetdb::ExportId,
        fleetdb::ExportRecord,
        fleetdb::ExportFilter,
        fleetdb::ExportOutcome,
    ),
    _work: (
        fleetdb::WorkExplain,
        fleetdb::Holder,
        fleetdb::SelectorCheck,
        fleetdb::WorkStats,
    ),
    _schema: (fleetdb::MigrationInfo, fleetdb::AppliedMigration),
) {
}

// The bounds the docs of `Session::claim_wait`, `Store::process_resume` and
// `Store::sweep_sessions` link to are exported (they were `pub` in a private module: the docs'
// links led nowhere, and `cargo doc` warned; `lib.rs` now denies such links).
const _: () = {
    assert!(fleetdb::CLAIM_WAIT_POLL.as_millis() < fleetdb::CLAIM_WAIT_RETRY.as_millis());
    assert!(fleetdb::SWEEP_SESSIONS_MAX > 0);
};
