//! Conformance cases of watches and the World (exports, key-values, maps, deploys, scheduler,
//! membership).

use std::time::Duration;

use fleetdb::core::world::{
    DeployDraft, DeployFileDraft, ExportFilter, ExportId, ExportRecord, Lifetime, ScheduleOptions,
    Strategy,
};
use fleetdb::{
    ChangeOp, Entity, Error, Revision, SessionSpec, Watch, WatchEvent, WatchRequest, WatchScope,
};

use crate::Harness;

const WAIT: Duration = Duration::from_secs(10);

async fn next(w: &mut Watch) -> WatchEvent {
    loop {
        match w.next_timeout(WAIT).await {
            Some(Ok(WatchEvent::Progress { .. })) => continue,
            Some(Ok(ev)) => return ev,
            Some(Err(e)) => panic!("watch ended: {e}"),
            None => panic!("no watch event within {WAIT:?}"),
        }
    }
}

async fn next_change(w: &mut Watch) -> std::sync::Arc<fleetdb::Change> {
    match next(w).await {
        WatchEvent::Change(c) => c,
        other => panic!("expected a change, got {other:?}"),
    }
}

fn rec(kind: &str, name: &str, to: &str, data: &str) -> ExportRecord {
    ExportRecord {
        id: ExportId::new(kind, name, to),
        data: data.as_bytes().to_vec(),
        lifetime: Lifetime::persistent(),
        holds: vec![],
    }
}

pub async fn watch_starts_with_a_snapshot_then_changes(h: &Harness) {
    let s = &h.store;
    s.kv_set("app/a", "1").await.unwrap();
    s.kv_set("app/b", "2").await.unwrap();
    s.kv_set("other", "x").await.unwrap();
    let mut w = s
        .watch(WatchRequest::new(WatchScope::Kv {
            prefix: "app/".into(),
        }))
        .await
        .unwrap();
    let WatchEvent::Snapshot { revision, items } = next(&mut w).await else {
        panic!("a watch without from_revision starts with a snapshot");
    };
    let ids: Vec<&str> = items.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["app/a", "app/b"]);
    assert_eq!(items[0].new_value.as_ref().unwrap()["value"], "1");
    assert!(revision >= items[1].revision);
    let set = s.kv_set("app/c", "3").await.unwrap();
    s.kv_set("other", "y").await.unwrap();
    s.kv_delete("app/a", None).await.unwrap();
    let c = next_change(&mut w).await;
    assert_eq!(
        (c.id.as_str(), c.op, c.revision),
        ("app/c", ChangeOp::Put, set.item.revision)
    );
    assert_eq!(c.entity, Entity::Kv);
    let d = next_change(&mut w).await;
    assert_eq!((d.id.as_str(), d.op), ("app/a", ChangeOp::Delete));
    assert_eq!(
        d.old_value.as_ref().unwrap()["value"],
        "1",
        "previous value delivered"
    );
}

/// The first watch of a store resuming from far back (more changes than its buffer holds)
/// goes at its consumer's pace: it catches up on its own and joins the hub, never lagging.
pub async fn a_first_resume_from_far_back_goes_at_the_consumers_pace(h: &Harness) {
    let s = &h.store;
    let start = s.revision().await.unwrap().current;
    for i in 0..100 {
        s.kv_set(&format!("far/{i:03}"), "v").await.unwrap();
    }
    let mut w = s
        .watch(
            WatchRequest::new(WatchScope::Kv {
                prefix: "far/".into(),
            })
            .from_revision(start)
            .buffer(8),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await; // a slow consumer
    for i in 0..100 {
        assert_eq!(next_change(&mut w).await.id, format!("far/{i:03}"));
    }
    s.kv_set("far/new", "v").await.unwrap();
    assert_eq!(next_change(&mut w).await.id, "far/new");
}

pub async fn watch_resume_loses_and_duplicates_nothing(h: &Harness) {
    let s = &h.store;
    let start = s.revision().await.unwrap().current;
    for i in 0..30 {
        s.kv_set(&format!("k/{i:02}"), &i.to_string())
            .await
            .unwrap();
    }
    let scope = WatchScope::Kv {
        prefix: "k/".into(),
    };
    let mut w = s
        .watch(WatchRequest::new(scope.clone()).from_revision(start))
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(next_change(&mut w).await);
    }
    drop(w); // "disconnect"
    let resume = seen.last().unwrap().revision;
    // Writes while disconnected, and while reconnecting.
    for i in 30..40 {
        s.kv_set(&format!("k/{i:02}"), &i.to_string())
            .await
            .unwrap();
    }
    let mut w = s
        .watch(WatchRequest::new(scope).from_revision(resume))
        .await
        .unwrap();
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 40..50 {
                s.kv_set(&format!("k/{i:02}"), &i.to_string())
                    .await
                    .unwrap();
            }
        })
    };
    for _ in 10..50 {
        seen.push(next_change(&mut w).await);
    }
    writer.await.unwrap();
    let ids: Vec<String> = seen.iter().map(|c| c.id.clone()).collect();
    let expected: Vec<String> = (0..50).map(|i| format!("k/{i:02}")).collect();
    assert_eq!(ids, expected, "every change once, in order");
    assert!(seen.windows(2).all(|p| p[0].revision < p[1].revision));
    assert!(w
        .next_timeout(Duration::from_millis(200))
        .await
        .is_none_or(|e| matches!(e, Ok(WatchEvent::Progress { .. }))));
}

pub async fn watch_from_a_compacted_revision_gives_compacted(h: &Harness) {
    let s = &h.store;
    for i in 0..5 {
        s.kv_set("c", &i.to_string()).await.unwrap();
    }
    let now = s.revision().await.unwrap().current;
    s.compact(now).await.unwrap();
    let err = s
        .watch(WatchRequest::new(WatchScope::All).from_revision(Revision(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Compacted { compacted_revision, .. } if compacted_revision >= Revision(1)),
        "{err}"
    );
}

pub async fn slow_watcher_is_cut_off_fast_one_keeps_up(h: &Harness) {
    let s = &h.store;
    let scope = WatchScope::Kv { prefix: "".into() };
    let mut fast = s
        .watch(WatchRequest::new(scope.clone()).buffer(8))
        .await
        .unwrap();
    let mut slow = s.watch(WatchRequest::new(scope).buffer(8)).await.unwrap();
    assert!(matches!(next(&mut fast).await, WatchEvent::Snapshot { .. }));
    // The fast reader says how many changes it has read; the writer lets it catch up every four
    // writes, so it is never more than half its buffer behind, however busy the machine (a
    // fixed pause let it fall behind under load).
    let (read_tx, mut read) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < 60 {
            match fast.next_timeout(WAIT).await {
                Some(Ok(WatchEvent::Change(_))) => {
                    n += 1;
                    let _ = read_tx.send(n);
                }
                Some(Ok(_)) => {}
                other => panic!("the fast watcher must keep up: {other:?}"),
            }
        }
        n
    });
    for i in 0..60 {
        s.kv_set(&format!("x{i}"), "v").await.unwrap();
        if i % 4 == 3 {
            let caught_up = tokio::time::timeout(WAIT, read.wait_for(|n| *n > i)).await;
            assert!(
                matches!(caught_up, Ok(Ok(_))),
                "the fast watcher did not read change {i}"
            );
        }
    }
    assert_eq!(reader.await.unwrap(), 60);
    // The slow one gets what fitted in its buffer, then a resumable error.
    let mut got = Vec::new();
    let err = loop {
        match slow.next_timeout(WAIT).await {
            Some(Ok(ev)) => got.push(ev),
            Some(Err(e)) => break e,
            None => panic!("the slow watcher was neither fed nor ended"),
        }
    };
    let Error::WatchLagged { last_delivered } = err else {
        panic!("expected WatchLagged, got {err}");
    };
    assert!(got.len() <= 8);
    assert_eq!(got.last().unwrap().revision(), last_delivered);
    // Resuming from last_delivered gives the rest, nothing lost.
    let mut again = s
        .watch(
            WatchRequest::new(WatchScope::Kv { prefix: "".into() }).from_revision(last_delivered),
        )
        .await
        .unwrap();
    let delivered = got
        .iter()
        .filter(|e| matches!(e, WatchEvent::Change(_)))
        .count();
    let mut rest = 0;
    while delivered + rest < 60 {
        match again.next_timeout(WAIT).await {
            Some(Ok(WatchEvent::Change(_))) => rest += 1,
            Some(Ok(_)) => {}
            other => panic!("after {delivered} + {rest} changes: {other:?}"),
        }
    }
    // Nothing more than the 60.
    assert!(matches!(
        again.next_timeout(Duration::from_millis(200)).await,
        None | Some(Ok(WatchEvent::Progress { .. }))
    ));
}

