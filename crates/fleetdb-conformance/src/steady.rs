//! A deployment's steady state: the same hour of work again and again, with the store's
//! retention knobs set, must leave every table at the same size — nothing may grow with the
//! deployment's age (dead sessions, claims, backoffs of deleted objects, World records of dead
//! sessions or past their TTL, expired leases and what they held, abandoned uploads, the change
//! log, history).

use std::time::Duration;

use fleetdb::core::gc::Resource;
use fleetdb::core::world::{ExportId, ExportRecord, Lifetime, ScheduleOptions, Strategy};
use fleetdb::gc::LeaseSpec;
use fleetdb::{Backoff, Labels, SessionSpec};
use serde_json::json;

use crate::{key, Harness};

/// The tables whose rows a steady workload must not grow (`gc_runs` keeps its newest
/// `GC_RUNS_KEPT`, checked in `gc_reports_stats_and_metrics`).
const TABLES: [&str; 12] = [
    "objects",
    "tags",
    "sessions",
    "work",
    "work_backoff",
    "work_history",
    "world",
    "changes",
    "leases",
    "lease_resources",
    "blobs",
    "ingests",
];

/// Every hour: an object to work on arrives; a worker finishes it and fails a long-lived one,
/// then closes; another worker claims the new one and crashes, with a key, an export and a
/// scheduler registration bound to its session; a key and an export with a TTL, a lease with an
/// expiry on the object and a blob; the object is deleted; an upload is given up midway. Then the sweep, history pruning and compaction
/// by age (3 h) and a collection. From the fourth hour on, every table holds what it held then.
pub async fn steady_cycles_leave_no_table_growing(h: &Harness) {
    let s = &h.store;
    let retention = Duration::from_secs(3 * 3600);
    s.process_define("P", &[]).await.unwrap();
    let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(5), 2.0).unwrap();
    let stable = key("default", "machine", "stable");
    s.object_put(&stable, Labels::new()).await.unwrap();
    let schedule = ScheduleOptions {
        strategy: Strategy::Rr,
        max_count: 0,
    };
    // The crashed workers' sessions and claims, never closed nor dropped (a drop would cancel).
    let mut crashed = Vec::new();
    let mut counts: Vec<Vec<i64>> = Vec::new();
    for hour in 0..10 {
        let tmp = key("default", "machine", &format!("tmp{hour}"));
        s.object_put(&tmp, Labels::new()).await.unwrap();
        s.tag_set(&tmp, "todo", &json!(hour)).await.unwrap();

        let w1 = s
            .session_start(SessionSpec::new("worker", "h1"))
            .await
            .unwrap();
        let mut work = w1.claim_object(&tmp, "P").await.unwrap();
        work.finish(|tx| {
            let tmp = tmp.clone();
            async move { tx.tag_delete(&tmp, "todo") }
        })
        .await
        .unwrap();
        let mut work = w1.claim_object(&stable, "P").await.unwrap();
        work.fail(&backoff, "broken").await.unwrap();
        w1.close().await.unwrap();

        let w2 = s
            .session_start(SessionSpec::new("worker", "h2"))
            .await
            .unwrap();
        let held = w2.claim_object(&tmp, "P").await.unwrap();
        s.kv_set_with(
            &format!("owner/{hour}"),
            "h2",
            None,
            Lifetime::session(w2.id()),
        )
        .await
        .unwrap();
        let h2 = s.world("h2").unwrap();
        h2.export(vec![ExportRecord {
            id: ExportId::new("status", format!("s{hour}"), "*"),
            data: b"up".to_vec(),
            lifetime: Lifetime::session(w2.id()),
            holds: vec![],
        }])
        .await
        .unwrap();
        h2.schedule_register("web", &w2, schedule.clone())
            .await
            .unwrap();
        crashed.push((w2, held));

        s.kv_set_with(
            &format!("lock/{hour}"),
            "x",
            None,
            Lifetime::ttl(Duration::from_secs(60)),
        )
        .await
        .unwrap();
        s.world("h1")
            .unwrap()
            .export(vec![ExportRecord {
                id: ExportId::new("probe", format!("p{hour}"), "*"),
                data: b"ok".to_vec(),
                lifetime: Lifetime::ttl(Duration::from_secs(60)),
                holds: vec![],
            }])
            .await
            .unwrap();
        let lease = s
            .lease_create(LeaseSpec {
                id: Some(format!("pull-{hour}")),
                expire_in: Some(Duration::from_secs(600)),
                ..LeaseSpec::default()
            })
            .await
            .unwrap();
        s.lease_add(&lease.id, Resource::Object { key: tmp.clone() })
            .await
            .unwrap();
        s.object_delete(&tmp).await.unwrap();
        // A blob held only by the lease, and an upload given up midway.
        s.blob_put(
            format!("layer {hour}").as_bytes(),
            Labels::new(),
            Some(&lease.id),
        )
        .await
        .unwrap();
        let mut upload = s
            .blob_writer_with_ttl(&format!("up-{hour}"), None, None, Duration::from_secs(600))
            .await
            .unwrap();
        upload.write(b"partial").await.unwrap();
        drop(upload);

        h.clock.advance(Duration::from_secs(3600));
        while s.sweep_sessions().await.unwrap() > 0 {}
        s.history_prune(retention).await.unwrap();
        s.compact_older_than(retention).await.unwrap();
        s.gc_run().await.unwrap();
        let mut now = Vec::new();
        for table in TABLES {
            now.push(h.count(table).await);
        }
        counts.push(now);
    }
    for hour in 4..counts.len() {
        assert_eq!(
            counts[hour], counts[3],
            "hour {hour}: rows of {TABLES:?} grew: {counts:?}"
        );
    }
}
