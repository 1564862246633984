//! FleetDB's conformance suite: the behaviour of the user-facing [`Store`] API, specified once.
//!
//! Each backend instantiates the whole suite with [`suite!`], giving a function that makes a
//! fresh, empty database per test (so tests run in parallel and never see each other's rows) and
//! one that cleans it up. A backend that does not pass every case here is not supported.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetdb::{
    ChangeFilter, ChangeOp, Entity, Error, LabelRequirement, Labels, Limits, ManualClock,
    ObjectCursor, ObjectKey, ObjectQuery, PutMode, Revision, Store, Timestamp,
};
use serde_json::json;

pub mod content;
pub mod gc;
mod steady;
pub mod work;
pub mod world;

pub use steady::steady_cycles_leave_no_table_growing;

/// A fresh database for one test: the store, its manual clock, and the URL it was opened with.
pub struct Harness {
    pub store: Store,
    pub clock: ManualClock,
    pub url: String,
    /// Backend-specific cleanup state (e.g. the PostgreSQL schema to drop).
    pub cleanup: String,
}

impl Harness {
    /// Another store on the harness's database, as another process would open it (its own
    /// connections and caches; no background task), on the same clock.
    pub async fn another_process(&self) -> fleetdb::Store {
        fleetdb::Store::open_with(
            &self.url,
            fleetdb::OpenOptions {
                clock: Some(std::sync::Arc::new(self.clock.clone())),
                background: false,
                ..fleetdb::OpenOptions::default()
            },
        )
        .await
        .unwrap()
    }

    /// The number of rows of `table` (one of the store's own), read directly.
    pub async fn count(&self, table: &str) -> i64 {
        let query = format!("SELECT count(*) FROM {table}");
        if let Some(path) = self.url.strip_prefix("sqlite://") {
            let path = path.split('?').next().unwrap_or(path).to_string();
            tokio::task::spawn_blocking(move || {
                let c = rusqlite::Connection::open(path).expect("open the SQLite file");
                c.query_row(&query, [], |r| r.get(0))
                    .unwrap_or_else(|e| panic!("{query}: {e}"))
            })
            .await
            .unwrap()
        } else {
            let (c, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                .await
                .expect("connect to PostgreSQL");
            let conn = tokio::spawn(conn);
            let n: i64 = c
                .query_one(&query, &[])
                .await
                .unwrap_or_else(|e| panic!("{query}: {e}"))
                .get(0);
            drop(c);
            let _ = conn.await;
            n
        }
    }

    /// Run SQL on the harness's database directly, behind the store's back: to set up a state
    /// the API reaches only slowly (a lease at its resource limit). Statements both backends'
    /// SQL understands.
    pub async fn sql(&self, statements: &str) {
        if let Some(path) = self.url.strip_prefix("sqlite://") {
            let path = path.split('?').next().unwrap_or(path).to_string();
            let statements = statements.to_string();
            tokio::task::spawn_blocking(move || {
                let c = rusqlite::Connection::open(path).expect("open the SQLite file");
                c.busy_timeout(Duration::from_secs(30)).unwrap();
                c.execute_batch(&statements)
                    .unwrap_or_else(|e| panic!("{statements}: {e}"));
            })
            .await
            .unwrap();
        } else {
            let (c, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                .await
                .expect("connect to PostgreSQL");
            let conn = tokio::spawn(conn);
            c.batch_execute(statements)
                .await
                .unwrap_or_else(|e| panic!("{statements}: {e}"));
            drop(c);
            let _ = conn.await;
        }
    }
}

/// The time every harness clock starts at: 2026-01-01T00:00:00Z.
pub const START: Timestamp = Timestamp(1_767_225_600_000_000);

/// Expand the whole suite into one `#[tokio::test]` per case.
/// `$make` is an `async fn() -> Harness`; `$drop` an `async fn(Harness)`.
#[macro_export]
macro_rules! suite {
    ($make:path, $drop:path) => {
        $crate::suite!(@cases $make, $drop;
            default_namespace_exists,
            namespace_lifecycle,
            namespace_delete_refuses_non_empty,
            namespace_list_paginates,
            object_put_get_and_labels,
            object_put_modes_and_generated_ids,
            object_needs_existing_namespace,
            object_list_paginates_in_order,
            object_list_orders_by_bytes,
            object_list_label_selectors_match_reference,
            object_delete_deletes_tags,
            tag_set_get_list_delete,
            tag_identical_set_is_noop,
            tag_needs_existing_object,
            tag_value_size_limit_is_configurable,
            a_transaction_over_its_byte_limit_is_refused_whole,
            invalid_input_changes_nothing,
            listing_positions_are_checked_at_the_edge,
            a_negative_position_is_invalid_not_compacted,
            a_cursor_of_another_listing_is_refused,
            json_values_round_trip,
            a_tag_value_nested_too_deep_is_invalid,
            change_log_records_every_mutation,
            change_log_filters,
            compaction_gives_compacted,
            age_based_compaction_keeps_the_change_log_bounded,
            steady_cycles_leave_no_table_growing,
            clock_is_an_input,
            txn_is_atomic,
            txn_reads_its_own_writes,
            txn_retries_on_conflict,
            txn_retries_count_the_attempts_run_again,
            txn_serializes_concurrent_increments,
            txn_read_only_writes_nothing,
            txn_read_only_sees_one_state,
            txn_handle_refuses_use_after_its_attempt,
            concurrent_writers_all_commit;
            session_start_list_close,
            processes_must_be_declared,
            same_process_excludes_other_processes_do_not,
            conflicting_processes_exclude_each_other,
            finish_runs_writes_and_releases_atomically,
            backoff_follows_bmdb_vectors,
            a_stale_token_of_the_same_session_is_refused,
            history_records_every_step,
            history_prune_goes_in_write_order,
            dead_session_work_is_claimable_at_its_deadline,
            sweeper_expires_held_work,
            renewal_failure_shorter_than_ttl_keeps_the_session,
            renewal_failure_past_the_deadline_expires,
            session_writes_check_liveness_in_the_transaction,
            closing_a_session_releases_its_work,
            dropped_work_is_cancelled,
            a_claim_given_up_in_flight_is_cancelled,
            every_claim_started_is_counted_ended_once,
            work_and_backoff_listings_page_through_everything,
            workers_never_claim_one_object_twice,
            claim_wait_wakes_on_a_change,
            claim_wait_wakes_on_another_processs_change,
            claim_wait_with_short_timeouts_sees_a_backoff_end,
            claim_wait_for_ever_is_a_wait,
            bmdb_workflow_selectors,
            selector_sql_agrees_with_reference,
            selector_edge_values_agree_with_the_reference,
            metrics_count_sessions_work_and_transactions,
            finish_many_is_all_or_nothing,
            finish_many_with_writes_is_atomic,
            many_tag_deletes_in_one_transaction,
            object_with_tags_in_one_transaction,
            objects_with_tags_in_bulk,
            tag_sets_in_bulk,
            objects_deleted_in_bulk,
            lone_writes_at_once_answer_as_alone,
            finish_and_claim_finishes_then_claims_the_next,
            finish_many_and_claim_finishes_then_claims_the_next,
            claims_by_label_and_by_tag_take_exactly_the_matches,
            finish_deleting_the_eligible_tag,
            fenced_writes_commit_only_while_the_claim_is_held,
            tracked_selectors_count_their_matches,
            paused_processes_start_no_claims,
            limited_processes_hold_at_most_their_limit,
            objects_failing_too_often_are_parked,
            unparking_clears_every_parked_backoff,
            work_explain_says_why_an_object_is_not_claimed,
            racing_workers_never_pass_a_process_limit,
            work_matches_a_model_under_random_operations,
            work_matches_a_model_seed_2,
            work_matches_a_model_seed_3,
            a_deleted_objects_backoffs_go_with_it,
            operators_naming_an_undeclared_process_are_refused,
            an_expired_claims_history_carries_its_sessions_deadline,
            lapsed_claims_count_as_failures_and_park;
            watch_starts_with_a_snapshot_then_changes,
            watch_resume_loses_and_duplicates_nothing,
            a_first_resume_from_far_back_goes_at_the_consumers_pace,
            watch_from_a_compacted_revision_gives_compacted,
            slow_watcher_is_cut_off_fast_one_keeps_up,
            directed_exports_are_invisible_to_other_hosts,
            a_watch_never_delivers_exports_directed_to_another_host,
            sync_exports_prunes_what_a_host_no_longer_exports,
            session_bound_exports_vanish_when_the_session_expires,
            kv_get_set_cas_delete,
            racing_sets_of_one_key_chain_their_previous_values,
            per_host_maps_are_separate_from_keys,
            deploy_chain_rules_and_trees,
            schedule_follows_registrations_and_session_liveness,
            membership_lists_and_watches_live_sessions,
            removing_an_expired_export_reports_nothing_removed,
            collect_is_ordered_by_record_key,
            pruned_legacy_deploys_take_their_blob_records_along,
            a_watch_from_a_future_revision_is_refused,
            a_sub_millisecond_ttl_is_rounded_up_not_refused,
            a_collect_of_many_pages_is_one_snapshot,
            a_schedule_never_lists_an_expired_host,
            a_refused_deploy_uploads_nothing,
            deploy_files_with_setuid_setgid_or_sticky_bits_are_refused,
            a_schedule_watch_snapshot_never_lists_an_expired_host,
            unregistering_a_lapsed_registration_is_not_found,
            a_first_deploy_with_a_parent_hash_is_refused,
            an_exactly_full_last_page_has_no_next_cursor,
            a_sweep_at_its_limit_says_more_is_due;
            gc_keeps_roots_and_what_they_reference,
            malformed_reference_labels_are_rejected,
            a_blob_cannot_reference_an_object,
            leases_hold_objects_flat_or_deep,
            a_lease_holds_at_most_lease_resources_max,
            a_lease_holds_what_is_written_under_a_key_it_held_before,
            an_expired_lease_triggers_collection_by_itself,
            objects_created_or_referenced_during_a_collection_survive_it,
            external_collectors_remove_unused_resources_and_failures_skip,
            external_resources_leased_or_referenced_during_a_collection_survive_it,
            gc_reports_stats_and_metrics,
            threshold_runs_respect_the_time_budget_requests_do_not,
            a_blob_held_only_by_an_expired_lease_goes_at_the_expiry,
            a_blob_committed_again_during_a_collection_survives_it,
            a_kind_declared_not_collectable_during_a_collection_keeps_what_it_references,
            a_reference_written_during_a_collection_survives_a_compaction,
            a_lease_written_since_the_last_mark_triggers_a_run_at_its_expiry,
            a_lease_written_by_another_process_triggers_a_run_at_its_expiry,
            an_expiry_written_by_another_process_before_any_collection_is_seen,
            a_blob_with_gc_expire_triggers_a_run_at_its_expiry,
            a_blob_expiry_written_by_another_process_triggers_a_run,
            unreferenced_blob_commits_count_toward_the_mutation_threshold,
            a_lease_deleted_by_another_process_triggers_a_run,
            a_resource_removed_from_a_lease_triggers_a_run,
            exports_hold_objects_and_blobs_while_they_live;
            blob_put_get_ranges_info_list_delete,
            blob_digest_or_size_mismatch_commits_nothing,
            ingest_resumes_where_it_stands_and_refuses_other_offsets,
            expired_ingests_are_swept,
            a_blob_put_given_up_midway_is_reclaimed_soon,
            an_upload_expires_only_when_untouched,
            same_content_twice_is_one_blob,
            blob_committed_under_a_lease_is_held_by_it,
            orphaned_bytes_are_removed_after_a_crash,
            commits_racing_byte_removal_never_lose_bytes,
            a_whole_blob_read_is_bounded_by_the_read_limit,
        );
    };
    (@cases $make:path, $drop:path; $($case:ident),* ; $($work:ident),* ; $($world:ident),* ; $($gc:ident),* ; $($content:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let h = $make().await;
                $crate::$case(&h).await;
                $drop(h).await;
            }
        )*
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $work() {
                let h = $make().await;
                $crate::work::$work(&h).await;
                $drop(h).await;
            }
        )*
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $world() {
                let h = $make().await;
                $crate::world::$world(&h).await;
                $drop(h).await;
            }
        )*
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $gc() {
                let h = $make().await;
                $crate::gc::$gc(&h).await;
                $drop(h).await;
            }
        )*
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $content() {
                let h = $make().await;
                $crate::content::$content(&h).await;
                $drop(h).await;
            }
        )*
    };
}