pub async fn directed_exports_are_invisible_to_other_hosts(h: &Harness) {
    let s = &h.store;
    let (h1, h2, h3) = (
        s.world("h1").unwrap(),
        s.world("h2").unwrap(),
        s.world("h3").unwrap(),
    );
    let mut w3 = h3
        .watch(WatchScope::Exports { kind: None }, None)
        .await
        .unwrap();
    assert!(matches!(next(&mut w3).await, WatchEvent::Snapshot { items, .. } if items.is_empty()));
    let out = h1
        .export(vec![
            rec("file", "motd", "h2", "for h2"),
            rec("file", "hosts", "*", "for all"),
            rec("svc", "db", "*", "db"),
        ])
        .await
        .unwrap();
    assert_eq!(out.changed.len(), 3);
    assert!(out.unchanged.is_empty());
    let names = |v: Vec<fleetdb::core::world::Export>| -> Vec<String> {
        v.into_iter()
            .map(|e| format!("{}:{}", e.from, e.id.name))
            .collect()
    };
    assert_eq!(names(h3.collect(&[]).await.unwrap()), ["h1:hosts", "h1:db"]);
    assert_eq!(
        names(h2.collect(&[]).await.unwrap()),
        ["h1:hosts", "h1:motd", "h1:db"]
    );
    assert_eq!(
        names(h1.collect(&[]).await.unwrap()).len(),
        3,
        "a host sees its own"
    );
    // Filters are ORed, empty fields match anything.
    let f = [
        ExportFilter {
            kind: Some("svc".into()),
            ..Default::default()
        },
        ExportFilter {
            name: Some("motd".into()),
            ..Default::default()
        },
    ];
    assert_eq!(names(h2.collect(&f).await.unwrap()), ["h1:motd", "h1:db"]);
    let from_other = [ExportFilter {
        from: Some("h9".into()),
        ..Default::default()
    }];
    assert!(h2.collect(&from_other).await.unwrap().is_empty());
    // The watch of h3 saw only the records to '*'.
    let a = next_change(&mut w3).await;
    let b = next_change(&mut w3).await;
    assert!(
        a.id.ends_with("/*") && b.id.ends_with("/*"),
        "{} {}",
        a.id,
        b.id
    );
    assert!(w3
        .next_timeout(Duration::from_millis(300))
        .await
        .is_none_or(|e| !matches!(e, Ok(WatchEvent::Change(_)))));
    // Identical export: unchanged, and no change event.
    let again = h1
        .export(vec![rec("file", "hosts", "*", "for all")])
        .await
        .unwrap();
    assert_eq!(again.unchanged, vec![ExportId::new("file", "hosts", "*")]);
    assert!(again.changed.is_empty());
    let changed = h1
        .export(vec![rec("file", "hosts", "*", "v2")])
        .await
        .unwrap();
    assert_eq!(changed.changed, vec![ExportId::new("file", "hosts", "*")]);
    // Bad input.
    assert!(matches!(
        h1.export(vec![rec("file", "a b", "*", "")]).await,
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        h1.export(vec![rec("file", "x", "*", "1"), rec("file", "x", "*", "2")])
            .await,
        Err(Error::Invalid { .. })
    ));
    assert!(s.world("not a host").is_err());
}

pub async fn sync_exports_prunes_what_a_host_no_longer_exports(h: &Harness) {
    let s = &h.store;
    let h1 = s.world("h1").unwrap();
    let h2 = s.world("h2").unwrap();
    h1.export(vec![
        rec("f", "a", "*", "1"),
        rec("f", "b", "*", "2"),
        rec("f", "c", "h2", "3"),
    ])
    .await
    .unwrap();
    h2.export(vec![rec("f", "z", "*", "9")]).await.unwrap();
    let out = h1
        .sync_exports(vec![rec("f", "a", "*", "1"), rec("f", "d", "*", "4")])
        .await
        .unwrap();
    assert_eq!(out.unchanged, vec![ExportId::new("f", "a", "*")]);
    assert_eq!(out.changed, vec![ExportId::new("f", "d", "*")]);
    let mut removed = out.removed.clone();
    removed.sort();
    assert_eq!(
        removed,
        vec![ExportId::new("f", "b", "*"), ExportId::new("f", "c", "h2")]
    );
    let mine: Vec<String> = h2
        .collect(&[])
        .await
        .unwrap()
        .into_iter()
        .map(|e| format!("{}:{}", e.from, e.id.name))
        .collect();
    assert_eq!(
        mine,
        ["h1:a", "h1:d", "h2:z"],
        "other hosts' exports untouched"
    );
    let gone = h1
        .unexport(vec![
            ExportId::new("f", "a", "*"),
            ExportId::new("f", "nope", "*"),
        ])
        .await
        .unwrap();
    assert_eq!(gone.removed, vec![ExportId::new("f", "a", "*")]);
}

pub async fn session_bound_exports_vanish_when_the_session_expires(h: &Harness) {
    let s = &h.store;
    let sess = s
        .session_start(SessionSpec::new("agent", "h1").ttl(Duration::from_secs(10)))
        .await
        .unwrap();
    let h1 = s.world("h1").unwrap();
    let h2 = s.world("h2").unwrap();
    let mut bound = rec("f", "bound", "*", "b");
    bound.lifetime = Lifetime::session(sess.id());
    let mut ttl = rec("f", "ttl", "*", "t");
    ttl.lifetime = Lifetime::ttl(Duration::from_secs(30));
    h1.export(vec![bound, ttl, rec("f", "kept", "*", "k")])
        .await
        .unwrap();
    // Binding to another host's session is refused.
    let mut foreign = rec("f", "x", "*", "x");
    foreign.lifetime = Lifetime::session(sess.id());
    assert!(matches!(
        h2.export(vec![foreign]).await,
        Err(Error::Invalid { .. })
    ));
    let mut w = h2
        .watch(
            WatchScope::Exports {
                kind: Some("f".into()),
            },
            None,
        )
        .await
        .unwrap();
    assert!(matches!(next(&mut w).await, WatchEvent::Snapshot { items, .. } if items.len() == 3));
    std::mem::forget(sess); // the process "dies": nobody renews or closes it
    h.clock.advance(Duration::from_secs(11));
    let names = |v: Vec<fleetdb::core::world::Export>| -> Vec<String> {
        v.into_iter().map(|e| e.id.name).collect()
    };
    assert_eq!(
        names(h2.collect(&[]).await.unwrap()),
        ["kept", "ttl"],
        "a dead session's exports are invisible at once, before any sweep"
    );
    s.sweep_sessions().await.unwrap();
    let c = next_change(&mut w).await;
    assert_eq!((c.op, c.id.as_str()), (ChangeOp::Delete, "h1/f/bound/*"));
    h.clock.advance(Duration::from_secs(20));
    assert_eq!(names(h2.collect(&[]).await.unwrap()), ["kept"]);
    s.sweep_sessions().await.unwrap();
    let c = next_change(&mut w).await;
    assert_eq!((c.op, c.id.as_str()), (ChangeOp::Delete, "h1/f/ttl/*"));
}

pub async fn kv_get_set_cas_delete(h: &Harness) {
    let s = &h.store;
    assert!(
        s.kv_get("a/b").await.unwrap().is_none(),
        "a missing key is None, not an error"
    );
    let w = s.kv_set("a/b", "v1").await.unwrap();
    assert!(w.changed);
    let r1 = w.item.revision;
    assert_eq!(s.kv_get("a/b").await.unwrap().unwrap().value, "v1");
    let same = s.kv_set("a/b", "v1").await.unwrap();
    assert!(!same.changed);
    assert_eq!(same.item.revision, r1);
    let err = s
        .kv_cas("a/b", "v2", Revision(r1.0 + 100))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    assert!(matches!(
        s.kv_cas("a/b", "v2", Revision(0)).await,
        Err(Error::Conflict { .. })
    ));
    let w2 = s.kv_cas("a/b", "v2", r1).await.unwrap();
    assert!(w2.item.revision > r1);
    assert_eq!(w2.item.create_revision, r1);
    assert!(s.kv_cas("new", "n", Revision(0)).await.unwrap().changed);
    assert!(matches!(
        s.kv_delete("a/b", Some(r1)).await,
        Err(Error::Conflict { .. })
    ));
    s.kv_delete("a/b", Some(w2.item.revision)).await.unwrap();
    assert!(matches!(
        s.kv_delete("a/b", None).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        s.kv_set("bad key", "x").await,
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        s.kv_set("k", &"x".repeat(2 << 20)).await,
        Err(Error::TooLarge { .. })
    ));
    // TTL and session binding.
    s.kv_set_with("t", "x", None, Lifetime::ttl(Duration::from_secs(5)))
        .await
        .unwrap();
    let sess = s.session_start(SessionSpec::new("c", "h1")).await.unwrap();
    s.kv_set_with("b", "x", None, Lifetime::session(sess.id()))
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(6));
    assert!(s.kv_get("t").await.unwrap().is_none(), "expired at its TTL");
    sess.close().await.unwrap();
    assert!(
        s.kv_get("b").await.unwrap().is_none(),
        "gone with its session"
    );
    s.kv_set("p/1", "a").await.unwrap();
    s.kv_set("p/2", "b").await.unwrap();
    s.kv_set("q", "c").await.unwrap();
    let listed: Vec<String> = s
        .kv_list("p/", None, 10)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(listed, ["p/1", "p/2"]);
    // A plain overwrite keeps the creation revision and logs the previous value.
    let first = s.kv_set("over", "one").await.unwrap().item;
    let second = s.kv_set("over", "two").await.unwrap().item;
    assert_eq!(second.create_revision, first.revision);
    assert!(second.revision > first.revision);
    let log = s
        .changes(first.revision, &fleetdb::ChangeFilter::default(), 10)
        .await
        .unwrap();
    let c = log.iter().find(|c| c.id == "over").unwrap();
    assert_eq!(c.old_value.as_ref().unwrap()["value"], "one");
    assert_eq!(c.new_value.as_ref().unwrap()["value"], "two");
    assert_eq!(c.revision, second.revision);
    assert_eq!(s.kv_get("over").await.unwrap().unwrap(), second);
}