pub(crate) fn key(ns: &str, kind: &str, id: &str) -> ObjectKey {
    ObjectKey::new(ns, kind, id).expect("valid key")
}

pub(crate) fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn rev(h: &Harness) -> Revision {
    h.store.revision().await.expect("revision").current
}

async fn all_changes(h: &Harness) -> Vec<fleetdb::Change> {
    h.store
        .changes(Revision(0), &ChangeFilter::default(), 10_000)
        .await
        .expect("changes")
}

pub async fn default_namespace_exists(h: &Harness) {
    let ns = h
        .store
        .namespace_get("default")
        .await
        .unwrap()
        .expect("default exists");
    assert_eq!(ns.name, "default");
    let err = h.store.namespace_delete("default").await.unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    assert!(h.store.namespace_get("default").await.unwrap().is_some());
}

pub async fn namespace_lifecycle(h: &Harness) {
    let s = &h.store;
    let ns = s
        .namespace_create("team-a", labels(&[("owner", "infra")]))
        .await
        .unwrap();
    assert_eq!(ns.labels, labels(&[("owner", "infra")]));
    assert_eq!(ns.created_at, START);
    let err = s
        .namespace_create("team-a", Labels::new())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");

    h.clock.advance(Duration::from_secs(5));
    let w = s
        .namespace_set_labels("team-a", labels(&[("owner", ""), ("tier", "1")]))
        .await
        .unwrap();
    assert!(w.changed);
    assert_eq!(w.item.labels, labels(&[("tier", "1")]));
    assert_eq!(w.item.updated_at, START + Duration::from_secs(5));
    assert!(w.item.revision > ns.revision);
    let same = s
        .namespace_set_labels("team-a", labels(&[("tier", "1")]))
        .await
        .unwrap();
    assert!(!same.changed);
    assert_eq!(same.item.revision, w.item.revision);

    s.namespace_delete("team-a").await.unwrap();
    assert!(s.namespace_get("team-a").await.unwrap().is_none());
    let err = s.namespace_delete("team-a").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let err = s
        .namespace_create("bad name", Labels::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("namespace") && err.to_string().contains("bad name"),
        "{err}"
    );
}

pub async fn namespace_delete_refuses_non_empty(h: &Harness) {
    let s = &h.store;
    s.namespace_create("lab", Labels::new()).await.unwrap();
    for i in 0..3 {
        s.object_put(&key("lab", "machine", &format!("m{i}")), Labels::new())
            .await
            .unwrap();
    }
    s.object_put(&key("lab", "switch", "s1"), Labels::new())
        .await
        .unwrap();
    let before = rev(h).await;
    let err = s.namespace_delete("lab").await.unwrap_err();
    match &err {
        Error::NamespaceNotEmpty {
            namespace,
            remaining,
        } => {
            assert_eq!(namespace, "lab");
            assert_eq!(remaining, "4 object(s): 3 machine, 1 switch");
        }
        other => panic!("expected NamespaceNotEmpty, got {other}"),
    }
    assert_eq!(rev(h).await, before, "a refused delete writes nothing");
    for i in 0..3 {
        s.object_delete(&key("lab", "machine", &format!("m{i}")))
            .await
            .unwrap();
    }
    s.object_delete(&key("lab", "switch", "s1")).await.unwrap();
    s.namespace_delete("lab").await.unwrap();
}