/// Writers racing on one key (and creating it): the change log holds every set once, in
/// revision order, and each change's previous value is the value the change before it wrote;
/// the key ends with the last change's value and revision.
pub async fn racing_sets_of_one_key_chain_their_previous_values(h: &Harness) {
    const WRITERS: usize = 8;
    const EACH: usize = 25;
    let s = &h.store;
    let start = s.revision().await.unwrap().current;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                s.kv_set("hot", &format!("{w}-{i}")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log: Vec<_> = s
        .changes(start, &fleetdb::ChangeFilter::default(), 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.id == "hot")
        .collect();
    assert_eq!(log.len(), WRITERS * EACH, "every set is one change");
    assert!(log[0].old_value.is_none(), "the first set created the key");
    for pair in log.windows(2) {
        assert!(pair[0].revision < pair[1].revision);
        assert_eq!(
            pair[1].old_value.as_ref().map(|v| &v["value"]),
            pair[0].new_value.as_ref().map(|v| &v["value"]),
            "the previous value of revision {} is what revision {} wrote",
            pair[1].revision,
            pair[0].revision
        );
    }
    let last = log.last().unwrap();
    let now = s.kv_get("hot").await.unwrap().unwrap();
    assert_eq!(now.revision, last.revision);
    assert_eq!(
        Some(&serde_json::Value::from(now.value)),
        last.new_value.as_ref().map(|v| &v["value"])
    );
}

pub async fn per_host_maps_are_separate_from_keys(h: &Harness) {
    let s = &h.store;
    let (h1, h2) = (s.world("h1").unwrap(), s.world("h2").unwrap());
    h1.map_set("ns", "one").await.unwrap();
    h2.map_set("ns", "two").await.unwrap();
    s.kv_set("ns/h1", "plain key").await.unwrap();
    let m = s.map_get("ns").await.unwrap();
    assert_eq!(
        m.get("h1").map(String::as_str),
        Some("one"),
        "a plain key never overwrites a map value"
    );
    assert_eq!(m.get("h2").map(String::as_str), Some("two"));
    assert_eq!(s.kv_get("ns/h1").await.unwrap().unwrap().value, "plain key");
    h1.map_delete("ns").await.unwrap();
    assert_eq!(s.map_get("ns").await.unwrap().len(), 1);
    assert!(matches!(
        h1.map_delete("ns").await,
        Err(Error::NotFound { .. })
    ));
    let mut w = s
        .watch(WatchRequest::new(WatchScope::Map {
            namespace: "ns".into(),
        }))
        .await
        .unwrap();
    assert!(matches!(next(&mut w).await, WatchEvent::Snapshot { items, .. } if items.len() == 1));
    h1.map_set("ns", "again").await.unwrap();
    h1.map_set("other", "x").await.unwrap();
    let c = next_change(&mut w).await;
    assert_eq!(
        (
            c.id.as_str(),
            c.new_value.as_ref().unwrap()["value"].as_str()
        ),
        ("ns/h1", Some("again"))
    );
    // More hosts than a listing page: every one is read (a map was cut at a page).
    let hosts = fleetdb::core::query::LIST_PAGE_MAX + 1;
    let names: Vec<String> = (0..hosts).map(|i| format!("big{i:05}")).collect();
    for chunk in names.chunks(50) {
        futures::future::try_join_all(
            chunk
                .iter()
                .map(|host| async move { s.world(host)?.map_set("big", host).await }),
        )
        .await
        .unwrap();
    }
    let big = s.map_get("big").await.unwrap();
    assert_eq!(big.len(), hosts);
    assert!(big.iter().all(|(host, value)| host == value));
}

pub async fn deploy_chain_rules_and_trees(h: &Harness) {
    let s = &h.store;
    assert_eq!(s.deploy_max_id().await.unwrap(), None);
    let d = |id, hash: Option<&str>, parent: Option<&str>| DeployDraft {
        id,
        hash: hash.map(str::to_string),
        parent_hash: parent.map(str::to_string),
        payload: format!("payload {id}").into_bytes(),
        files: vec![],
    };
    let refused = |r: fleetdb::Result<_>, needle: &str| match r {
        Err(Error::Refused { reason, .. }) => assert!(reason.contains(needle), "{reason}"),
        Err(e) => panic!("expected Refused ({needle}), got {e}"),
        Ok(_) => panic!("expected Refused ({needle})"),
    };
    refused(
        s.deploy_add(d(2, None, None)).await.map(|_| ()),
        "previous deploy 1 does not exist",
    );
    s.deploy_add(d(1, Some("aaa"), None)).await.unwrap();
    assert!(matches!(
        s.deploy_add(d(1, None, None)).await,
        Err(Error::AlreadyExists { .. })
    ));
    refused(
        s.deploy_add(d(2, Some("bbb"), Some("zzz")))
            .await
            .map(|_| ()),
        "does not match",
    );
    refused(
        s.deploy_add(d(3, None, None)).await.map(|_| ()),
        "previous deploy 2 does not exist",
    );
    s.deploy_add(d(2, Some("bbb"), Some("aaa"))).await.unwrap();
    s.deploy_add(d(3, None, None)).await.unwrap(); // hashes are optional
    assert!(matches!(
        s.deploy_add(d(0, None, None)).await,
        Err(Error::Invalid { .. })
    ));
    assert_eq!(s.deploy_max_id().await.unwrap(), Some(3));
    // A tree: identical contents are stored once; reading gives every byte back.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let file = |path: &str, content: &[u8]| DeployFileDraft {
        path: path.into(),
        mode: 0o644,
        content: content.to_vec(),
    };
    let mut tree = d(4, None, None);
    tree.files = vec![
        file("etc/a.conf", b"same"),
        file("etc/b.conf", b"same"),
        file("bin/tool", &big),
        file("empty", b""),
    ];
    let added = s.deploy_add(tree).await.unwrap();
    assert_eq!(added.files.len(), 4);
    assert_eq!(
        added.files[2].digest, added.files[3].digest,
        "dedup by content"
    );
    let files = s.deploy_files(4).await.unwrap();
    let by_path: std::collections::BTreeMap<String, Vec<u8>> =
        files.into_iter().map(|(f, b)| (f.path, b)).collect();
    assert_eq!(by_path["bin/tool"], big);
    assert_eq!(by_path["etc/a.conf"], b"same");
    assert_eq!(by_path["empty"], b"");
    let mut bad = d(5, None, None);
    bad.files = vec![file("../escape", b"x")];
    assert!(matches!(
        s.deploy_add(bad).await,
        Err(Error::Invalid { .. })
    ));
    // Prune: never the newest.
    assert_eq!(s.deploy_prune(3).await.unwrap(), 2);
    let ids: Vec<u64> = s
        .deploy_list(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, [3, 4]);
    assert_eq!(s.deploy_prune(100).await.unwrap(), 1);
    assert_eq!(s.deploy_max_id().await.unwrap(), Some(4));
    // A pruned id is not free: adding it again would fork the chain.
    for used in [1, 3] {
        assert!(matches!(
            s.deploy_add(d(used, None, None)).await,
            Err(Error::AlreadyExists { .. })
        ));
    }
    // A path that is a file and a directory of another cannot be written out.
    let mut both = d(5, None, None);
    both.files = vec![file("a", b"x"), file("a-b", b"y"), file("a/b", b"z")];
    assert!(matches!(
        s.deploy_add(both).await,
        Err(Error::Invalid { .. })
    ));
    assert_eq!(
        s.deploy_get(4).await.unwrap().unwrap().payload,
        b"payload 4"
    );
    s.deploy_add(d(5, None, None)).await.unwrap();
    // The tree's contents live in the content store: held while deploy 4 is retained, collected
    // once it is pruned (the upload lease that protected them before the deploy landed is gone).
    let digests: Vec<String> = added.files.iter().map(|f| f.digest.clone()).collect();
    for dg in &digests {
        assert!(s.blob_info(dg).await.unwrap().is_some(), "{dg} stored");
    }
    assert!(s.lease_list("", None, 10).await.unwrap().items.is_empty());
    s.gc_run().await.unwrap();
    for dg in &digests {
        assert!(
            s.blob_info(dg).await.unwrap().is_some(),
            "{dg} held by deploy 4"
        );
    }
    assert_eq!(s.deploy_prune(5).await.unwrap(), 1);
    s.gc_run().await.unwrap();
    for dg in &digests {
        assert!(
            s.blob_info(dg).await.unwrap().is_none(),
            "{dg} collected after its deploy was pruned"
        );
    }
    // A tree that shares content with a retained deploy keeps that content.
    let mut six = d(6, None, None);
    six.files = vec![file("a", b"kept"), file("b", b"dropped")];
    let six = s.deploy_add(six).await.unwrap();
    let mut seven = d(7, None, None);
    seven.files = vec![file("a", b"kept")];
    s.deploy_add(seven).await.unwrap();
    assert_eq!(s.deploy_prune(7).await.unwrap(), 2);
    s.gc_run().await.unwrap();
    assert!(s.blob_info(&six.files[0].digest).await.unwrap().is_some());
    assert!(s.blob_info(&six.files[1].digest).await.unwrap().is_none());
    assert_eq!(s.deploy_files(7).await.unwrap()[0].1, b"kept");
}

pub async fn schedule_follows_registrations_and_session_liveness(h: &Harness) {
    let s = &h.store;
    let start = |host: &str, ttl: u64| {
        let s = s.clone();
        let host = host.to_string();
        async move {
            s.session_start(SessionSpec::new("sched", host).ttl(Duration::from_secs(ttl)))
                .await
                .unwrap()
        }
    };
    let (sa, sb) = (start("ha", 600).await, start("hb", 10).await);
    let opts = ScheduleOptions {
        strategy: Strategy::Rr,
        max_count: 0,
    };
    s.world("hb")
        .unwrap()
        .schedule_register("web", &sb, opts.clone())
        .await
        .unwrap();
    s.world("ha")
        .unwrap()
        .schedule_register("web", &sa, opts.clone())
        .await
        .unwrap();
    assert_eq!(
        s.schedule_get("web").await.unwrap().unwrap().hosts,
        ["hb", "ha"],
        "rr keeps order of arrival"
    );
    // A host cannot register with another host's session.
    assert!(s
        .world("hc")
        .unwrap()
        .schedule_register("web", &sa, opts.clone())
        .await
        .is_err());
    let mut w = s
        .watch(WatchRequest::new(WatchScope::Schedule {
            namespace: Some("web".into()),
        }))
        .await
        .unwrap();
    assert!(matches!(next(&mut w).await, WatchEvent::Snapshot { items, .. } if items.len() == 1));
    // hb's session dies: after the sweep the schedule drops it, without any leader.
    std::mem::forget(sb);
    h.clock.advance(Duration::from_secs(11));
    s.sweep_sessions().await.unwrap();
    assert_eq!(s.schedule_get("web").await.unwrap().unwrap().hosts, ["ha"]);
    let c = next_change(&mut w).await;
    assert_eq!(
        c.new_value.as_ref().unwrap()["meta"]["hosts"],
        serde_json::json!(["ha"])
    );
    let sc = start("hc", 600).await;
    s.world("hc")
        .unwrap()
        .schedule_register("web", &sc, opts)
        .await
        .unwrap();
    assert_eq!(
        s.schedule_get("web").await.unwrap().unwrap().hosts,
        ["ha", "hc"]
    );
    s.world("ha")
        .unwrap()
        .schedule_unregister("web")
        .await
        .unwrap();
    assert_eq!(s.schedule_get("web").await.unwrap().unwrap().hosts, ["hc"]);
    sc.close().await.unwrap();
    assert!(s
        .schedule_get("web")
        .await
        .unwrap()
        .unwrap()
        .hosts
        .is_empty());
}

pub async fn membership_lists_and_watches_live_sessions(h: &Harness) {
    let s = &h.store;
    let a = s
        .session_start(SessionSpec::new("agent", "h1").runtime_info("v1"))
        .await
        .unwrap();
    let mut w = s
        .watch(WatchRequest::new(WatchScope::Members))
        .await
        .unwrap();
    assert!(matches!(next(&mut w).await, WatchEvent::Snapshot { items, .. } if items.len() == 1));
    let b = s
        .session_start(SessionSpec::new("agent", "h2"))
        .await
        .unwrap();
    let members = s.members().await.unwrap();
    assert_eq!(members.len(), 2);
    let c = next_change(&mut w).await;
    assert_eq!((c.op, c.id.as_str()), (ChangeOp::Put, b.id()));
    assert_eq!(c.new_value.as_ref().unwrap()["host"], "h2");
    a.close().await.unwrap();
    let c = next_change(&mut w).await;
    assert_eq!(c.op, ChangeOp::Delete);
    assert_eq!(s.members().await.unwrap().len(), 1);
}

/// Invariant 23: exports report exactly what changed. An export whose TTL has passed is hidden
/// from every read at once; removing it (unexport, or a sync that leaves it out) before the
/// sweeper did removes its row but reports nothing removed — the caller removed nothing it
/// could see (before: listed in `removed`).
pub async fn removing_an_expired_export_reports_nothing_removed(h: &Harness) {
    let s = &h.store;
    let h1 = s.world("h1").unwrap();
    for sync in [false, true] {
        let mut short = rec("f", "t", "*", "x");
        short.lifetime = Lifetime::ttl(Duration::from_secs(5));
        h1.export(vec![short, rec("f", "live", "*", "y")])
            .await
            .unwrap();
        h.clock.advance(Duration::from_secs(6));
        let seen: Vec<String> = h1
            .collect(&[])
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.id.name)
            .collect();
        assert_eq!(seen, ["live"], "the expired one is hidden");
        let o = if sync {
            h1.sync_exports(vec![]).await.unwrap()
        } else {
            h1.unexport(vec![
                ExportId::new("f", "t", "*"),
                ExportId::new("f", "live", "*"),
            ])
            .await
            .unwrap()
        };
        assert_eq!(
            o.removed,
            vec![ExportId::new("f", "live", "*")],
            "sync {sync}: only the live export is reported removed"
        );
        let again = h1
            .unexport(vec![ExportId::new("f", "t", "*")])
            .await
            .unwrap();
        assert!(again.removed.is_empty(), "its row went too: {again:?}");
    }
}

/// `collect` is ordered by record key, `from/kind/name/target` as bytes (documented so): `-`
/// sorts before `/`, so host `h1-a` comes before `h1`.
pub async fn collect_is_ordered_by_record_key(h: &Harness) {
    let s = &h.store;
    for host in ["h1", "h1-a", "h0"] {
        s.world(host)
            .unwrap()
            .export(vec![rec("k", "n", "*", host)])
            .await
            .unwrap();
    }
    let from: Vec<String> = s
        .world("h9")
        .unwrap()
        .collect(&[])
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.from)
        .collect();
    assert_eq!(from, ["h0", "h1-a", "h1"]);
}

/// Deploys added before trees moved to the content store kept their files as World blob
/// records; only a prune can free them, and it does once no kept deploy holds them (before:
/// kept for ever). A deploy op carrying file contents is refused now.
pub async fn pruned_legacy_deploys_take_their_blob_records_along(h: &Harness) {
    use fleetdb::core::world::{Space, WorldQuery};
    use fleetdb::core::{Batch, Clock as _, Limits, Op};
    let s = &h.store;
    let file = |path: &str, content: &[u8]| DeployFileDraft {
        path: path.into(),
        mode: 0o644,
        content: content.to_vec(),
    };
    let legacy = |id: u64, files: Vec<DeployFileDraft>| Batch {
        preconditions: vec![],
        ops: vec![Op::DeployAdd {
            deploy: DeployDraft {
                id,
                hash: None,
                parent_hash: None,
                payload: format!("p{id}").into_bytes(),
                files,
            },
            stored: vec![],
        }],
        now: h.clock.now(),
    };
    let refused = legacy(1, vec![file("etc/a.conf", b"a")]).validate(&Limits::default());
    assert!(matches!(refused, Err(Error::Invalid { .. })), "{refused:?}");
    // Written as an old version did (the backend takes the op as it comes).
    let shared = file("etc/shared.conf", b"in both");
    s.backend()
        .commit(legacy(
            1,
            vec![file("etc/a.conf", b"only 1"), shared.clone()],
        ))
        .await
        .unwrap();
    s.backend().commit(legacy(2, vec![shared])).await.unwrap();
    s.deploy_add(DeployDraft {
        id: 3,
        hash: None,
        parent_hash: None,
        payload: b"p3".to_vec(),
        files: vec![],
    })
    .await
    .unwrap();
    let blobs = || async {
        s.backend()
            .world_list(&WorldQuery::new(Space::Blob))
            .await
            .unwrap()
            .len()
    };
    assert_eq!(blobs().await, 2);
    assert_eq!(s.deploy_prune(2).await.unwrap(), 1);
    assert_eq!(blobs().await, 1, "deploy 2 still holds the shared file");
    assert_eq!(
        s.deploy_files(2).await.unwrap()[0].1,
        b"in both",
        "deploy 2's file is still read"
    );
    assert_eq!(s.deploy_prune(3).await.unwrap(), 1);
    assert_eq!(blobs().await, 0, "no deploy holds any");
}

/// Changes until nothing comes for `quiet`.
async fn drain_changes(w: &mut Watch, quiet: Duration) -> Vec<std::sync::Arc<fleetdb::Change>> {
    let mut out = Vec::new();
    loop {
        match w.next_timeout(quiet).await {
            Some(Ok(WatchEvent::Change(c))) => out.push(c),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("watch ended: {e}"),
            None => return out,
        }
    }
}