pub async fn namespace_list_paginates(h: &Harness) {
    let s = &h.store;
    for i in 0..7 {
        s.namespace_create(&format!("ns{i}"), Labels::new())
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = s.namespace_list(cursor.as_deref(), 3).await.unwrap();
        assert!(page.items.len() <= 3);
        seen.extend(page.items.into_iter().map(|n| n.name));
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    let mut expected: Vec<String> = (0..7).map(|i| format!("ns{i}")).collect();
    expected.push("default".into());
    expected.sort();
    assert_eq!(seen, expected);
    assert!(s.namespace_list(None, 0).await.is_err());
}

pub async fn object_put_get_and_labels(h: &Harness) {
    let s = &h.store;
    let m1 = key("default", "machine", "m1");
    assert!(s.object_get(&m1).await.unwrap().is_none());
    let w = s
        .object_put(&m1, labels(&[("provider", "equinix"), ("rack", "r1")]))
        .await
        .unwrap();
    assert!(w.changed);
    assert_eq!(w.item.created_at, START);
    assert_eq!(w.item.updated_at, START);
    let got = s.object_get(&m1).await.unwrap().unwrap();
    assert_eq!(got, w.item);

    h.clock.advance(Duration::from_secs(60));
    let w2 = s
        .object_put(&m1, labels(&[("rack", ""), ("zone", "z1")]))
        .await
        .unwrap();
    assert!(w2.changed);
    assert_eq!(
        w2.item.labels,
        labels(&[("provider", "equinix"), ("zone", "z1")])
    );
    assert_eq!(w2.item.created_at, START);
    assert_eq!(w2.item.updated_at, START + Duration::from_secs(60));
    assert!(w2.item.revision > w.item.revision);

    let w3 = s.object_put(&m1, labels(&[("zone", "z1")])).await.unwrap();
    assert!(!w3.changed, "identical labels are a no-op");
    assert_eq!(w3.item.revision, w2.item.revision);
    // Deleting a label that is not there changes nothing either.
    let w4 = s.object_put(&m1, labels(&[("nope", "")])).await.unwrap();
    assert!(!w4.changed);
    assert_eq!(s.object_get(&m1).await.unwrap().unwrap(), w2.item);
}

pub async fn object_put_modes_and_generated_ids(h: &Harness) {
    let s = &h.store;
    let m = key("default", "machine", "m1");
    let err = s
        .object_put_mode(&m, Labels::new(), PutMode::Update)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    s.object_put_mode(&m, Labels::new(), PutMode::Create)
        .await
        .unwrap();
    let err = s
        .object_put_mode(&m, Labels::new(), PutMode::Create)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    s.object_put_mode(&m, labels(&[("a", "b")]), PutMode::Update)
        .await
        .unwrap();

    let a = s
        .object_create("default", "blob", labels(&[("x", "1")]))
        .await
        .unwrap();
    let b = s
        .object_create("default", "blob", Labels::new())
        .await
        .unwrap();
    assert_ne!(a.key.id, b.key.id);
    assert_eq!(a.key.id.len(), 36, "a UUID: {}", a.key.id);
    assert_eq!(
        s.object_get(&a.key).await.unwrap().unwrap().labels,
        labels(&[("x", "1")])
    );
}

pub async fn object_needs_existing_namespace(h: &Harness) {
    let before = rev(h).await;
    let err = h
        .store
        .object_put(&key("nowhere", "machine", "m1"), Labels::new())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        Error::NotFound {
            what: "namespace \"nowhere\"".into()
        }
    );
    assert_eq!(rev(h).await, before);
}