/// A resume from a revision the store has not reached (a position saved against another
/// database, a restored backup) is refused (found by review: it was accepted and silently
/// skipped every change up to it); otherwise it would have to lose nothing.
pub async fn a_watch_from_a_future_revision_is_refused(h: &Harness) {
    let s = &h.store;
    s.kv_set("fut/0", "0").await.unwrap();
    let current = s.revision().await.unwrap().current;
    let ahead = Revision(current.0 + 3);
    let opened = s
        .watch(
            WatchRequest::new(WatchScope::Kv {
                prefix: "fut/".into(),
            })
            .from_revision(ahead),
        )
        .await;
    let mut w = match opened {
        Err(Error::Invalid { .. }) => return, // refused: fine
        Err(e) => panic!("unexpected error {e}"),
        Ok(w) => w,
    };
    let mut written = Vec::new();
    for i in 1..=5 {
        written.push(
            s.kv_set(&format!("fut/{i}"), "v")
                .await
                .unwrap()
                .item
                .revision,
        );
    }
    let got: Vec<Revision> = drain_changes(&mut w, Duration::from_millis(1500))
        .await
        .iter()
        .map(|c| c.revision)
        .collect();
    assert_eq!(
        got, written,
        "a watch from {ahead:?} (current {current:?}) was accepted and skipped changes silently"
    );
}

/// `Lifetime::ttl` turns a duration into whole milliseconds by rounding UP: a positive TTL
/// under a millisecond is 1ms (not "0ms", refused), and no TTL is cut short.
pub async fn a_sub_millisecond_ttl_is_rounded_up_not_refused(h: &Harness) {
    let s = &h.store;
    let now = fleetdb::Clock::now(&h.clock);
    let e = s
        .kv_set_with(
            "ttl/sub-ms",
            "v",
            None,
            Lifetime::ttl(Duration::from_micros(500)),
        )
        .await
        .expect("a positive TTL under a millisecond is accepted");
    assert_eq!(e.item.expires_at, Some(now + Duration::from_millis(1)));
    let mut r = rec("f", "sub-ms", "*", "d");
    r.lifetime = Lifetime::ttl(Duration::from_micros(1500));
    let h1 = s.world("h1").unwrap();
    h1.export(vec![r]).await.unwrap();
    let got = h1.collect(&[]).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].expires_at,
        Some(now + Duration::from_millis(2)),
        "1.5ms lives 2ms, not 1ms"
    );
    h.clock.advance(Duration::from_micros(1500));
    assert!(s.kv_get("ttl/sub-ms").await.unwrap().is_none());
    assert_eq!(h1.collect(&[]).await.unwrap().len(), 1, "not cut short");
    assert_eq!(
        Lifetime::ttl(Duration::ZERO).ttl_ms,
        Some(0),
        "zero stays zero (and is refused)"
    );
}

/// A collect of more records than a page reads every page from ONE snapshot: while another
/// host's `sync_exports` rewrites all its records at once, a collector sees all of them old or
/// all of them new, never a mix (before, each page was read on its own, and a sync committing
/// between two pages gave a set the store never held).
pub async fn a_collect_of_many_pages_is_one_snapshot(h: &Harness) {
    let s = &h.store;
    let n = fleetdb::core::query::LIST_PAGE_MAX + LIST_PAGE_MAX_HALF;
    let records = move |v: usize| -> Vec<ExportRecord> {
        (0..n)
            .map(|i| rec("file", &format!("f{i:05}"), "*", &format!("v{v}")))
            .collect()
    };
    let h1 = s.world("h1").unwrap();
    h1.sync_exports(records(0)).await.unwrap();
    let syncs = 12;
    let writer = {
        let h1 = h1.clone();
        tokio::spawn(async move {
            for v in 1..=syncs {
                h1.sync_exports(records(v)).await.unwrap();
            }
        })
    };
    let reader = s.world("h2").unwrap();
    let mut reads = 0;
    loop {
        let done = writer.is_finished();
        let seen = reader.collect(&[]).await.unwrap();
        assert_eq!(seen.len(), n);
        let versions: std::collections::BTreeSet<&[u8]> =
            seen.iter().map(|e| e.data.as_slice()).collect();
        assert_eq!(
            versions.len(),
            1,
            "collect {reads} mixed two syncs: {:?}",
            versions
                .iter()
                .map(|v| String::from_utf8_lossy(v))
                .collect::<Vec<_>>()
        );
        reads += 1;
        if done {
            break;
        }
    }
    writer.await.unwrap();
    let last = reader.collect(&[]).await.unwrap();
    assert!(last
        .iter()
        .all(|e| e.data == format!("v{syncs}").as_bytes()));
}

const LIST_PAGE_MAX_HALF: usize = fleetdb::core::query::LIST_PAGE_MAX / 2;

/// A schedule never lists a host whose registration is no longer live, whether or not a
/// sweeper has run since its session's deadline: the answer is what the sweep will write
/// (the next host moves up under `max_count`), read in one snapshot with the registrations.
/// Before, `schedule_get` returned the stored schedule, dead hosts included, until a sweep.
pub async fn a_schedule_never_lists_an_expired_host(h: &Harness) {
    let s = &h.store;
    let start = |host: &str, ttl: u64| {
        let s = s.clone();
        let host = host.to_string();
        async move {
            s.session_start(SessionSpec::new("sched", host).ttl(Duration::from_secs(ttl)))
                .await
                .unwrap()
        }
    };
    let (sa, sb, sc) = (
        start("ha", 600).await,
        start("hb", 10).await,
        start("hc", 600).await,
    );
    let one = ScheduleOptions {
        strategy: Strategy::Rr,
        max_count: 1,
    };
    for (host, session) in [("hb", &sb), ("ha", &sa), ("hc", &sc)] {
        for ns in ["web", "solo"] {
            if ns == "solo" && host != "hb" {
                continue;
            }
            s.world(host)
                .unwrap()
                .schedule_register(ns, session, one.clone())
                .await
                .unwrap();
        }
    }
    assert_eq!(s.schedule_get("web").await.unwrap().unwrap().hosts, ["hb"]);
    assert_eq!(s.schedule_get("solo").await.unwrap().unwrap().hosts, ["hb"]);
    // hb's session passes its deadline; nobody sweeps.
    std::mem::forget(sb);
    h.clock.advance(Duration::from_secs(11));
    let other = h.another_process().await;
    for store in [s, &other] {
        let web = store.schedule_get("web").await.unwrap().unwrap();
        assert_eq!(web.hosts, ["ha"], "hb is dead: the next host is scheduled");
        let regs: Vec<String> = store
            .schedule_registrations("web")
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.host)
            .collect();
        assert_eq!(regs, ["ha", "hc"]);
        let solo = store.schedule_get("solo").await.unwrap().unwrap();
        assert!(solo.hosts.is_empty(), "{solo:?}");
    }
    // The sweep then writes exactly what was answered.
    s.sweep_sessions().await.unwrap();
    assert_eq!(s.schedule_get("web").await.unwrap().unwrap().hosts, ["ha"]);
    assert!(s
        .schedule_get("solo")
        .await
        .unwrap()
        .unwrap()
        .hosts
        .is_empty());
    assert_eq!(s.schedule_get("nobody").await.unwrap(), None);
}

/// Unregistering a registration whose session already passed its deadline answers `NotFound`,
/// as an unknown one does and as `kv_delete` of a lapsed key does (the registration is
/// invisible to every read, invariant 25), and writes nothing: the sweep removes it. Before, it
/// succeeded, removing a registration no read showed.
pub async fn unregistering_a_lapsed_registration_is_not_found(h: &Harness) {
    let s = &h.store;
    let session = s
        .session_start(SessionSpec::new("sched", "ha").ttl(Duration::from_secs(10)))
        .await
        .unwrap();
    let opts = ScheduleOptions {
        strategy: Strategy::Rr,
        max_count: 1,
    };
    let world = s.world("ha").unwrap();
    world
        .schedule_register("web", &session, opts)
        .await
        .unwrap();
    let unknown = world.schedule_unregister("never").await.unwrap_err();
    assert!(matches!(unknown, Error::NotFound { .. }), "{unknown}");
    std::mem::forget(session);
    h.clock.advance(Duration::from_secs(11));
    let before = s.revision().await.unwrap().current;
    let err = world.schedule_unregister("web").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(
        err.to_string().contains("registration of host \"ha\""),
        "{err}"
    );
    assert_eq!(
        s.revision().await.unwrap().current,
        before,
        "nothing written"
    );
    // The sweep then removes it, and the schedule is empty.
    s.sweep_sessions().await.unwrap();
    assert!(s
        .schedule_get("web")
        .await
        .unwrap()
        .unwrap()
        .hosts
        .is_empty());
    assert!(s.schedule_registrations("web").await.unwrap().is_empty());
}

/// Deploy 1 is the first of the chain: a parent hash on it names nothing and is refused
/// (`Invalid`, nothing stored, the id still free), whether it comes through `deploy_add` or as
/// a batch op. Before, it was accepted and stored as the deploy's parent.
pub async fn a_first_deploy_with_a_parent_hash_is_refused(h: &Harness) {
    let s = &h.store;
    let draft = |parent: Option<&str>| DeployDraft {
        id: 1,
        hash: Some("aaa".into()),
        parent_hash: parent.map(str::to_string),
        payload: b"first".to_vec(),
        files: vec![],
    };
    let err = s.deploy_add(draft(Some("zzz"))).await.unwrap_err();
    match &err {
        Error::Invalid { field, value, rule } => {
            assert_eq!(field, "parent hash");
            assert_eq!(value, "zzz");
            assert!(rule.contains("deploy 1 is the first"), "{rule}");
        }
        e => panic!("expected Invalid, got {e}"),
    }
    let op = fleetdb::core::Op::DeployAdd {
        deploy: draft(Some("zzz")),
        stored: vec![],
    };
    let err = op.validate(s.limits()).unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    assert_eq!(s.deploy_max_id().await.unwrap(), None, "nothing stored");
    let d = s.deploy_add(draft(None)).await.unwrap();
    assert_eq!((d.id, d.parent_hash), (1, None));
}

/// A page that ends the listing exactly at its limit has no `next` cursor, as `list` and
/// `select` have none: `kv_list` and `blob_list` fetch one row more than the limit to tell.
/// Before, both gave a cursor whenever the page was full, leading to an empty next page.
pub async fn an_exactly_full_last_page_has_no_next_cursor(h: &Harness) {
    let s = &h.store;
    for k in ["pg/a", "pg/b", "other"] {
        s.kv_set(k, "v").await.unwrap();
    }
    let page = s.kv_list("pg/", None, 2).await.unwrap();
    let keys: Vec<&str> = page.items.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["pg/a", "pg/b"]);
    assert_eq!(page.next, None, "the last page, exactly full");
    let first = s.kv_list("pg/", None, 1).await.unwrap();
    assert_eq!(first.next.as_deref(), Some("pg/a"));
    let second = s.kv_list("pg/", first.next.as_deref(), 1).await.unwrap();
    assert_eq!(second.items.len(), 1);
    assert_eq!(second.items[0].key, "pg/b");
    assert_eq!(second.next, None);

    let mut digests = Vec::new();
    for data in [&b"one"[..], b"two"] {
        let b = s
            .blob_put(data, fleetdb::Labels::new(), None)
            .await
            .unwrap();
        digests.push(b.digest);
    }
    digests.sort();
    let page = s.blob_list(None, 2).await.unwrap();
    let got: Vec<String> = page.items.into_iter().map(|b| b.digest).collect();
    assert_eq!(got, digests);
    assert_eq!(page.next, None, "the last page, exactly full");
    let first = s.blob_list(None, 1).await.unwrap();
    assert_eq!(first.next.as_deref(), Some(digests[0].as_str()));
    let second = s.blob_list(first.next.as_deref(), 1).await.unwrap();
    assert_eq!(second.items[0].digest, digests[1]);
    assert_eq!(second.next, None);
}

/// A deploy the chain refuses (its id taken, the previous one missing, a parent hash that
/// does not match) is refused before any of its files is uploaded: the content store gets
/// nothing (before, every file was stored first, garbage until a collection).
pub async fn a_refused_deploy_uploads_nothing(h: &Harness) {
    let s = &h.store;
    let d = |id: u64, hash: Option<&str>, parent: Option<&str>, content: &str| DeployDraft {
        id,
        hash: hash.map(str::to_string),
        parent_hash: parent.map(str::to_string),
        payload: vec![],
        files: vec![DeployFileDraft {
            path: "etc/app.conf".into(),
            mode: 0o644,
            content: content.as_bytes().to_vec(),
        }],
    };
    let first = s.deploy_add(d(1, Some("h1"), None, "one")).await.unwrap();
    let refusals = [
        (d(1, None, None, "taken"), "already"),
        (
            d(2, Some("h2"), Some("wrong"), "mismatch"),
            "does not match",
        ),
        (d(3, None, None, "gap"), "previous deploy 2 does not exist"),
    ];
    for (draft, needle) in refusals {
        let digest = fleetdb::core::world::sha256_digest(&draft.files[0].content);
        let err = s.deploy_add(draft).await.unwrap_err();
        assert!(
            matches!(err, Error::Refused { .. } | Error::AlreadyExists { .. }),
            "{err}"
        );
        assert!(err.to_string().contains(needle), "{err}");
        assert!(
            s.blob_info(&digest).await.unwrap().is_none(),
            "{needle}: the refused deploy's file was uploaded"
        );
    }
    let blobs: Vec<String> = s
        .blob_list(None, 10)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|b| b.digest)
        .collect();
    assert_eq!(blobs, [first.files[0].digest.clone()]);
    assert!(s.lease_list("", None, 10).await.unwrap().items.is_empty());
    // The chain accepts the right one.
    s.deploy_add(d(2, Some("h2"), Some("h1"), "two"))
        .await
        .unwrap();
}

/// A deploy tree carries permission bits only: a file with the setuid, setgid or sticky bit
/// is refused with an error naming the file and its mode, before anything is uploaded (before,
/// such a mode was stored and extracted as is: a setuid-root file on every host applying it).
pub async fn deploy_files_with_setuid_setgid_or_sticky_bits_are_refused(h: &Harness) {
    let s = &h.store;
    let d = |mode: u32| DeployDraft {
        id: 1,
        hash: None,
        parent_hash: None,
        payload: vec![],
        files: vec![DeployFileDraft {
            path: "bin/tool".into(),
            mode,
            content: format!("mode {mode:o}").into_bytes(),
        }],
    };
    for mode in [0o4755, 0o2755, 0o1777, 0o6755, 0o10644] {
        let draft = d(mode);
        let digest = fleetdb::core::world::sha256_digest(&draft.files[0].content);
        match s.deploy_add(draft).await {
            Err(Error::Invalid { field, value, .. }) => {
                assert_eq!(field, "deploy file mode");
                assert!(value.contains("bin/tool"), "{value}");
                assert!(value.contains(&format!("{mode:o}")), "{value}");
            }
            other => panic!("mode {mode:o}: expected Invalid, got {other:?}"),
        }
        assert!(s.blob_info(&digest).await.unwrap().is_none());
    }
    assert_eq!(s.deploy_max_id().await.unwrap(), None);
    let ok = s.deploy_add(d(0o755)).await.unwrap();
    assert_eq!(ok.files[0].mode, 0o755);
}