pub async fn object_list_paginates_in_order(h: &Harness) {
    let s = &h.store;
    for i in 0..12 {
        s.object_put(
            &key("default", "machine", &format!("m{i:02}")),
            Labels::new(),
        )
        .await
        .unwrap();
    }
    for i in 0..5 {
        s.object_put(&key("default", "switch", &format!("s{i}")), Labels::new())
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut q = ObjectQuery::new("default").limit(5);
    loop {
        let page = s.object_list(&q).await.unwrap();
        assert!(page.items.len() <= 5);
        seen.extend(
            page.items
                .iter()
                .map(|o| format!("{}/{}", o.key.kind, o.key.id)),
        );
        match page.next {
            Some(c) => q.after = Some(ObjectCursor::decode(&c).unwrap()),
            None => break,
        }
    }
    let mut expected: Vec<String> = (0..12).map(|i| format!("machine/m{i:02}")).collect();
    expected.extend((0..5).map(|i| format!("switch/s{i}")));
    assert_eq!(seen, expected);

    let switches = s
        .object_list(&ObjectQuery::new("default").kind("switch"))
        .await
        .unwrap();
    assert_eq!(switches.items.len(), 5);
    assert!(switches.next.is_none());
    assert!(s
        .object_list(&ObjectQuery::new("default").limit(0))
        .await
        .is_err());
    assert!(s
        .object_list(&ObjectQuery::new("default").limit(1001))
        .await
        .is_err());
    assert!(ObjectCursor::decode("garbage!").is_err());
}

/// Every backend orders ids byte-wise (PostgreSQL's default collation would not: it ignores case
/// and punctuation at first), so pages and cursors agree everywhere.
pub async fn object_list_orders_by_bytes(h: &Harness) {
    let ids = [
        "b", "B", "a_b", "a-b", "a.b", "a", "A", "Z9", "z", "0", "10", "9",
    ];
    for id in ids {
        h.store
            .object_put(&key("default", "machine", id), Labels::new())
            .await
            .unwrap();
    }
    let got: Vec<String> = h
        .store
        .object_list(&ObjectQuery::new("default").kind("machine"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|o| o.key.id)
        .collect();
    let mut expected: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(got, expected);
}

pub async fn object_list_label_selectors_match_reference(h: &Harness) {
    let s = &h.store;
    let sets: Vec<Labels> = vec![
        labels(&[("provider", "equinix"), ("rack", "r1")]),
        labels(&[("provider", "equinix")]),
        labels(&[("provider", "ovh"), ("rack", "r2")]),
        labels(&[("rack", "r1"), ("a.b/c-d", "x")]),
        Labels::new(),
    ];
    for (i, l) in sets.iter().enumerate() {
        s.object_put(&key("default", "machine", &format!("m{i}")), l.clone())
            .await
            .unwrap();
    }
    let selectors = [
        "provider=equinix",
        "provider!=equinix",
        "rack",
        "!rack",
        "provider=equinix,rack=r1",
        "provider,!rack",
        "a.b/c-d=x",
        "provider!=ovh,rack",
    ];
    for sel in selectors {
        let reqs: Vec<LabelRequirement> = fleetdb::parse_label_selector(sel).unwrap();
        let mut q = ObjectQuery::new("default").kind("machine");
        q.labels = reqs.clone();
        let got: Vec<String> = s
            .object_list(&q)
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|o| o.key.id)
            .collect();
        let expected: Vec<String> = sets
            .iter()
            .enumerate()
            .filter(|(_, l)| reqs.iter().all(|r| r.matches(l)))
            .map(|(i, _)| format!("m{i}"))
            .collect();
        assert_eq!(got, expected, "selector {sel}");
    }
}

pub async fn object_delete_deletes_tags(h: &Harness) {
    let s = &h.store;
    let m = key("default", "machine", "m1");
    s.object_put(&m, Labels::new()).await.unwrap();
    s.tag_set(&m, "provided", &json!({"provider_id": "x1"}))
        .await
        .unwrap();
    s.tag_set(&m, "agent_started", &json!(true)).await.unwrap();
    let r = s.object_delete(&m).await.unwrap();
    assert!(s.object_get(&m).await.unwrap().is_none());
    assert!(s.tag_get(&m, "provided").await.unwrap().is_none());
    // Re-creating the object does not resurrect the old tags.
    s.object_put(&m, Labels::new()).await.unwrap();
    assert!(s.tag_list(&m).await.unwrap().is_empty());
    let changes = all_changes(h).await;
    let deletes: Vec<(Entity, String)> = changes
        .iter()
        .filter(|c| c.op == ChangeOp::Delete)
        .map(|c| (c.entity, c.name.clone()))
        .collect();
    assert_eq!(
        deletes,
        vec![
            (Entity::Tag, "agent_started".to_string()),
            (Entity::Tag, "provided".to_string()),
            (Entity::Object, String::new())
        ]
    );
    assert_eq!(
        changes.iter().find(|c| c.revision == r).unwrap().entity,
        Entity::Object
    );
    let err = s
        .object_delete(&key("default", "machine", "ghost"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

pub async fn tag_set_get_list_delete(h: &Harness) {
    let s = &h.store;
    let m = key("default", "machine", "m1");
    s.object_put(&m, Labels::new()).await.unwrap();
    let t = s
        .tag_set(&m, "provided", &json!({"provider_id": "x1"}))
        .await
        .unwrap();
    assert!(t.changed);
    assert_eq!(t.item.updated_at, START);
    h.clock.advance(Duration::from_secs(1));
    let t2 = s
        .tag_set(&m, "provided", &json!({"provider_id": "x2"}))
        .await
        .unwrap();
    assert!(t2.item.revision > t.item.revision);
    assert_eq!(t2.item.updated_at, START + Duration::from_secs(1));
    s.tag_set(&m, "agent_heartbeat", &json!({"at": 5}))
        .await
        .unwrap();
    let got = s.tag_get(&m, "provided").await.unwrap().unwrap();
    assert_eq!(got, t2.item);
    let names: Vec<String> = s
        .tag_list(&m)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["agent_heartbeat", "provided"]);
    s.tag_delete(&m, "provided").await.unwrap();
    assert!(s.tag_get(&m, "provided").await.unwrap().is_none());
    let err = s.tag_delete(&m, "provided").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let err = s
        .tag_list(&key("default", "machine", "ghost"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

pub async fn tag_identical_set_is_noop(h: &Harness) {
    let s = &h.store;
    let m = key("default", "machine", "m1");
    s.object_put(&m, Labels::new()).await.unwrap();
    let t = s
        .tag_set(&m, "provided", &json!({"b": 1, "a": [1, 2]}))
        .await
        .unwrap();
    let before = rev(h).await;
    let n_changes = all_changes(h).await.len();
    h.clock.advance(Duration::from_secs(10));
    // Same JSON, other key order: still identical.
    let again: serde_json::Value = serde_json::from_str(r#"{ "a": [1,2], "b": 1 }"#).unwrap();
    let t2 = s.tag_set(&m, "provided", &again).await.unwrap();
    assert!(!t2.changed);
    assert_eq!(t2.item.revision, t.item.revision);
    assert_eq!(t2.item.updated_at, t.item.updated_at);
    assert_eq!(rev(h).await, before);
    assert_eq!(all_changes(h).await.len(), n_changes);
}

pub async fn tag_needs_existing_object(h: &Harness) {
    let before = rev(h).await;
    let err = h
        .store
        .tag_set(&key("default", "machine", "ghost"), "provided", &json!(1))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        Error::NotFound {
            what: "object default/machine/ghost".into()
        }
    );
    assert_eq!(rev(h).await, before);
}

/// A store on the harness's backend with `limits`, and object `default/machine/m1` in it.
async fn limited_store_and_m1(h: &Harness, limits: Limits) -> (Store, ObjectKey) {
    let small = Store::from_backend(h.store.backend().clone(), Arc::new(h.clock.clone()), limits)
        .await
        .unwrap();
    let m = key("default", "machine", "m1");
    small.object_put(&m, Labels::new()).await.unwrap();
    (small, m)
}

pub async fn tag_value_size_limit_is_configurable(h: &Harness) {
    let (small, m) = limited_store_and_m1(
        h,
        Limits {
            tag_value_bytes_max: 64,
            ..Limits::default()
        },
    )
    .await;
    let before = rev(h).await;
    let err = small
        .tag_set(&m, "big", &json!("x".repeat(100)))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        Error::TooLarge {
            field: "tag \"big\" value".into(),
            size: 102,
            max: 64
        }
    );
    assert_eq!(rev(h).await, before);
    // The default limit is 1 MiB.
    let err = h
        .store
        .tag_set(&m, "big", &json!("x".repeat(1 << 20)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { max: 1048576, .. }), "{err}");
    h.store
        .tag_set(&m, "big", &json!("x".repeat(100)))
        .await
        .unwrap();
}

/// The writes of one transaction together are bounded (`Limits::txn_bytes_max`), each write
/// being within its own bound: the push that crosses the limit fails `TooLarge`, and nothing of
/// the transaction is written; one export call of many records is bounded the same way.
pub async fn a_transaction_over_its_byte_limit_is_refused_whole(h: &Harness) {
    let (small, m) = limited_store_and_m1(
        h,
        Limits {
            txn_bytes_max: 1000,
            ..Limits::default()
        },
    )
    .await;
    let before = rev(h).await;
    let value = json!("x".repeat(298)); // 300 bytes of JSON text
    let err = small
        .txn(|tx| {
            let (m, value) = (m.clone(), value.clone());
            async move {
                for name in ["a", "b", "c", "d"] {
                    tx.tag_set(&m, name, &value)?;
                }
                Ok(())
            }
        })
        .await
        .unwrap_err();
    assert_eq!(
        err,
        Error::TooLarge {
            field: "transaction (the content of its writes together)".into(),
            size: 1200,
            max: 1000
        }
    );
    assert_eq!(
        rev(h).await,
        before,
        "nothing of the transaction is written"
    );
    assert!(small.tag_list(&m).await.unwrap().is_empty());
    // Within the limit, the same writes commit.
    small
        .txn(|tx| {
            let (m, value) = (m.clone(), value.clone());
            async move {
                for name in ["a", "b", "c"] {
                    tx.tag_set(&m, name, &value)?;
                }
                Ok(())
            }
        })
        .await
        .unwrap();
    assert_eq!(small.tag_list(&m).await.unwrap().len(), 3);
    // One export call: each record within its own bound, the call over the transaction's.
    let before = rev(h).await;
    let records: Vec<fleetdb::core::world::ExportRecord> = (0..4)
        .map(|i| fleetdb::core::world::ExportRecord {
            id: fleetdb::core::world::ExportId::new("file", format!("f{i}"), "h2"),
            data: vec![b'x'; 300],
            lifetime: fleetdb::core::world::Lifetime::persistent(),
            holds: vec![],
        })
        .collect();
    let err = small
        .world("h1")
        .unwrap()
        .export(records)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                size: 1200,
                max: 1000,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(rev(h).await, before);
    // The default is 64 MiB.
    assert_eq!(Limits::default().txn_bytes_max, 64 << 20);
}

pub async fn invalid_input_changes_nothing(h: &Harness) {
    let s = &h.store;
    let m = key("default", "machine", "m1");
    s.object_put(&m, Labels::new()).await.unwrap();
    let before = rev(h).await;
    let cases: Vec<(Error, &str)> = vec![
        (
            s.object_put(
                &ObjectKey {
                    namespace: "default".into(),
                    kind: "machine".into(),
                    id: "bad id".into(),
                },
                Labels::new(),
            )
            .await
            .unwrap_err(),
            "invalid id \"bad id\"",
        ),
        (
            s.object_put(&m, labels(&[("k", &"v".repeat(5000))]))
                .await
                .unwrap_err(),
            "label \"k\" (key + value) is 5001 bytes; the maximum is 4096",
        ),
        (
            s.object_put(&m, labels(&[("fleetdb.io/owner", "x")]))
                .await
                .unwrap_err(),
            "reserved for the system",
        ),
        (
            s.tag_set(&m, "-bad", &json!(1)).await.unwrap_err(),
            "invalid tag \"-bad\"",
        ),
        (
            s.object_put(
                &ObjectKey {
                    namespace: "default".into(),
                    kind: "k".repeat(77),
                    id: "x".into(),
                },
                Labels::new(),
            )
            .await
            .unwrap_err(),
            "is 77 bytes; the maximum is 76",
        ),
        (
            s.namespace_create("", Labels::new()).await.unwrap_err(),
            "must not be empty",
        ),
    ];
    for (err, needle) in cases {
        assert!(
            err.to_string().contains(needle),
            "{err} should contain {needle}"
        );
    }
    assert_eq!(rev(h).await, before, "bad input wrote something");
    assert_eq!(
        s.object_get(&m).await.unwrap().unwrap().labels,
        Labels::new()
    );
}

/// A change-log position below 0 is no position at all: `changes` and `watch` refuse it as
/// `Invalid` (they answered `Compacted`, "revision -1 has been compacted", sending a consumer
/// to start over from a snapshot instead of saying its input was wrong).
pub async fn a_negative_position_is_invalid_not_compacted(h: &Harness) {
    let s = &h.store;
    s.object_put(&key("default", "machine", "m1"), Labels::new())
        .await
        .unwrap();
    for r in [-1, i64::MIN] {
        match s.changes(Revision(r), &ChangeFilter::default(), 10).await {
            Err(Error::Invalid { .. }) => {}
            other => panic!("changes after {r}: {other:?}, expected Invalid"),
        }
        let req = fleetdb::WatchRequest::new(fleetdb::WatchScope::All).from_revision(Revision(r));
        match s.watch(req).await {
            Err(Error::Invalid { .. }) => {}
            Err(e) => panic!("watch from {r}: {e:?}, expected Invalid"),
            Ok(_) => panic!("watch from {r}: Ok, expected Invalid"),
        }
        // A compaction point before the log's start compacts nothing: refused, not "0 dropped".
        match s.compact(Revision(r)).await {
            Err(Error::Invalid { .. }) => {}
            other => panic!("compact before {r}: {other:?}, expected Invalid"),
        }
    }
    // 0 is the start of the log.
    assert_eq!(
        s.changes(Revision(0), &ChangeFilter::default(), 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A cursor is a position in one listing: given to a listing of another kind (objects) or
/// process (claims, backoffs), it was taken as a position there and answered a page silently
/// (the kind's first page again, or nothing). It is refused as `Invalid`.
pub async fn a_cursor_of_another_listing_is_refused(h: &Harness) {
    let s = &h.store;
    for (kind, id) in [
        ("machine", "m1"),
        ("machine", "m2"),
        ("switch", "s1"),
        ("switch", "s2"),
    ] {
        s.object_put(&key("default", kind, id), Labels::new())
            .await
            .unwrap();
    }
    let mut q = ObjectQuery::new("default");
    q.kind = Some("switch".into());
    q.limit = 1;
    let next = s.object_list(&q).await.unwrap().next.unwrap();
    q.after = Some(ObjectCursor::decode(&next).unwrap());
    assert_eq!(s.object_list(&q).await.unwrap().items[0].key.id, "s2");
    q.kind = Some("machine".into());
    match s.object_list(&q).await {
        Err(Error::Invalid { .. }) => {}
        other => panic!("a switch listing's cursor in a machine listing: {other:?}"),
    }
    // Without a kind filter every (kind, id) is a position of the listing.
    q.kind = None;
    s.object_list(&q).await.unwrap();

    // Declared: a listing by an undeclared process is refused for that alone.
    for p in ["Mine", "Other"] {
        s.process_define(p, &[]).await.unwrap();
    }
    let c = fleetdb::WorkCursor::after("Other", &key("default", "machine", "m1")).encode();
    match s.work_page(Some("Mine"), None, Some(&c), 10).await {
        Err(Error::Invalid { .. }) => {}
        other => panic!("another process's claim cursor: {other:?}"),
    }
    match s
        .backoff_page(Some("Mine"), fleetdb::BackoffWhich::All, Some(&c), 10)
        .await
    {
        Err(Error::Invalid { .. }) => {}
        other => panic!("another process's backoff cursor: {other:?}"),
    }
    s.work_page(Some("Other"), None, Some(&c), 10)
        .await
        .unwrap();
    s.work_page(None, None, Some(&c), 10).await.unwrap();
    s.backoff_page(Some("Other"), fleetdb::BackoffWhich::All, Some(&c), 10)
        .await
        .unwrap();
}

/// A listing's `after` position that no listing of it could have returned (a NUL, which
/// PostgreSQL's text refuses) is refused up front as `Invalid` on every backend, not sent to the
/// database (where PostgreSQL failed it as a backend error and SQLite answered a page).
pub async fn listing_positions_are_checked_at_the_edge(h: &Harness) {
    let s = &h.store;
    let bad = "a\0b";
    let refused = |what: &str, r: Result<(), Error>| match r {
        Err(Error::Invalid { .. }) => {}
        other => panic!("{what} after {bad:?}: {other:?}, expected Invalid"),
    };
    refused("kv_list", s.kv_list("", Some(bad), 10).await.map(drop));
    refused(
        "lease_list",
        s.lease_list("", Some(bad), 10).await.map(drop),
    );
    refused(
        "session_list",
        s.session_list(Some(bad), 10).await.map(drop),
    );
    // An object listing's cursor is a struct with public fields: built by hand, it is checked
    // as its decoding checks it.
    let mut q = ObjectQuery::new("default");
    q.after = Some(ObjectCursor {
        kind: bad.into(),
        id: "x".into(),
    });
    refused("object_list", s.object_list(&q).await.map(drop));
    q.after = Some(ObjectCursor {
        kind: "machine".into(),
        id: bad.into(),
    });
    refused("object_list", s.object_list(&q).await.map(drop));
    // Positions a listing returns are still taken.
    s.kv_set("a/1", "x").await.unwrap();
    s.kv_set("a/2", "y").await.unwrap();
    let page = s.kv_list("a/", Some("a/1"), 10).await.unwrap();
    assert_eq!(
        page.items
            .iter()
            .map(|e| e.key.as_str())
            .collect::<Vec<_>>(),
        ["a/2"]
    );
    s.lease_list("", Some("l1"), 10).await.unwrap();
    q.after = Some(ObjectCursor {
        kind: "machine".into(),
        id: "m0".into(),
    });
    s.object_list(&q).await.unwrap();
    s.session_list(Some("00000000-0000-0000-0000-000000000000"), 10)
        .await
        .unwrap();
}

/// A tag value nested deeper than JSON text can be read back (`JSON_DEPTH_MAX`, 127 arrays or
/// objects) is `Invalid`, however deep: before, a value a caller built (or parsed without
/// serde_json's recursion limit) nested a few thousand levels deep was serialized recursively
/// and overflowed the stack: `tag_set` aborted the whole process.
pub async fn a_tag_value_nested_too_deep_is_invalid(h: &Harness) {
    let s = &h.store;
    let m1 = key("default", "machine", "m1");
    s.object_put(&m1, Labels::new()).await.unwrap();
    let nest = |depth: usize| {
        let mut v = json!(1);
        for _ in 0..depth {
            v = serde_json::Value::Array(vec![v]);
        }
        v
    };
    // Taken apart level by level: dropping it whole would recurse as deep as it nests.
    fn take_apart(mut v: serde_json::Value) {
        while let serde_json::Value::Array(mut a) = v {
            v = a.pop().unwrap_or_default();
        }
    }
    let deepest = nest(fleetdb::core::validate::JSON_DEPTH_MAX);
    s.tag_set(&m1, "deepest", &deepest).await.unwrap();
    assert_eq!(
        s.tag_get(&m1, "deepest").await.unwrap().unwrap().value,
        deepest
    );
    take_apart(deepest);
    for depth in [fleetdb::core::validate::JSON_DEPTH_MAX + 1, 1_000_000] {
        let v = nest(depth);
        let r = s.tag_set(&m1, "deep", &v).await;
        assert!(
            matches!(&r, Err(Error::Invalid { rule, .. }) if rule.contains("nest")),
            "depth {depth}: {r:?}"
        );
        let r = s
            .txn(|tx| {
                let (m1, v) = (m1.clone(), nest(depth));
                async move {
                    let r = tx.tag_set(&m1, "deep", &v);
                    take_apart(v);
                    r
                }
            })
            .await;
        assert!(
            matches!(r, Err(Error::Invalid { .. })),
            "depth {depth}: {r:?}"
        );
        take_apart(v);
    }
    let names: Vec<String> = s
        .tag_list(&m1)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["deepest"]);
}

pub async fn json_values_round_trip(h: &Harness) {
    let s = &h.store;
    let m = key("default", "machine", "m1");
    s.object_put(
        &m,
        labels(&[("note", "ünïcode ✓ \"quoted\" 'single' \\ back")]),
    )
    .await
    .unwrap();
    let values = [
        json!(null),
        json!(true),
        json!(-17),
        json!(1.5),
        json!(u64::MAX),
        json!("text with \\u0000 escaped and ✓"),
        json!([1, "two", {"three": [3]}]),
        json!({"nested": {"deep": {"list": [null, false, 0.25]}}, "emoji": "🚀"}),
    ];
    for (i, v) in values.iter().enumerate() {
        let name = format!("t{i}");
        s.tag_set(&m, &name, v).await.unwrap();
        assert_eq!(
            &s.tag_get(&m, &name).await.unwrap().unwrap().value,
            v,
            "tag {name}"
        );
    }
    // NUL cannot be stored (PostgreSQL's jsonb refuses it): a clear error, nothing written.
    let err = s
        .tag_set(&m, "nul", &json!({"a": ["x\u{0000}y"]}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("must not contain NUL"), "{err}");
    assert!(s.tag_get(&m, "nul").await.unwrap().is_none());
    assert_eq!(
        s.object_get(&m).await.unwrap().unwrap().labels["note"],
        "ünïcode ✓ \"quoted\" 'single' \\ back"
    );
}

pub async fn change_log_records_every_mutation(h: &Harness) {
    let s = &h.store;
    let start = rev(h).await;
    let m = key("default", "machine", "m1");
    s.object_put(&m, labels(&[("a", "1")])).await.unwrap();
    s.tag_set(&m, "provided", &json!({"id": 1})).await.unwrap();
    s.tag_set(&m, "provided", &json!({"id": 2})).await.unwrap();
    s.tag_delete(&m, "provided").await.unwrap();
    s.namespace_create("other", Labels::new()).await.unwrap();
    let changes = s
        .changes(start, &ChangeFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(changes.len(), 5);
    for w in changes.windows(2) {
        assert!(w[1].revision > w[0].revision, "strictly increasing");
    }
    assert_eq!(changes.last().unwrap().revision, rev(h).await);
    let c = &changes[0];
    assert_eq!(
        (c.entity, c.op, c.kind.as_str(), c.id.as_str()),
        (Entity::Object, ChangeOp::Put, "machine", "m1")
    );
    assert_eq!(c.old_value, None);
    assert_eq!(c.new_value, Some(json!({"labels": {"a": "1"}})));
    let c = &changes[2];
    assert_eq!((c.entity, c.name.as_str()), (Entity::Tag, "provided"));
    assert_eq!(c.old_value, Some(json!({"id": 1})));
    assert_eq!(c.new_value, Some(json!({"id": 2})));
    assert_eq!(c.at, START);
    let c = &changes[3];
    assert_eq!(
        (c.op, c.old_value.clone(), c.new_value.clone()),
        (ChangeOp::Delete, Some(json!({"id": 2})), None)
    );
    let c = &changes[4];
    assert_eq!(
        (c.entity, c.namespace.as_str(), c.kind.as_str()),
        (Entity::Namespace, "other", "")
    );
    // Object revision = revision of its own last change; tag revision likewise.
    assert_eq!(
        s.object_get(&m).await.unwrap().unwrap().revision,
        changes[0].revision
    );
    // Reading from the middle gives exactly the rest.
    let rest = s
        .changes(changes[1].revision, &ChangeFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(rest, changes[2..].to_vec());
    let limited = s.changes(start, &ChangeFilter::default(), 2).await.unwrap();
    assert_eq!(limited, changes[..2].to_vec());
}

pub async fn change_log_filters(h: &Harness) {
    let s = &h.store;
    s.namespace_create("lab", Labels::new()).await.unwrap();
    for (ns, kind, id) in [
        ("default", "machine", "rack1-m1"),
        ("default", "machine", "rack1-m2"),
        ("default", "machine", "rack2-m1"),
        ("default", "switch", "rack1-s1"),
        ("lab", "machine", "rack1-m1"),
    ] {
        s.object_put(&key(ns, kind, id), Labels::new())
            .await
            .unwrap();
    }
    let ids = |cs: Vec<fleetdb::Change>| {
        cs.into_iter()
            .map(|c| format!("{}/{}/{}", c.namespace, c.kind, c.id))
            .collect::<Vec<_>>()
    };
    let f = ChangeFilter {
        namespace: Some("lab".into()),
        ..Default::default()
    };
    assert_eq!(
        ids(s.changes(Revision(0), &f, 100).await.unwrap()),
        vec!["lab//", "lab/machine/rack1-m1"]
    );
    let f = ChangeFilter {
        namespace: Some("default".into()),
        kind: Some("machine".into()),
        ..Default::default()
    };
    assert_eq!(
        ids(s.changes(Revision(0), &f, 100).await.unwrap()),
        vec![
            "default/machine/rack1-m1",
            "default/machine/rack1-m2",
            "default/machine/rack2-m1"
        ]
    );
    let f = ChangeFilter {
        namespace: Some("default".into()),
        kind: Some("machine".into()),
        id_prefix: Some("rack1-".into()),
    };
    assert_eq!(
        ids(s.changes(Revision(0), &f, 100).await.unwrap()),
        vec!["default/machine/rack1-m1", "default/machine/rack1-m2"]
    );
    let bad = ChangeFilter {
        kind: Some("machine".into()),
        ..Default::default()
    };
    assert!(s.changes(Revision(0), &bad, 10).await.is_err());
    assert!(s
        .changes(Revision(0), &ChangeFilter::default(), 0)
        .await
        .is_err());
}

pub async fn compaction_gives_compacted(h: &Harness) {
    let s = &h.store;
    let m = key("default", "machine", "m1");
    s.object_put(&m, Labels::new()).await.unwrap();
    for i in 0..10 {
        s.tag_set(&m, "counter", &json!(i)).await.unwrap();
    }
    let all = all_changes(h).await;
    assert_eq!(all.len(), 11);
    // Nothing is before revision 0 or 1 (a negative one is refused:
    // `a_negative_position_is_invalid_not_compacted`).
    for nothing in [Revision(0), Revision(1)] {
        assert_eq!(s.compact(nothing).await.unwrap(), 0, "{nothing:?}");
    }
    assert_eq!(all_changes(h).await.len(), 11);
    let cut = all[5].revision;
    let dropped = s.compact(cut).await.unwrap();
    assert_eq!(dropped, 5);
    let info = s.revision().await.unwrap();
    assert_eq!(info.compacted, all[4].revision);
    assert_eq!(info.current, all[10].revision);
    let err = s
        .changes(Revision(0), &ChangeFilter::default(), 100)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        Error::Compacted {
            requested: Revision(0),
            compacted_revision: all[4].revision
        }
    );
    let rest = s
        .changes(all[4].revision, &ChangeFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(rest, all[5..].to_vec());
    // Compacting everything keeps the current revision, and new writes continue above it.
    s.compact(Revision(info.current.0 + 1000)).await.unwrap();
    let info2 = s.revision().await.unwrap();
    assert_eq!(info2.current, info.current);
    assert_eq!(info2.compacted, info.current);
    let t = s.tag_set(&m, "counter", &json!(99)).await.unwrap();
    assert!(t.item.revision > info.current);
    assert_eq!(
        s.changes(info2.compacted, &ChangeFilter::default(), 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A deployment's change log does not grow with its age: a steady workload (six entries an hour)
/// compacted by age after every hour keeps the entries of the retention window and nothing older,
/// whatever the number of hours; positions before the window are `Compacted`.
pub async fn age_based_compaction_keeps_the_change_log_bounded(h: &Harness) {
    let s = &h.store;
    let retention = Duration::from_secs(3 * 3600);
    let m = key("default", "machine", "m1");
    s.object_put(&m, Labels::new()).await.unwrap();
    // Nothing is older than the retention yet: nothing goes.
    assert_eq!(s.compact_older_than(retention).await.unwrap(), 0);
    assert_eq!(all_changes(h).await.len(), 1);
    let mut sizes = Vec::new();
    for hour in 0..12 {
        for i in 0..5 {
            s.tag_set(&m, "counter", &json!(hour * 10 + i))
                .await
                .unwrap();
        }
        s.tag_delete(&m, "counter").await.unwrap();
        h.clock.advance(Duration::from_secs(3600));
        s.compact_older_than(retention).await.unwrap();
        let cutoff = fleetdb::Clock::now(&h.clock) - retention;
        let from = s.revision().await.unwrap().compacted;
        let log = s
            .changes(from, &ChangeFilter::default(), 10_000)
            .await
            .unwrap();
        assert!(
            log.iter().all(|c| c.at >= cutoff),
            "hour {hour}: an entry older than the retention stayed: {log:?}"
        );
        sizes.push(log.len());
    }
    // The entries of the last three hours (written at the hour's start, kept while at or after
    // the cutoff), never more.
    assert_eq!(sizes[0], 7, "{sizes:?}");
    assert!(sizes[3..].iter().all(|&n| n == 18), "{sizes:?}");
    // Reading from before the window is Compacted; from the compaction point, the window.
    let info = s.revision().await.unwrap();
    let err = s
        .changes(Revision(0), &ChangeFilter::default(), 100)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Compacted { .. }), "{err}");
    let window = s
        .changes(info.compacted, &ChangeFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(window.len(), 18);
    assert_eq!(window.last().unwrap().revision, info.current);
    // A retention longer than the log's age compacts nothing more.
    assert_eq!(
        s.compact_older_than(Duration::from_secs(100 * 3600))
            .await
            .unwrap(),
        0
    );
}

pub async fn clock_is_an_input(h: &Harness) {
    let s = &h.store;
    let m = key("default", "machine", "m1");
    h.clock.advance(Duration::from_secs(3600 * 24 * 365));
    let o = s.object_put(&m, Labels::new()).await.unwrap().item;
    assert_eq!(o.created_at, START + Duration::from_secs(3600 * 24 * 365));
    h.clock.set(Timestamp(42));
    let t = s.tag_set(&m, "t", &json!(1)).await.unwrap().item;
    assert_eq!(t.updated_at, Timestamp(42));
}

pub async fn txn_is_atomic(h: &Harness) {
    let s = &h.store;
    let m1 = key("default", "machine", "m1");
    s.object_put(&m1, Labels::new()).await.unwrap();
    let before = rev(h).await;
    let err = s
        .txn(|tx| {
            let m1 = m1.clone();
            async move {
                tx.tag_set(&m1, "a", &json!(1))?;
                tx.object_put(&key("default", "machine", "m2"), Labels::new())?;
                tx.tag_set(&key("default", "machine", "ghost"), "a", &json!(1))?;
                Ok(())
            }
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert_eq!(rev(h).await, before, "nothing half-written");
    assert!(s.tag_get(&m1, "a").await.unwrap().is_none());
    assert!(s
        .object_get(&key("default", "machine", "m2"))
        .await
        .unwrap()
        .is_none());
    // An error returned by the closure aborts too.
    let err = s
        .txn(|tx| {
            let m1 = m1.clone();
            async move {
                tx.tag_set(&m1, "a", &json!(1))?;
                Err::<(), _>(Error::invalid("test", "x", "closure refused"))
            }
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("closure refused"));
    assert_eq!(rev(h).await, before);
    // And a good one commits every write.
    s.txn(|tx| {
        let m1 = m1.clone();
        async move {
            tx.tag_set(&m1, "a", &json!(1))?;
            tx.object_put(&key("default", "machine", "m2"), labels(&[("x", "y")]))?;
            Ok(())
        }
    })
    .await
    .unwrap();
    assert_eq!(all_changes(h).await.len(), 3);
}

pub async fn txn_reads_its_own_writes(h: &Harness) {
    let s = &h.store;
    let m1 = key("default", "machine", "m1");
    let (obj, tag, gone) = s
        .txn(|tx| {
            let m1 = m1.clone();
            async move {
                assert!(tx.object_get(&m1).await?.is_none());
                tx.object_put(&m1, labels(&[("a", "1")]))?;
                tx.object_put(&m1, labels(&[("b", "2")]))?;
                tx.tag_set(&m1, "t", &json!({"v": 1}))?;
                let obj = tx.object_get(&m1).await?;
                let tag = tx.tag_get(&m1, "t").await?;
                tx.tag_delete(&m1, "t")?;
                let gone = tx.tag_get(&m1, "t").await?;
                tx.tag_set(&m1, "t", &json!({"v": 2}))?;
                Ok((obj, tag, gone))
            }
        })
        .await
        .unwrap();
    assert_eq!(obj.unwrap().labels, labels(&[("a", "1"), ("b", "2")]));
    assert_eq!(tag.unwrap().value, json!({"v": 1}));
    assert!(gone.is_none());
    assert_eq!(
        s.tag_get(&m1, "t").await.unwrap().unwrap().value,
        json!({"v": 2})
    );
}

pub async fn txn_retries_on_conflict(h: &Harness) {
    let s = &h.store;
    let m1 = key("default", "machine", "m1");
    s.object_put(&m1, Labels::new()).await.unwrap();
    s.tag_set(&m1, "n", &json!(0)).await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let out = s
        .txn(|tx| {
            let (m1, runs, s) = (m1.clone(), runs.clone(), s.clone());
            async move {
                let run = runs.fetch_add(1, Ordering::SeqCst);
                let n = tx.tag_get(&m1, "n").await?.unwrap().value.as_i64().unwrap();
                if run == 0 {
                    // Someone else changes what we read before we commit.
                    s.tag_set(&m1, "n", &json!(100)).await?;
                }
                tx.tag_set(&m1, "n", &json!(n + 1))?;
                Ok(n + 1)
            }
        })
        .await
        .unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the closure ran again after the conflict"
    );
    assert_eq!(out, 101);
    assert_eq!(
        s.tag_get(&m1, "n").await.unwrap().unwrap().value,
        json!(101)
    );
}

/// A transaction that conflicts at every attempt gives up after `Limits::txn_attempts_max`
/// attempts (`RetriesExhausted`): each attempt run again counts once in
/// `fleetdb_transactions_retried_total` ("attempts that conflicted and ran again"), the last one,
/// run no more, not; the transaction counts once as failed.
pub async fn txn_retries_count_the_attempts_run_again(h: &Harness) {
    let s = &h.store;
    let m = s.metrics();
    let m1 = key("default", "machine", "m1");
    s.object_put(&m1, Labels::new()).await.unwrap();
    s.tag_set(&m1, "n", &json!(0)).await.unwrap();
    let (retried, failed) = (m.transactions_retried.get(), m.transactions_failed.get());
    let runs = Arc::new(AtomicU32::new(0));
    let out = s
        .txn(|tx| {
            let (m1, runs, s) = (m1.clone(), runs.clone(), s.clone());
            async move {
                let run = runs.fetch_add(1, Ordering::SeqCst);
                let n = tx.tag_get(&m1, "n").await?.unwrap().value.as_i64().unwrap();
                // Someone else changes what it read before every commit.
                s.tag_set(&m1, "n", &json!(1_000 + run)).await?;
                tx.tag_set(&m1, "n", &json!(n + 1))?;
                Ok(())
            }
        })
        .await;
    let attempts = s.limits().txn_attempts_max;
    match out {
        Err(Error::RetriesExhausted { attempts: n, .. }) => assert_eq!(n, attempts),
        other => panic!("{other:?}, expected RetriesExhausted"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), attempts);
    assert_eq!(
        m.transactions_retried.get() - retried,
        u64::from(attempts - 1),
        "attempts run again after a conflict"
    );
    assert_eq!(m.transactions_failed.get() - failed, 1);
}

pub async fn txn_serializes_concurrent_increments(h: &Harness) {
    let s = &h.store;
    let m1 = key("default", "machine", "m1");
    s.object_put(&m1, Labels::new()).await.unwrap();
    let tasks = 6;
    let each = 10;
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (s, m1) = (s.clone(), m1.clone());
        handles.push(tokio::spawn(async move {
            for _ in 0..each {
                s.txn(|tx| {
                    let m1 = m1.clone();
                    async move {
                        let n = tx
                            .tag_get(&m1, "n")
                            .await?
                            .map(|t| t.value.as_i64().unwrap())
                            .unwrap_or(0);
                        tx.tag_set(&m1, "n", &json!(n + 1))?;
                        Ok(())
                    }
                })
                .await
                .unwrap();
            }
        }));
    }
    for hd in handles {
        hd.await.unwrap();
    }
    assert_eq!(
        s.tag_get(&m1, "n").await.unwrap().unwrap().value,
        json!(tasks * each),
        "no lost update"
    );
}

pub async fn txn_read_only_writes_nothing(h: &Harness) {
    let before = rev(h).await;
    let got = h
        .store
        .txn(|tx| async move { tx.namespace_get("default").await })
        .await
        .unwrap();
    assert!(got.is_some());
    assert_eq!(rev(h).await, before);
}

/// A read-only transaction's reads are one state: a change between two of its reads makes it
/// run again (its reads are checked together at the end, as a write's are), never a mix.
pub async fn txn_read_only_sees_one_state(h: &Harness) {
    let s = &h.store;
    let m1 = key("default", "machine", "m1");
    s.object_put(&m1, Labels::new()).await.unwrap();
    s.tag_set(&m1, "a", &json!(1)).await.unwrap();
    s.tag_set(&m1, "b", &json!(1)).await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let before = rev(h).await;
    let (a, b) = s
        .txn(|tx| {
            let (m1, runs, s) = (m1.clone(), runs.clone(), s.clone());
            async move {
                let a = tx.tag_get(&m1, "a").await?.unwrap().value;
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    // Both change together between the two reads.
                    s.txn(|w| {
                        let m1 = m1.clone();
                        async move {
                            w.tag_set(&m1, "a", &json!(2))?;
                            w.tag_set(&m1, "b", &json!(2))
                        }
                    })
                    .await?;
                }
                let b = tx.tag_get(&m1, "b").await?.unwrap().value;
                Ok((a, b))
            }
        })
        .await
        .unwrap();
    assert_eq!((a, b), (json!(2), json!(2)), "one state, not a mix");
    assert_eq!(runs.load(Ordering::SeqCst), 2, "ran again after the change");
    assert_eq!(rev(h).await.0, before.0 + 2, "the check wrote nothing");
}

/// A transaction handle used after its attempt ended (a clone kept outside the closure, or held
/// by a task that outlives it; or the handle of an attempt that conflicted, used in the next)
/// refuses writes and reads with `Invalid`, as does the handle of a transaction its caller gave
/// up on. Before, a write answered `Ok(())` and went into a batch already committed or thrown
/// away: the caller believed it written, and nothing was.
pub async fn txn_handle_refuses_use_after_its_attempt(h: &Harness) {
    let s = &h.store;
    let m1 = key("default", "machine", "m1");
    s.object_put(&m1, Labels::new()).await.unwrap();
    s.tag_set(&m1, "n", &json!(0)).await.unwrap();
    let kept = Arc::new(std::sync::Mutex::new(None::<fleetdb::Txn>));
    let late = Arc::new(std::sync::Mutex::new(Vec::new()));
    let runs = Arc::new(AtomicU32::new(0));
    s.txn(|tx| {
        let (m1, kept, late, runs, s) = (
            m1.clone(),
            kept.clone(),
            late.clone(),
            runs.clone(),
            s.clone(),
        );
        async move {
            let n = tx.tag_get(&m1, "n").await?.unwrap().value;
            if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                // This attempt conflicts (someone else changes what it read), and its handle
                // is kept for the next attempt.
                *kept.lock().unwrap() = Some(tx.clone());
                s.tag_set(&m1, "n", &json!(1)).await?;
            } else {
                let stale = kept.lock().unwrap().clone().unwrap();
                late.lock()
                    .unwrap()
                    .push(stale.tag_set(&m1, "from_the_first_attempt", &json!(1)));
                *kept.lock().unwrap() = Some(tx.clone());
            }
            tx.tag_set(&m1, "seen", &n)
        }
    })
    .await
    .unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the first attempt conflicted"
    );
    let late = std::mem::take(&mut *late.lock().unwrap());
    assert!(
        matches!(late.as_slice(), [Err(Error::Invalid { .. })]),
        "a write through the first attempt's handle, in the second: {late:?}"
    );
    // The committed attempt's handle, after `txn` returned.
    let tx = kept.lock().unwrap().take().unwrap();
    let write = tx.tag_set(&m1, "after_the_commit", &json!(1));
    assert!(
        matches!(write, Err(Error::Invalid { .. })),
        "a write after the commit: {write:?}"
    );
    assert!(tx.object_delete(&m1).is_err());
    let read = tx.tag_get(&m1, "n").await;
    assert!(matches!(read, Err(Error::Invalid { .. })), "{read:?}");
    // A caller that gives up on a transaction (drops its future) while the closure runs.
    let (sent, got) = tokio::sync::oneshot::channel();
    let sent = std::sync::Mutex::new(Some(sent));
    let given_up = s.txn(|tx| {
        if let Some(sent) = sent.lock().unwrap().take() {
            let _ = sent.send(tx);
        }
        std::future::pending::<fleetdb::Result<()>>()
    });
    let tx = tokio::select! {
        _ = given_up => unreachable!("the closure never returns"),
        tx = got => tx.unwrap(),
    };
    let write = tx.tag_set(&m1, "after_giving_up", &json!(1));
    assert!(
        matches!(write, Err(Error::Invalid { .. })),
        "a write after the caller gave up: {write:?}"
    );
    // What was committed is the second attempt's own write, and only it.
    assert_eq!(
        s.tag_get(&m1, "seen").await.unwrap().unwrap().value,
        json!(1)
    );
    assert!(s.object_get(&m1).await.unwrap().is_some());
    for name in [
        "from_the_first_attempt",
        "after_the_commit",
        "after_giving_up",
    ] {
        assert_eq!(s.tag_get(&m1, name).await.unwrap(), None, "{name}");
    }
}

pub async fn concurrent_writers_all_commit(h: &Harness) {
    let s = &h.store;
    let writers = 8;
    let each = 25;
    let mut handles = Vec::new();
    for w in 0..writers {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let m = key("default", "machine", &format!("w{w}"));
            s.object_put(&m, Labels::new()).await.unwrap();
            let mut revs = Vec::new();
            for i in 0..each {
                revs.push(s.tag_set(&m, "i", &json!(i)).await.unwrap().item.revision);
            }
            // A failing write among them does not fail its neighbours.
            assert!(s
                .tag_set(&key("default", "machine", "ghost"), "i", &json!(1))
                .await
                .is_err());
            revs
        }));
    }
    let mut all: Vec<Revision> = Vec::new();
    for hd in futures::future::join_all(handles).await {
        all.extend(hd.unwrap());
    }
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "every write has its own revision");
    assert_eq!(n, writers * each);
    let per_object: BTreeMap<String, serde_json::Value> =
        futures::future::join_all((0..writers).map(|w| {
            let s = s.clone();
            async move {
                let m = key("default", "machine", &format!("w{w}"));
                (
                    m.id.clone(),
                    s.tag_get(&m, "i").await.unwrap().unwrap().value,
                )
            }
        }))
        .await
        .into_iter()
        .collect();
    assert!(per_object.values().all(|v| *v == json!(each - 1)));
}