/// A schedule watch's snapshot, like `schedule_get`, never lists a host whose registration is
/// no longer live, swept or not: it holds the schedule the sweep will write; the sweep's
/// change follows (before, the snapshot held the dead host until that change).
pub async fn a_schedule_watch_snapshot_never_lists_an_expired_host(h: &Harness) {
    let s = &h.store;
    let sa = s
        .session_start(SessionSpec::new("sched", "ha").ttl(Duration::from_secs(600)))
        .await
        .unwrap();
    let sb = s
        .session_start(SessionSpec::new("sched", "hb").ttl(Duration::from_secs(10)))
        .await
        .unwrap();
    let opts = ScheduleOptions {
        strategy: Strategy::Rr,
        max_count: 0,
    };
    s.world("hb")
        .unwrap()
        .schedule_register("web", &sb, opts.clone())
        .await
        .unwrap();
    s.world("ha")
        .unwrap()
        .schedule_register("web", &sa, opts)
        .await
        .unwrap();
    std::mem::forget(sb);
    h.clock.advance(Duration::from_secs(11));
    for namespace in [Some("web".to_string()), None] {
        let mut w = s
            .watch(WatchRequest::new(WatchScope::Schedule { namespace }))
            .await
            .unwrap();
        let WatchEvent::Snapshot { items, .. } = next(&mut w).await else {
            panic!("a snapshot first");
        };
        assert_eq!(items.len(), 1);
        assert_eq!(
            items[0].new_value.as_ref().unwrap()["meta"]["hosts"],
            serde_json::json!(["ha"]),
            "the dead host hb is not scheduled"
        );
    }
    let mut w = s
        .watch(WatchRequest::new(WatchScope::Schedule {
            namespace: Some("web".into()),
        }))
        .await
        .unwrap();
    next(&mut w).await;
    s.sweep_sessions().await.unwrap();
    let c = next_change(&mut w).await;
    assert_eq!(
        c.new_value.as_ref().unwrap()["meta"]["hosts"],
        serde_json::json!(["ha"])
    );
}

/// A sweep that stops at its limit of expired records says so (`Swept::more`), so the background
/// task sweeps again at once instead of an interval later: records expiring faster than one
/// sweep's limit per interval no longer pile up (test
/// `a_backlog_of_expired_keys_is_swept_at_once_not_a_limit_per_interval`). Exports and keys
/// alike; the last sweep, below its limit, says no more.
pub async fn a_sweep_at_its_limit_says_more_is_due(h: &Harness) {
    let s = &h.store;
    let h1 = s.world("h1").unwrap();
    let ttl = Lifetime::ttl(Duration::from_secs(5));
    for i in 0..3 {
        s.kv_set_with(&format!("k{i}"), "x", None, ttl.clone())
            .await
            .unwrap();
        let mut e = rec("f", &format!("e{i}"), "*", "x");
        e.lifetime = ttl.clone();
        h1.export(vec![e]).await.unwrap();
    }
    h.clock.advance(Duration::from_secs(6));
    let now = fleetdb::Clock::now(&h.clock);
    let first = s.backend().session_sweep(now, 2).await.unwrap();
    assert_eq!((first.records, first.more), (4, true), "{first:?}");
    let second = s.backend().session_sweep(now, 2).await.unwrap();
    assert_eq!((second.records, second.more), (2, false), "{second:?}");
    assert!(s.kv_list("", None, 10).await.unwrap().items.is_empty());
    assert!(h1.collect(&[]).await.unwrap().is_empty());
}

/// A host never receives, by any watch, a change of an export directed to another host: not in
/// a snapshot, not live, not when resuming from an old revision (the catch-up path reads the
/// log on its own), whatever the scope (`All` included), and not the removals either (an
/// unexport, a sync dropping it, its session's end, its TTL's sweep), whose old value carries
/// the data. Pins invariant 22 for every path a watch takes.
pub async fn a_watch_never_delivers_exports_directed_to_another_host(h: &Harness) {
    let s = &h.store;
    let start = s.revision().await.unwrap().current;
    let (h1, h3) = (s.world("h1").unwrap(), s.world("h3").unwrap());
    let sess = s
        .session_start(SessionSpec::new("agent", "h1").ttl(Duration::from_secs(10)))
        .await
        .unwrap();
    let mut bound = rec("f", "bound", "h2", "secret");
    bound.lifetime = Lifetime::session(sess.id());
    let mut ttl = rec("f", "ttl", "h2", "secret");
    ttl.lifetime = Lifetime::ttl(Duration::from_secs(30));
    let scopes = [
        WatchScope::All,
        WatchScope::Exports { kind: None },
        WatchScope::Exports {
            kind: Some("f".into()),
        },
    ];
    // Live watches of h3, opened before anything was exported.
    let mut live = Vec::new();
    for scope in &scopes {
        let mut w = h3.watch(scope.clone(), None).await.unwrap();
        assert!(
            matches!(next(&mut w).await, WatchEvent::Snapshot { items, .. } if items.is_empty())
        );
        live.push(w);
    }
    h1.export(vec![
        bound,
        ttl,
        rec("f", "p", "h2", "secret"),
        rec("f", "pub", "*", "pub"),
    ])
    .await
    .unwrap();
    // Retarget `p` to h9 (its record for h2 is removed), then remove it.
    h1.sync_exports(vec![
        rec("f", "p", "h9", "secret"),
        rec("f", "pub", "*", "pub"),
    ])
    .await
    .unwrap();
    h1.unexport(vec![ExportId::new("f", "p", "h9")])
        .await
        .unwrap();
    sess.close().await.unwrap();
    h.clock.advance(Duration::from_secs(31));
    s.sweep_sessions().await.unwrap();
    // A last change every watch waits for.
    h1.export(vec![rec("f", "last", "*", "end")]).await.unwrap();
    let visible = |c: &fleetdb::Change| {
        c.namespace != ".export" || c.id.ends_with("/*") || c.id.ends_with("/h3")
    };
    let drain = |mut w: Watch| async move {
        let mut seen = Vec::new();
        loop {
            let c = next_change(&mut w).await;
            let end = c.id == "h1/f/last/*";
            seen.push(c);
            if end {
                return seen;
            }
        }
    };
    let mut resumed = Vec::new();
    for scope in &scopes {
        resumed.push(h3.watch(scope.clone(), Some(start)).await.unwrap());
    }
    for (i, w) in live.into_iter().chain(resumed).enumerate() {
        let seen = drain(w).await;
        let leaked: Vec<String> = seen
            .iter()
            .filter(|c| !visible(c))
            .map(|c| format!("{:?} {}", c.op, c.id))
            .collect();
        assert!(leaked.is_empty(), "watch {i} of h3 got {leaked:?}");
        assert!(
            seen.iter().any(|c| c.id == "h1/f/pub/*"),
            "watch {i} of h3 got the export to every host"
        );
    }
    // A snapshot now holds only what h3 may see.
    let mut w = h3
        .watch(WatchScope::Exports { kind: None }, None)
        .await
        .unwrap();
    match next(&mut w).await {
        WatchEvent::Snapshot { items, .. } => {
            let ids: Vec<&str> = items.iter().map(|c| c.id.as_str()).collect();
            assert_eq!(ids, ["h1/f/last/*", "h1/f/pub/*"]);
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
}
