//! Sessions, processes, selectors, work, backoff and history: BMDB's scenarios plus what BMDB
//! never tested (lock release after a crash, renewal failures, failing finish, stale tokens).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fleetdb::core::selector::{ObjectView, Selector};
use fleetdb::{
    Backoff, Clock, Error, HistoryEntry, HistoryFilter, Labels, ObjectKey, SessionSpec, Store,
    WorkEvent,
};
use serde_json::json;

use crate::{key, Harness};

fn spec(component: &str) -> SessionSpec {
    SessionSpec::new(component, "host-1").ttl(Duration::from_secs(10))
}

async fn machines(h: &Harness, n: usize) -> Vec<ObjectKey> {
    let mut out = Vec::new();
    for i in 0..n {
        let k = key("default", "machine", &format!("m{i:03}"));
        h.store.object_put(&k, Labels::new()).await.unwrap();
        out.push(k);
    }
    out
}

async fn events(h: &Harness, k: &ObjectKey) -> Vec<(WorkEvent, String)> {
    let mut page = h
        .store
        .history(&HistoryFilter::Object(k.clone()), None, 1000)
        .await
        .unwrap()
        .items;
    page.reverse();
    page.into_iter().map(|e| (e.event, e.process)).collect()
}

pub async fn session_start_list_close(h: &Harness) {
    let s = h
        .store
        .session_start(
            SessionSpec::new("shepherd", "host-7")
                .runtime_info("v1.2 pid 42")
                .ttl(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    let info = h.store.session_get(s.id()).await.unwrap().unwrap();
    assert_eq!(
        (
            info.component.as_str(),
            info.host.as_str(),
            info.runtime_info.as_str()
        ),
        ("shepherd", "host-7", "v1.2 pid 42")
    );
    assert_eq!(info.deadline, crate::START + Duration::from_secs(30));
    assert_eq!(h.store.session_list(None, 10).await.unwrap().items.len(), 1);
    for bad in [
        SessionSpec::new("bad name", "h"),
        SessionSpec::new("c", "h").ttl(Duration::from_millis(100)),
        SessionSpec::new("c", "h").runtime_info("x".repeat(5000)),
    ] {
        assert!(h.store.session_start(bad).await.is_err());
    }
    assert_eq!(s.clone().close().await.unwrap(), 0);
    assert!(h.store.session_get(s.id()).await.unwrap().is_none());
    assert!(matches!(
        s.claim("p", "has(x)", 1).await,
        Err(Error::SessionExpired { .. })
    ));
}

pub async fn processes_must_be_declared(h: &Harness) {
    let s = h.store.session_start(spec("c")).await.unwrap();
    machines(h, 1).await;
    let err = s
        .claim("Undeclared", "kind = machine", 1)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("process \"Undeclared\": is not declared"),
        "{err}"
    );
    let err = h
        .store
        .process_define("AgentStart", &["Recovery"])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("\"Recovery\": is not declared"),
        "{err}"
    );
    h.store.process_define("Recovery", &[]).await.unwrap();
    let p = h
        .store
        .process_define("AgentStart", &["Recovery"])
        .await
        .unwrap();
    assert_eq!(p.conflicts, vec!["Recovery"]);
    let names: Vec<String> = h
        .store
        .process_list()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, vec!["AgentStart", "Recovery"]);
}

pub async fn same_process_excludes_other_processes_do_not(h: &Harness) {
    let st = &h.store;
    st.process_define("A", &[]).await.unwrap();
    st.process_define("B", &[]).await.unwrap();
    let ks = machines(h, 1).await;
    let s1 = st.session_start(spec("one")).await.unwrap();
    let s2 = st.session_start(spec("two")).await.unwrap();
    let mut w1 = s1.claim_object(&ks[0], "A").await.unwrap();
    // Same process, other session: refused; selector claims skip it.
    let err = s2.claim_object(&ks[0], "A").await.unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    assert!(s2.claim("A", "kind = machine", 5).await.unwrap().is_empty());
    // Another process on the same object: allowed.
    let mut w2 = s2.claim_object(&ks[0], "B").await.unwrap();
    assert!(w2.token() > w1.token(), "fencing tokens increase");
    w1.cancel().await.unwrap();
    w2.cancel().await.unwrap();
    // Cancel then re-claim.
    let mut again = s2.claim("A", "kind = machine", 5).await.unwrap();
    assert_eq!(again.len(), 1);
    again[0].finish(|_tx| async { Ok(()) }).await.unwrap();
    assert_eq!(
        events(h, &ks[0]).await,
        vec![
            (WorkEvent::Started, "A".into()),
            (WorkEvent::Started, "B".into()),
            (WorkEvent::Canceled, "A".into()),
            (WorkEvent::Canceled, "B".into()),
            (WorkEvent::Started, "A".into()),
            (WorkEvent::Finished, "A".into()),
        ]
    );
}

pub async fn conflicting_processes_exclude_each_other(h: &Harness) {
    let st = &h.store;
    st.process_define("Recovery", &[]).await.unwrap();
    st.process_define("AgentStart", &["Recovery"])
        .await
        .unwrap();
    st.process_define("Other", &[]).await.unwrap();
    let ks = machines(h, 1).await;
    let s = st.session_start(spec("c")).await.unwrap();
    let mut w = s.claim_object(&ks[0], "AgentStart").await.unwrap();
    // Declared on AgentStart, enforced both ways.
    assert!(matches!(
        s.claim_object(&ks[0], "Recovery").await,
        Err(Error::Conflict { .. })
    ));
    assert!(s
        .claim("Recovery", "kind = machine", 1)
        .await
        .unwrap()
        .is_empty());
    s.claim_object(&ks[0], "Other")
        .await
        .unwrap()
        .cancel()
        .await
        .unwrap();
    w.cancel().await.unwrap();
    let mut r = s.claim_object(&ks[0], "Recovery").await.unwrap();
    assert!(matches!(
        s.claim_object(&ks[0], "AgentStart").await,
        Err(Error::Conflict { .. })
    ));
    r.cancel().await.unwrap();
}

pub async fn finish_runs_writes_and_releases_atomically(h: &Harness) {
    let st = &h.store;
    st.process_define("Provision", &[]).await.unwrap();
    let ks = machines(h, 2).await;
    let s = st.session_start(spec("c")).await.unwrap();
    let mut w = s
        .claim("Provision", "kind = machine and not has(provided)", 1)
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(w.key(), &ks[0]);
    // A failing finish (its closure errors) changes nothing and keeps the claim.
    let err = w
        .finish(|_tx| async { Err::<(), _>(Error::invalid("test", "x", "refused")) })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refused"));
    // A finish whose commit fails (a write to a missing object) keeps the claim too.
    let ghost = key("default", "machine", "ghost");
    let err = w
        .finish(|tx| {
            let ghost = ghost.clone();
            async move { tx.tag_set(&ghost, "provided", &json!(1)) }
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert_eq!(
        st.work_list(Some("Provision"), 10).await.unwrap().len(),
        1,
        "claim still held"
    );
    let k0 = ks[0].clone();
    w.finish(|tx| {
        let k0 = k0.clone();
        async move { tx.tag_set(&k0, "provided", &json!({"provider_id": "x1"})) }
    })
    .await
    .unwrap();
    assert!(st.work_list(None, 10).await.unwrap().is_empty());
    assert_eq!(
        st.tag_get(&ks[0], "provided").await.unwrap().unwrap().value["provider_id"],
        "x1"
    );
    // The selector now picks the next one.
    let next = s
        .claim("Provision", "kind = machine and not has(provided)", 5)
        .await
        .unwrap();
    assert_eq!(
        next.iter().map(|w| w.key().clone()).collect::<Vec<_>>(),
        vec![ks[1].clone()]
    );
    // Ending twice is refused.
    assert!(matches!(w.cancel().await, Err(Error::WorkLost { .. })));
}

/// Fail the one machine `n` times with `b`, each time once its backoff is over, and say how long
/// each backoff was (whole seconds); in backoff the object is claimable neither by selector nor
/// by name.
async fn backoff_waits(
    h: &Harness,
    s: &fleetdb::Session,
    k: &ObjectKey,
    b: &Backoff,
    n: usize,
) -> Vec<u64> {
    let st = &h.store;
    let mut seen = Vec::new();
    for _ in 0..n {
        let mut w = s
            .claim("Install", "kind = machine", 1)
            .await
            .unwrap()
            .pop()
            .expect("claimable after backoff");
        w.fail(b, "disk on fire").await.unwrap();
        let bo = st
            .backoff_list(Some("Install"), true, 10)
            .await
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(bo.cause, "disk on fire");
        let wait = Duration::from_micros((bo.until.0 - h.clock.now().0) as u64);
        seen.push(wait.as_secs());
        assert!(s
            .claim("Install", "kind = machine", 1)
            .await
            .unwrap()
            .is_empty());
        assert!(matches!(
            s.claim_object(k, "Install").await,
            Err(Error::Conflict { .. })
        ));
        h.clock.advance(wait - Duration::from_millis(1));
        assert!(s
            .claim("Install", "kind = machine", 1)
            .await
            .unwrap()
            .is_empty());
        h.clock.advance(Duration::from_millis(1));
        h.store.renew_sessions().await.unwrap();
    }
    seen
}

pub async fn backoff_follows_bmdb_vectors(h: &Harness) {
    let st = &h.store;
    st.process_define("Install", &[]).await.unwrap();
    let ks = machines(h, 1).await;
    let s = st
        .session_start(SessionSpec::new("c", "h").ttl(Duration::from_secs(3600)))
        .await
        .unwrap();
    let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5), 2.0).unwrap();
    assert_eq!(
        backoff_waits(h, &s, &ks[0], &b, 5).await,
        vec![1, 2, 4, 5, 5]
    );
    let finish = || async {
        s.claim("Install", "kind = machine", 1)
            .await
            .unwrap()
            .pop()
            .unwrap()
            .finish(|_| async { Ok(()) })
            .await
            .unwrap();
    };
    // Finish resets the sequence: it starts over at the initial interval.
    finish().await;
    assert!(st.backoff_list(None, false, 10).await.unwrap().is_empty());
    assert_eq!(backoff_waits(h, &s, &ks[0], &b, 2).await, vec![1, 2]);
    // BMDB's second vector: {60s, 120s, 1.1}, rounded up to whole seconds.
    finish().await;
    let slow = Backoff::new(Duration::from_secs(60), Duration::from_secs(120), 1.1).unwrap();
    assert_eq!(
        backoff_waits(h, &s, &ks[0], &slow, 9).await,
        vec![60, 66, 73, 81, 90, 99, 109, 120, 120]
    );
    let mut w = s
        .claim("Install", "kind = machine", 1)
        .await
        .unwrap()
        .pop()
        .unwrap();
    w.fail(&slow, "again").await.unwrap();
    let bo = st
        .backoff_list(None, false, 10)
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(bo.last_interval_s, 120);
    // Operators can clear it.
    assert!(st.backoff_clear(&ks[0], "Install").await.unwrap());
    assert!(!st.backoff_clear(&ks[0], "Install").await.unwrap());
    assert_eq!(
        s.claim("Install", "kind = machine", 1).await.unwrap().len(),
        1
    );
}

/// The fencing token alone decides: a handle of a claim the same live session has since taken
/// again (after an operator's cancel) is refused — finish, cancel and fail all `WorkLost`,
/// changing nothing — and the new claim stays held.
pub async fn a_stale_token_of_the_same_session_is_refused(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let ks = machines(h, 1).await;
    let s = st.session_start(spec("c")).await.unwrap();
    let mut old = s.claim_object(&ks[0], "P").await.unwrap();
    assert!(st.work_cancel(&ks[0], "P").await.unwrap());
    let mut new = s.claim_object(&ks[0], "P").await.unwrap();
    assert!(new.info().token > old.info().token);
    assert_eq!(new.info().session_id, old.info().session_id);
    let history = || async {
        st.history(&HistoryFilter::Object(ks[0].clone()), None, 100)
            .await
            .unwrap()
            .items
    };
    let before = history().await;
    let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5), 2.0).unwrap();
    assert!(matches!(
        old.fail(&b, "stale").await,
        Err(Error::WorkLost { .. })
    ));
    assert!(matches!(
        old.finish(|tx| {
            let k = ks[0].clone();
            async move { tx.tag_set(&k, "done", &json!(true)) }
        })
        .await,
        Err(Error::WorkLost { .. })
    ));
    assert!(matches!(old.cancel().await, Err(Error::WorkLost { .. })));
    assert_eq!(history().await, before, "nothing written");
    assert!(st.tag_get(&ks[0], "done").await.unwrap().is_none());
    assert!(st.backoff_list(None, false, 10).await.unwrap().is_empty());
    let held = st.work_list(Some("P"), 10).await.unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].token, new.info().token);
    new.finish(|_| async { Ok(()) }).await.unwrap();
}

pub async fn history_records_every_step(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let ks = machines(h, 1).await;
    let s = st
        .session_start(SessionSpec::new("worker", "host-9").ttl(Duration::from_secs(10)))
        .await
        .unwrap();
    let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 1.0).unwrap();
    let mut tokens = Vec::new();
    let mut w = s.claim_object(&ks[0], "P").await.unwrap();
    tokens.push(w.token());
    w.fail(&b, "boom").await.unwrap();
    h.clock.advance(Duration::from_secs(2));
    let mut w = s.claim_object(&ks[0], "P").await.unwrap();
    tokens.push(w.token());
    w.cancel().await.unwrap();
    let mut w = s.claim_object(&ks[0], "P").await.unwrap();
    tokens.push(w.token());
    w.finish(|_| async { Ok(()) }).await.unwrap();
    let all = st
        .history(&HistoryFilter::Object(ks[0].clone()), None, 100)
        .await
        .unwrap()
        .items;
    let got: Vec<(WorkEvent, i64, Option<String>)> = all
        .iter()
        .rev()
        .map(|e| (e.event, e.token, e.cause.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (WorkEvent::Started, tokens[0], None),
            (WorkEvent::Failed, tokens[0], Some("boom".into())),
            (WorkEvent::Started, tokens[1], None),
            (WorkEvent::Canceled, tokens[1], None),
            (WorkEvent::Started, tokens[2], None),
            (WorkEvent::Finished, tokens[2], None),
        ]
    );
    for e in &all {
        assert_eq!(
            (e.session_id.as_str(), e.component.as_str(), e.host.as_str()),
            (s.id(), "worker", "host-9")
        );
    }
    assert_eq!(all[0].at, crate::START + Duration::from_secs(2));
    // Newest first, paginated, per process too.
    let p1 = st
        .history(&HistoryFilter::Process("P".into()), None, 4)
        .await
        .unwrap();
    assert_eq!(p1.items.len(), 4);
    let p2 = st
        .history(&HistoryFilter::Process("P".into()), p1.next.as_deref(), 4)
        .await
        .unwrap();
    assert_eq!(p2.items.len(), 2);
    assert!(p2.next.is_none());
    let mut seqs: Vec<i64> = p1.items.iter().chain(&p2.items).map(|e| e.seq).collect();
    let sorted = {
        let mut v = seqs.clone();
        v.sort_by(|a, b| b.cmp(a));
        v
    };
    assert_eq!(seqs, sorted);
    seqs.dedup();
    assert_eq!(seqs.len(), 6);
    // Kept after the object is deleted; pruned by retention.
    st.object_delete(&ks[0]).await.unwrap();
    assert_eq!(
        st.history(&HistoryFilter::Object(ks[0].clone()), None, 100)
            .await
            .unwrap()
            .items
            .len(),
        6
    );
    h.clock.advance(Duration::from_secs(3600));
    // All but the newest, which carries the sequence on (invariant 21).
    assert_eq!(
        st.history_prune(Duration::from_secs(1800)).await.unwrap(),
        5
    );
    let left = st
        .history(&HistoryFilter::Process("P".into()), None, 100)
        .await
        .unwrap()
        .items;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].seq, sorted[0]);
}

/// Retention prunes history in write order: the oldest rows up to the first one written at or
/// after the cut-off. A row with an older time written after a newer one (another process's
/// clock behind) stays until the rows before it go.
pub async fn history_prune_goes_in_write_order(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let ks = machines(h, 1).await;
    let s = st
        .session_start(SessionSpec::new("worker", "h").ttl(Duration::from_secs(3600)))
        .await
        .unwrap();
    let cycle = || async {
        let mut w = s.claim_object(&ks[0], "P").await.unwrap();
        w.cancel().await.unwrap();
    };
    cycle().await; // two rows at START
    h.clock.set(crate::START + Duration::from_secs(100));
    cycle().await; // two at +100
    h.clock.set(crate::START + Duration::from_secs(10));
    cycle().await; // two at +10, written after the ones at +100
    let ats = |items: &[HistoryEntry]| -> Vec<i64> {
        items
            .iter()
            .rev()
            .map(|e| (e.at.0 - crate::START.0) / 1_000_000)
            .collect()
    };
    let all = |st: &Store| {
        let st = st.clone();
        async move {
            st.history(&HistoryFilter::Process("P".into()), None, 100)
                .await
                .unwrap()
                .items
        }
    };
    assert_eq!(ats(&all(st).await), vec![0, 0, 100, 100, 10, 10]);
    // Cut-off at +90: the two at START go; the ones at +10 wait behind the ones at +100.
    h.clock.set(crate::START + Duration::from_secs(150));
    assert_eq!(st.history_prune(Duration::from_secs(60)).await.unwrap(), 2);
    assert_eq!(ats(&all(st).await), vec![100, 100, 10, 10]);
    assert_eq!(st.history_prune(Duration::from_secs(60)).await.unwrap(), 0);
    // Cut-off past every row: all but the newest go (it carries the sequence on: SQLite would
    // number the next row of an empty table 1 again).
    h.clock.set(crate::START + Duration::from_secs(1000));
    let newest = all(st).await[0].seq;
    assert_eq!(st.history_prune(Duration::from_secs(60)).await.unwrap(), 3);
    assert_eq!(st.history_prune(Duration::from_secs(60)).await.unwrap(), 0);
    assert_eq!(ats(&all(st).await), vec![10]);
    cycle().await;
    let after = all(st).await;
    assert_eq!(after.len(), 3);
    assert!(
        after.iter().take(2).all(|e| e.seq > newest),
        "{newest} then {after:?}"
    );
}

pub async fn dead_session_work_is_claimable_at_its_deadline(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let ks = machines(h, 1).await;
    let dead = st.session_start(spec("crashy")).await.unwrap();
    let alive = st.session_start(spec("healthy")).await.unwrap();
    let mut held = dead.claim_object(&ks[0], "P").await.unwrap();
    dead.pause_renewal(); // as if its process hung or was killed
    h.clock.advance(Duration::from_secs(9));
    st.renew_sessions().await.unwrap();
    assert!(
        matches!(
            alive.claim_object(&ks[0], "P").await,
            Err(Error::Conflict { .. })
        ),
        "alive until its deadline"
    );
    h.clock.advance(Duration::from_secs(1));
    // No sweeper has run: liveness is checked by the claim itself.
    let retried = st.metrics().transactions_retried.get();
    let mut w = alive
        .claim("P", "kind = machine", 1)
        .await
        .unwrap()
        .pop()
        .expect("free at the deadline");
    assert!(w.token() > held.token());
    // Taking a dead session's claim over is no conflict (PostgreSQL's lean first attempt stops
    // at its row, by design): nothing counts as retried. The dead claim ended here, `expired`,
    // counted once: the sweep below finds nothing of it left.
    assert_eq!(st.metrics().transactions_retried.get(), retried);
    let expired = || {
        st.metrics()
            .work_finished
            .with_label_values(&["P", "expired"])
            .get()
    };
    assert_eq!(expired(), 1);
    // The stale holder cannot end it, and changes nothing by trying.
    assert!(matches!(
        held.finish(|_| async { Ok(()) }).await,
        Err(Error::WorkLost { .. })
    ));
    assert!(matches!(held.cancel().await, Err(Error::WorkLost { .. })));
    assert!(dead.is_expired());
    assert!(matches!(
        dead.claim("P", "kind = machine", 1).await,
        Err(Error::SessionExpired { .. })
    ));
    let e = events(h, &ks[0]).await;
    assert_eq!(
        e.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
        vec![WorkEvent::Started, WorkEvent::Expired, WorkEvent::Started]
    );
    w.finish(|_| async { Ok(()) }).await.unwrap();
    // The sweeper deletes the dead session.
    assert_eq!(st.sweep_sessions().await.unwrap(), 1);
    assert!(st.session_get(dead.id()).await.unwrap().is_none());
    assert_eq!(expired(), 1);
    assert!(st.session_get(alive.id()).await.unwrap().is_some());
}

pub async fn sweeper_expires_held_work(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let ks = machines(h, 2).await;
    let dead = st.session_start(spec("crashy")).await.unwrap();
    let w = dead.claim("P", "kind = machine", 2).await.unwrap();
    assert_eq!(w.len(), 2);
    dead.pause_renewal();
    h.clock.advance(Duration::from_secs(11));
    assert_eq!(st.sweep_sessions().await.unwrap(), 1);
    assert!(st.work_list(None, 10).await.unwrap().is_empty());
    for k in &ks {
        let hist = st
            .history(&HistoryFilter::Object(k.clone()), None, 10)
            .await
            .unwrap()
            .items;
        assert_eq!(hist[0].event, WorkEvent::Expired);
        assert_eq!(hist[0].component, "crashy");
        assert_eq!(hist[0].session_id, dead.id());
    }
    std::mem::forget(w); // their session is gone; dropping would try to cancel
}

pub async fn renewal_failure_shorter_than_ttl_keeps_the_session(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let ks = machines(h, 1).await;
    let s = st.session_start(spec("c")).await.unwrap();
    let mut w = s.claim_object(&ks[0], "P").await.unwrap();
    st.inject_renewal_failures(2);
    for _ in 0..2 {
        h.clock.advance(Duration::from_secs(3));
        assert!(st.renew_sessions().await.is_err());
        assert!(
            !s.is_expired(),
            "a failure before the deadline does not expire the session"
        );
    }
    h.clock.advance(Duration::from_secs(3)); // 9 s after the last renewal: still alive
    st.renew_sessions().await.unwrap();
    h.clock.advance(Duration::from_secs(9)); // would be past the old deadline
    assert!(!s.is_expired());
    w.finish(|_| async { Ok(()) }).await.unwrap();
}

pub async fn renewal_failure_past_the_deadline_expires(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    machines(h, 1).await;
    let s = st.session_start(spec("c")).await.unwrap();
    st.inject_renewal_failures(10);
    h.clock.advance(Duration::from_secs(10));
    assert!(st.renew_sessions().await.is_err());
    assert!(s.is_expired());
    assert!(matches!(
        s.claim("P", "kind = machine", 1).await,
        Err(Error::SessionExpired { .. })
    ));
    let before = st.revision().await.unwrap().current;
    let k = key("default", "machine", "m000");
    let err = s
        .txn(|tx| {
            let k = k.clone();
            async move { tx.tag_set(&k, "t", &json!(1)) }
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SessionExpired { .. }), "{err}");
    assert_eq!(st.revision().await.unwrap().current, before);
}

pub async fn session_writes_check_liveness_in_the_transaction(h: &Harness) {
    let st = &h.store;
    let k = machines(h, 1).await.remove(0);
    let s = st.session_start(spec("c")).await.unwrap();
    s.txn(|tx| {
        let k = k.clone();
        async move { tx.tag_set(&k, "alive", &json!(true)) }
    })
    .await
    .unwrap();
    // Closed by an operator behind its back: the next write is refused inside the transaction.
    st.session_close(s.id()).await.unwrap();
    let err = s
        .txn(|tx| {
            let k = k.clone();
            async move { tx.tag_set(&k, "alive", &json!(false)) }
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SessionExpired { .. }), "{err}");
    assert_eq!(
        st.tag_get(&k, "alive").await.unwrap().unwrap().value,
        json!(true)
    );
}

pub async fn closing_a_session_releases_its_work(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let ks = machines(h, 3).await;
    let s = st.session_start(spec("c")).await.unwrap();
    let held = s.claim("P", "kind = machine", 3).await.unwrap();
    assert_eq!(s.clone().close().await.unwrap(), 3);
    assert!(st.work_list(None, 10).await.unwrap().is_empty());
    for k in &ks {
        let hist = st
            .history(&HistoryFilter::Object(k.clone()), None, 10)
            .await
            .unwrap()
            .items;
        assert_eq!(
            (hist[0].event, hist[0].cause.as_deref()),
            (WorkEvent::Canceled, Some("session closed"))
        );
    }
    std::mem::forget(held);
}

pub async fn dropped_work_is_cancelled(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let ks = machines(h, 1).await;
    let s = st.session_start(spec("c")).await.unwrap();
    drop(s.claim_object(&ks[0], "P").await.unwrap());
    for _ in 0..200 {
        if st.work_list(None, 10).await.unwrap().is_empty() {
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        st.work_list(None, 10).await.unwrap().is_empty(),
        "the dropped claim was cancelled"
    );
    assert_eq!(
        events(h, &ks[0]).await.last().unwrap().0,
        WorkEvent::Canceled
    );
}

/// A claim whose caller gives up while it runs (a timeout, a `select!`) leaves nothing held for
/// nobody: what it took is cancelled, for a claim alone and for the claim of a
/// `finish_and_claim` (whose finish stands).
pub async fn a_claim_given_up_in_flight_is_cancelled(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let ks = machines(h, 2).await;
    let s = st.session_start(spec("c")).await.unwrap();
    // Given up at its first wait: the claim was already on its way. (Had it answered at once,
    // its work would be dropped here, which cancels it too.)
    drop(poll_once(s.claim("P", "kind = machine", 1)));
    let mut first = None;
    for _ in 0..300 {
        let ev: Vec<Vec<WorkEvent>> = events_of(h, &ks).await;
        if let Some(i) = ev
            .iter()
            .position(|e| e == &[WorkEvent::Started, WorkEvent::Canceled])
        {
            first = Some(i);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = first.expect("the given-up claim was made, then cancelled");
    assert!(st.work_list(None, 10).await.unwrap().is_empty());
    // The same for the claim behind a finish.
    let other = &ks[1 - first];
    let mut w = s.claim_object(other, "P").await.unwrap();
    drop(poll_once(w.finish_and_claim(
        |tx| {
            let k = other.clone();
            async move { tx.tag_set(&k, "done", &json!(true)) }
        },
        "P",
        "kind = machine and not has(done)",
        1,
    )));
    let mut settled = false;
    for _ in 0..300 {
        let ev = events_of(h, &ks).await;
        let finished = ev[1 - first].last() == Some(&WorkEvent::Finished);
        if finished && st.work_list(None, 10).await.unwrap().is_empty() && ev[first].len() == 4 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ev = events_of(h, &ks).await;
    assert!(
        settled,
        "the finish stands and its claim was cancelled: {ev:?}"
    );
    assert_eq!(
        ev[first],
        [
            WorkEvent::Started,
            WorkEvent::Canceled,
            WorkEvent::Started,
            WorkEvent::Canceled
        ]
    );
}

/// Poll `f` once, as a caller that gives up at its first wait would, and drop it: its output
/// if it was ready at once.
fn poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// The history events of each of `ks`, oldest first.
async fn events_of(h: &Harness, ks: &[ObjectKey]) -> Vec<Vec<WorkEvent>> {
    let mut out = Vec::new();
    for k in ks {
        out.push(events(h, k).await.into_iter().map(|e| e.0).collect());
    }
    out
}

/// Claims and backoffs page through everything (ordered by process, then object), claims also
/// per session; a cursor that is not one is an error.
pub async fn work_and_backoff_listings_page_through_everything(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    st.process_define("Q", &[]).await.unwrap();
    let ks = machines(h, 3).await;
    let a = st.session_start(spec("a")).await.unwrap();
    let b = st.session_start(spec("b")).await.unwrap();
    let mut held = Vec::new();
    for k in &ks {
        held.push(a.claim_object(k, "P").await.unwrap());
        held.push(b.claim_object(k, "Q").await.unwrap());
    }
    let all = |items: &[fleetdb::WorkInfo]| -> Vec<(String, String)> {
        items
            .iter()
            .map(|w| (w.process.clone(), w.key.id.clone()))
            .collect()
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = st
            .work_page(None, None, cursor.as_deref(), 4)
            .await
            .unwrap();
        pages += 1;
        seen.extend(all(&page.items));
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    assert_eq!(pages, 2);
    let mut want: Vec<(String, String)> = ["P", "Q"]
        .iter()
        .flat_map(|p| ks.iter().map(move |k| (p.to_string(), k.id.clone())))
        .collect();
    want.sort();
    assert_eq!(seen, want, "every claim once, in order");
    let of_b = st.work_page(None, Some(b.id()), None, 2).await.unwrap();
    assert_eq!(of_b.items.len(), 2);
    assert!(of_b.items.iter().all(|w| w.session_id == b.id()));
    let rest = st
        .work_page(None, Some(b.id()), of_b.next.as_deref(), 2)
        .await
        .unwrap();
    assert_eq!((rest.items.len(), rest.next), (1, None));
    assert!(matches!(
        st.work_page(None, None, Some("not-a-cursor"), 2).await,
        Err(Error::Invalid { .. })
    ));
    // Backoffs: fail every claim of P.
    let backoff = Backoff::new(Duration::from_secs(60), Duration::from_secs(60), 1.0).unwrap();
    for mut w in held.into_iter().filter(|w| w.process() == "P") {
        w.fail(&backoff, "down").await.unwrap();
    }
    let first = st
        .backoff_page(Some("P"), fleetdb::BackoffWhich::Active, None, 2)
        .await
        .unwrap();
    let rest = st
        .backoff_page(
            Some("P"),
            fleetdb::BackoffWhich::Active,
            first.next.as_deref(),
            2,
        )
        .await
        .unwrap();
    let ids: Vec<String> = first
        .items
        .iter()
        .chain(&rest.items)
        .map(|b| b.key.id.clone())
        .collect();
    assert_eq!(ids, ks.iter().map(|k| k.id.clone()).collect::<Vec<_>>());
    assert_eq!(rest.next, None);
    assert!(st
        .backoff_page(None, fleetdb::BackoffWhich::Parked, None, 10)
        .await
        .unwrap()
        .items
        .is_empty());
}

pub async fn workers_never_claim_one_object_twice(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let ks = machines(h, 40).await;
    let mut tasks = Vec::new();
    for i in 0..4 {
        let st = st.clone();
        tasks.push(tokio::spawn(async move {
            let s = st.session_start(spec(&format!("w{i}"))).await.unwrap();
            let mut done = Vec::new();
            loop {
                let claimed = s
                    .claim("P", "kind = machine and not has(done)", 3)
                    .await
                    .unwrap();
                if claimed.is_empty() {
                    break;
                }
                for mut w in claimed {
                    let k = w.key().clone();
                    let by = s.id().to_string();
                    w.finish(|tx| {
                        let (k, by) = (k.clone(), by.clone());
                        async move { tx.tag_set(&k, "done", &json!(by)) }
                    })
                    .await
                    .unwrap();
                    done.push(k);
                }
            }
            done
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: BTreeSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), 40, "every object worked exactly once");
    assert_eq!(unique, ks.into_iter().collect());
}

pub async fn claim_wait_wakes_on_a_change(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let s = st.session_start(spec("c")).await.unwrap();
    let waiter = {
        let s = s.clone();
        tokio::spawn(async move {
            s.claim_wait(
                "P",
                "kind = machine and has(ready)",
                1,
                Duration::from_secs(20),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let k = machines(h, 1).await.remove(0);
    st.tag_set(&k, "ready", &json!(true)).await.unwrap();
    // Within a second of the change (issue 3), with a second of slack for a loaded machine.
    let got = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("woke within 2 s of the change")
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].key(), &k);
    // Nothing to claim: returns empty after the timeout.
    let none = s
        .claim_wait("P", "kind = nothing", 1, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(none.is_empty());
}

/// A waiting claim wakes within a second of another process's commit (here: a second `Store` on
/// the same database, which this store hears of only through the revision poll), also when the
/// worker's last claim came back empty and it therefore waits before claiming again; and the
/// waiter's own store's writes that touch no candidate (a key-value) wake nobody for nothing.
pub async fn claim_wait_wakes_on_another_processs_change(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let s = st.session_start(spec("c")).await.unwrap();
    let selector = "kind = machine and has(ready)";
    assert!(s.claim("P", selector, 1).await.unwrap().is_empty());
    let waiter = {
        let s = s.clone();
        tokio::spawn(async move {
            s.claim_wait("P", selector, 1, Duration::from_secs(20))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    st.kv_set("unrelated", "x").await.unwrap();
    let k = machines(h, 1).await.remove(0);
    let other = h.another_process().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "nothing to claim yet");
    other.tag_set(&k, "ready", &json!(true)).await.unwrap();
    let committed = std::time::Instant::now();
    // Within a second, as promised; 2 s allowed for a loaded test machine.
    let got = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .unwrap_or_else(|_| panic!("not woken {:?} after the commit", committed.elapsed()))
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].key(), &k);
}

/// A worker calling `claim_wait` with short timeouts still claims again every
/// `CLAIM_WAIT_RETRY`: a backoff that ends writes nothing, so only that retry finds the object
/// (each call used to skip its first claim after an empty one and time out before the retry).
pub async fn claim_wait_with_short_timeouts_sees_a_backoff_end(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let k = machines(h, 1).await.remove(0);
    st.tag_set(&k, "ready", &json!(true)).await.unwrap();
    let s = st.session_start(spec("c")).await.unwrap();
    let selector = "kind = machine and has(ready)";
    let b = Backoff::new(Duration::from_secs(5), Duration::from_secs(5), 1.0).unwrap();
    let mut w = s.claim_object(&k, "P").await.unwrap();
    w.fail(&b, "not yet").await.unwrap();
    let short = Duration::from_millis(300);
    assert!(s
        .claim_wait("P", selector, 1, short)
        .await
        .unwrap()
        .is_empty());
    h.clock.advance(Duration::from_secs(6));
    // The store's clock moved past the retry since the empty claim: the next call claims at
    // once (the real-time retry alone would wait up to a second of 300 ms calls).
    let got = s.claim_wait("P", selector, 1, short).await.unwrap();
    assert_eq!(got.len(), 1, "claimed once the backoff ended");
    assert_eq!(got[0].key(), &k);
}

/// `claim_wait` with `Duration::MAX` (wait for ever) waits; it does not overflow the clock.
pub async fn claim_wait_for_ever_is_a_wait(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let s = st.session_start(spec("c")).await.unwrap();
    let waiter = {
        let s = s.clone();
        tokio::spawn(async move { s.claim_wait("P", "kind = machine", 1, Duration::MAX).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "still waiting");
    let k = machines(h, 1).await.remove(0);
    let got = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("woke")
        .unwrap()
        .unwrap();
    assert_eq!(got[0].key(), &k);
}

/// BMDB's three workflows as selectors, on hand-built machines, driving listings and counts.
pub async fn bmdb_workflow_selectors(h: &Harness) {
    let st = &h.store;
    let now = crate::START + Duration::from_secs(3600);
    let at = |mins_ago: u64| now - Duration::from_secs(60 * mins_ago);
    // (id, tags with (value, minutes ago))
    type Facts<'a> = Vec<(&'a str, serde_json::Value, u64)>;
    let fleet: Vec<(&str, Facts)> = vec![
        ("fresh", vec![("provided", json!({"provider_id": "a"}), 5)]),
        (
            "started",
            vec![
                ("provided", json!({}), 50),
                ("agent_started", json!({}), 40),
                ("agent_heartbeat", json!({}), 5),
            ],
        ),
        (
            "silent",
            vec![
                ("provided", json!({}), 50),
                ("agent_started", json!({}), 40),
            ],
        ),
        (
            "booting",
            vec![
                ("provided", json!({}), 50),
                ("agent_started", json!({}), 20),
            ],
        ),
        (
            "stale",
            vec![
                ("provided", json!({}), 50),
                ("agent_started", json!({}), 40),
                ("agent_heartbeat", json!({}), 15),
            ],
        ),
        (
            "install",
            vec![
                ("provided", json!({}), 5),
                ("os_install_request", json!({"generation": 2}), 3),
                ("os_install_report", json!({"generation": 1}), 30),
            ],
        ),
        (
            "installed",
            vec![
                ("provided", json!({}), 5),
                ("os_install_request", json!({"generation": 2}), 3),
                ("os_install_report", json!({"generation": 2}), 1),
            ],
        ),
        (
            "first-install",
            vec![
                ("provided", json!({}), 5),
                ("os_install_request", json!({"generation": 1}), 3),
            ],
        ),
    ];
    for (id, tags) in &fleet {
        let k = key("default", "machine", id);
        st.object_put(&k, Labels::new()).await.unwrap();
        for (name, value, ago) in tags {
            h.clock.set(at(*ago));
            st.tag_set(&k, name, value).await.unwrap();
        }
    }
    h.clock.set(now);
    let agent_start = "kind = machine and has(provided) and not has(agent_started) \
        and not (has(os_install_request) and tag(os_install_request).generation != tag(os_install_report).generation)";
    let recovery = "has(agent_started) and ((not has(agent_heartbeat) and updated(agent_started) < now - 30m) \
        or updated(agent_heartbeat) < now - 10m)";
    let install = "has(os_install_request) and tag(os_install_request).generation != tag(os_install_report).generation";
    for (sel, expected) in [
        (agent_start, vec!["fresh", "installed"]),
        (recovery, vec!["silent", "stale"]),
        (install, vec!["first-install", "install"]),
    ] {
        let got: Vec<String> = st
            .select(sel, None, 100)
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|o| o.key.id)
            .collect();
        assert_eq!(got, expected, "{sel}");
        assert_eq!(st.count(sel).await.unwrap(), expected.len() as u64);
    }
    // Claims take exactly what the listings show: the same selector drives both (on
    // PostgreSQL a claim builds its own FROM clause, driven by the first required tag).
    let s = st.session_start(spec("workflows")).await.unwrap();
    for (process, sel, expected) in [
        ("AgentStart", agent_start, vec!["fresh", "installed"]),
        ("Recovery", recovery, vec!["silent", "stale"]),
        ("Install", install, vec!["first-install", "install"]),
    ] {
        st.process_define(process, &[]).await.unwrap();
        let mut got: Vec<String> = Vec::new();
        for mut w in s.claim(process, sel, 100).await.unwrap() {
            got.push(w.key().id.clone());
            w.cancel().await.unwrap();
        }
        got.sort();
        assert_eq!(got, expected, "claimed by {process}: {sel}");
    }
    let err = st.select("has(provided) and", None, 10).await.unwrap_err();
    assert!(err.to_string().contains("selector"), "{err}");
}

/// The SQL every backend generates for selectors agrees with the reference semantics
/// (`Selector::matches`) on a varied fleet and many selectors.
pub async fn selector_sql_agrees_with_reference(h: &Harness) {
    let st = &h.store;
    st.namespace_create("lab", Labels::new()).await.unwrap();
    let values = [
        json!(1),
        json!(2.5),
        json!("a"),
        json!("B"),
        json!(true),
        json!(null),
        json!({"g": 1}),
        json!([1, 2]),
    ];
    let mut n = 0usize;
    for ns in ["default", "lab"] {
        for kind in ["machine", "switch"] {
            for i in 0..6 {
                n += 1;
                let k = key(ns, kind, &format!("o{i}"));
                let mut l = Labels::new();
                if n.is_multiple_of(2) {
                    l.insert(
                        "provider".into(),
                        if n.is_multiple_of(4) {
                            "equinix".into()
                        } else {
                            "ovh".into()
                        },
                    );
                }
                if n.is_multiple_of(3) {
                    l.insert("rack".into(), format!("r{}", n % 5));
                }
                st.object_put(&k, l).await.unwrap();
                h.clock
                    .set(crate::START + Duration::from_secs(60 * (n as u64 % 7)));
                if n % 2 == 1 {
                    st.tag_set(
                        &k,
                        "a",
                        &json!({"g": values[n % values.len()].clone(), "n": n}),
                    )
                    .await
                    .unwrap();
                }
                if n % 3 != 1 {
                    st.tag_set(
                        &k,
                        "b",
                        &json!({"g": values[(n / 2) % values.len()].clone()}),
                    )
                    .await
                    .unwrap();
                }
            }
        }
    }
    let now = crate::START + Duration::from_secs(600);
    h.clock.set(now);
    let selectors = [
        "kind = machine",
        "namespace != lab and kind = switch",
        "label(provider) = \"equinix\"",
        "label(provider) != \"equinix\"",
        "label(rack) in (\"r0\", \"r3\")",
        "label(rack) not in (\"r0\")",
        "has_label(rack) or not has_label(provider)",
        "has(a) and not has(b)",
        "tag(a).g = tag(b).g",
        "tag(a).g != tag(b).g",
        "tag(a).g = 1",
        "tag(a).g > 1",
        "tag(a).g <= 2.5",
        "tag(a).g = \"a\"",
        "tag(a).g < \"a\"",
        "tag(a).g = true",
        "tag(a).g = null",
        "tag(a).g != null",
        "tag(a).n >= 10 and tag(a).n < 20",
        "tag(b) = tag(b)",
        "updated(a) < now - 5m",
        "updated(b) >= now - 3m",
        "not (has(a) or has(b))",
        "not (tag(a).g != tag(b).g)",
    ];
    // Fetch everything once to evaluate the reference semantics.
    let mut all = Vec::new();
    for ns in ["default", "lab"] {
        let objs = st
            .object_list(&fleetdb::ObjectQuery::new(ns).limit(1000))
            .await
            .unwrap()
            .items;
        for o in objs {
            let tags: BTreeMap<String, (serde_json::Value, fleetdb::Timestamp)> = st
                .tag_list(&o.key)
                .await
                .unwrap()
                .into_iter()
                .map(|t| (t.name, (t.value, t.updated_at)))
                .collect();
            all.push((o, tags));
        }
    }
    // Then random compositions of them (and, or, not, nesting), seeded: the SQL of every
    // shape of expression, not only the hand-picked ones. Every fourth is also claimed (a
    // claim builds its own query on PostgreSQL) and must take exactly the matches.
    let mut rng = Rng(0xC0FF_EE15_600D_F00D);
    fn compose(rng: &mut Rng, atoms: &[&str], depth: u32) -> String {
        match if depth == 0 { 0 } else { rng.below(4) } {
            0 => format!("({})", atoms[rng.below(atoms.len() as u64) as usize]),
            1 => format!("not {}", compose(rng, atoms, depth - 1)),
            2 => format!(
                "({} and {})",
                compose(rng, atoms, depth - 1),
                compose(rng, atoms, depth - 1)
            ),
            _ => format!(
                "({} or {})",
                compose(rng, atoms, depth - 1),
                compose(rng, atoms, depth - 1)
            ),
        }
    }
    let mut all_selectors: Vec<String> = selectors.iter().map(|s| s.to_string()).collect();
    for _ in 0..120 {
        all_selectors.push(compose(&mut rng, &selectors, 3));
    }
    st.process_define("Diff", &[]).await.unwrap();
    let claimer = st
        .session_start(SessionSpec::new("diff", "h").ttl(Duration::from_secs(3600)))
        .await
        .unwrap();
    for (i, sel) in all_selectors.iter().enumerate() {
        let sel = sel.as_str();
        let parsed = Selector::parse(sel).unwrap();
        let mut expected: Vec<String> = all
            .iter()
            .filter(|(o, tags)| {
                parsed.matches(
                    &ObjectView {
                        namespace: &o.key.namespace,
                        kind: &o.key.kind,
                        id: &o.key.id,
                        labels: &o.labels,
                        tags,
                    },
                    now,
                )
            })
            .map(|(o, _)| o.key.to_string())
            .collect();
        expected.sort();
        let got: Vec<String> = st
            .select(sel, None, 1000)
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|o| o.key.to_string())
            .collect();
        assert_eq!(got, expected, "selector {sel}");
        assert_eq!(
            st.count(sel).await.unwrap(),
            expected.len() as u64,
            "count {sel}"
        );
        if i % 4 == 3 {
            let mut works = claimer.claim("Diff", sel, 1000).await.unwrap();
            let mut claimed: Vec<String> = works.iter().map(|w| w.key().to_string()).collect();
            claimed.sort();
            assert_eq!(claimed, expected, "claim {sel}");
            claimer.finish_many(&mut works).await.unwrap();
        }
    }
}

pub async fn metrics_count_sessions_work_and_transactions(h: &Harness) {
    let st = &h.store;
    let m = st.metrics();
    st.process_define("P", &[]).await.unwrap();
    machines(h, 3).await;
    let s = st.session_start(spec("c")).await.unwrap();
    let mut got = s.claim("P", "kind = machine", 3).await.unwrap();
    got[0].finish(|_| async { Ok(()) }).await.unwrap();
    got[1]
        .fail(
            &Backoff::new(Duration::from_secs(60), Duration::from_secs(60), 1.0).unwrap(),
            "x",
        )
        .await
        .unwrap();
    st.metrics_refresh().await.unwrap();
    assert_eq!(m.sessions_started.get(), 1);
    assert_eq!(m.work_started.with_label_values(&["P"]).get(), 3);
    assert_eq!(
        m.work_finished.with_label_values(&["P", "finished"]).get(),
        1
    );
    assert_eq!(m.work_finished.with_label_values(&["P", "failed"]).get(), 1);
    assert_eq!(m.work_active.with_label_values(&["P"]).get(), 1);
    assert_eq!(m.backoffs_active.with_label_values(&["P"]).get(), 1);
    assert!(m.transactions_executed.get() >= 6);
    got[2].cancel().await.unwrap();
    h.clock.advance(Duration::from_secs(61));
    st.metrics_refresh().await.unwrap();
    assert_eq!(m.work_active.with_label_values(&["P"]).get(), 0);
    assert_eq!(
        m.backoffs_active.with_label_values(&["P"]).get(),
        0,
        "an expired backoff is not active"
    );
    s.close().await.unwrap();
    assert_eq!(m.sessions_closed.get(), 1);
    let text = m.encode();
    assert!(
        text.contains("fleetdb_work_finished_total{process=\"P\",result=\"canceled\"} 1"),
        "{text}"
    );
    // Every transaction's duration is observed, by kind: the machines' creation, the finish,
    // fail and cancel are writes, the claim a claim; a finish with the next claim is one more.
    let count = |kind: &str| {
        m.transaction_seconds
            .with_label_values(&[kind])
            .get_sample_count()
    };
    assert!(count("write") >= 6, "writes observed: {}", count("write"));
    assert_eq!(count("claim"), 1);
    assert_eq!(count("write_and_claim"), 0);
    // All three machines are free again (the backoff is over): one finish with the next claim.
    let s = st.session_start(spec("c2")).await.unwrap();
    let mut w = s.claim("P", "kind = machine", 1).await.unwrap().remove(0);
    let (_, next) = w
        .finish_and_claim(|_| async { Ok(()) }, "P", "kind = machine", 1)
        .await
        .unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(count("claim"), 2);
    assert_eq!(count("write_and_claim"), 1);
    let text = m.encode();
    assert!(
        text.contains("fleetdb_transaction_duration_seconds_count{kind=\"write_and_claim\"} 1"),
        "{text}"
    );
    s.close().await.unwrap();
    // Every other way a claim ends is counted once, where it ends: an operator's cancel
    // (`canceled`; the holder that then finds it lost counts nothing), and a crashed worker's
    // claim released by the sweeper (`expired`).
    let finished = |r: &str| m.work_finished.with_label_values(&["P", r]).get();
    let (canceled, expired) = (finished("canceled"), finished("expired"));
    let s = st.session_start(spec("c3")).await.unwrap();
    let mut held = s.claim("P", "kind = machine", 2).await.unwrap();
    assert!(st.work_cancel(held[0].key(), "P").await.unwrap());
    assert!(matches!(
        held[0].finish(|_| async { Ok(()) }).await,
        Err(Error::WorkLost { .. })
    ));
    assert!(matches!(
        held[0].cancel().await,
        Err(Error::WorkLost { .. })
    ));
    assert_eq!(finished("canceled"), canceled + 1);
    assert_eq!(finished("expired"), expired);
    std::mem::forget(held.pop()); // the crashed worker: no outcome, no cancel
    std::mem::forget(held);
    std::mem::forget(s); // its session stops renewing
    h.clock.advance(Duration::from_secs(11));
    let sessions_expired = m.sessions_expired.get();
    // The store's renewal finds the session gone too: counted once, by the sweep.
    st.renew_sessions().await.unwrap();
    st.sweep_sessions().await.unwrap();
    st.renew_sessions().await.unwrap();
    assert_eq!(finished("expired"), expired + 1);
    assert_eq!(m.sessions_expired.get(), sessions_expired + 1);
    // A session closed with claims held: each released claim counts `canceled`, the close
    // `closed`, not `expired`.
    let (canceled, closed) = (finished("canceled"), m.sessions_closed.get());
    st.process_define("Q", &[]).await.unwrap();
    let s = st.session_start(spec("c4")).await.unwrap();
    let a = s.claim("P", "kind = machine", 2).await.unwrap();
    let b = s.claim("Q", "kind = machine", 1).await.unwrap();
    assert_eq!((a.len(), b.len()), (2, 1));
    assert_eq!(s.clone().close().await.unwrap(), 3);
    assert_eq!(finished("canceled"), canceled + 2);
    assert_eq!(
        m.work_finished.with_label_values(&["Q", "canceled"]).get(),
        1
    );
    assert_eq!(m.sessions_closed.get(), closed + 1);
    st.renew_sessions().await.unwrap();
    assert_eq!(m.sessions_expired.get(), sessions_expired + 1);
    // A transaction refused (here a fenced write whose claim is not held) counts as failed;
    // none was retried in this single-caller test.
    let failed = m.transactions_failed.get();
    let fence = fleetdb::Fence {
        key: key("default", "machine", "m000"),
        process: "P".into(),
        session_id: "gone".into(),
        token: 1,
    };
    let r = st
        .txn_fenced(&fence, |tx| {
            let k = fence.key.clone();
            async move { tx.tag_set(&k, "x", &serde_json::json!(1)) }
        })
        .await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(m.transactions_failed.get(), failed + 1);
    assert_eq!(m.transactions_retried.get(), 0);
    drop((a, b));
    // A crashed worker's claim taken over by a claim of the object by name, before any sweep:
    // `expired` once, where it ended.
    let expired = finished("expired");
    let crashed = st.session_start(spec("c5")).await.unwrap();
    let k = key("default", "machine", "m000");
    std::mem::forget(crashed.claim_object(&k, "P").await.unwrap());
    crashed.pause_renewal();
    h.clock.advance(Duration::from_secs(11));
    let rescuer = st.session_start(spec("c6")).await.unwrap();
    rescuer.claim_object(&k, "P").await.unwrap();
    assert_eq!(finished("expired"), expired + 1);
    st.sweep_sessions().await.unwrap();
    assert_eq!(finished("expired"), expired + 1);
}

pub async fn finish_many_is_all_or_nothing(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    machines(h, 5).await;
    let s = st.session_start(spec("c")).await.unwrap();
    let mut got = s.claim("P", "kind = machine", 5).await.unwrap();
    // One of them is lost (closed behind the session's back and re-claimed by another session):
    // the whole batch fails and the others stay held.
    let other = st.session_start(spec("other")).await.unwrap();
    let k = got[4].key().clone();
    assert!(
        st.work_cancel(&k, "P").await.unwrap(),
        "an operator force-cancels one"
    );
    assert!(!st.work_cancel(&k, "P").await.unwrap());
    let taken = other.claim_object(&k, "P").await.unwrap();
    let hist = st
        .history(&HistoryFilter::Object(k.clone()), None, 10)
        .await
        .unwrap()
        .items;
    assert_eq!(
        (hist[1].event, hist[1].cause.as_deref()),
        (WorkEvent::Canceled, Some("canceled by operator"))
    );
    assert!(matches!(
        s.finish_many(&mut got).await,
        Err(Error::WorkLost { .. })
    ));
    assert_eq!(
        st.work_list(None, 10).await.unwrap().len(),
        5,
        "4 still held by s, 1 by other"
    );
    let mut four: Vec<_> = got.drain(..4).collect();
    s.finish_many(&mut four).await.unwrap();
    let left = st.work_list(None, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].session_id, other.id());
    drop(taken);
    std::mem::forget(got);
}

/// `finish_many_with`: the caller's writes and every release commit together; a stale token on
/// one claim fails the whole batch (the writes are not applied, every claim is still held), and
/// the batch then succeeds without it, with Finished history for each.
/// A transaction of many tag deletes (applied as one set by backends that can) decides exactly
/// what deleting them one by one does: a missing tag anywhere fails the whole transaction and
/// changes nothing; otherwise one change-log row per tag, in order, with its old value.
pub async fn many_tag_deletes_in_one_transaction(h: &Harness) {
    let st = &h.store;
    let keys = machines(h, 5).await;
    for (i, k) in keys.iter().enumerate() {
        st.tag_set(k, "todo", &json!({"n": i})).await.unwrap();
    }
    let before = st.revision().await.unwrap().current;
    // The fourth object lacks the tag: nothing is deleted.
    st.tag_delete(&keys[3], "todo").await.unwrap();
    let after_single = st.revision().await.unwrap().current;
    let r = st
        .txn(|tx| {
            let keys = keys.clone();
            async move {
                for k in &keys {
                    tx.tag_delete(k, "todo")?;
                }
                Ok(())
            }
        })
        .await;
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            st.tag_get(k, "todo").await.unwrap().is_some(),
            i != 3,
            "{k}"
        );
    }
    // Without it, every delete lands, each with its own revision and old value, in order.
    let rest: Vec<ObjectKey> = keys
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, k)| k.clone())
        .collect();
    st.txn(|tx| {
        let rest = rest.clone();
        async move {
            for k in &rest {
                tx.tag_delete(k, "todo")?;
            }
            Ok(())
        }
    })
    .await
    .unwrap();
    let changes = st
        .changes(after_single, &fleetdb::ChangeFilter::default(), 100)
        .await
        .unwrap();
    let deletes: Vec<_> = changes
        .iter()
        .filter(|c| c.entity == fleetdb::Entity::Tag)
        .collect();
    assert_eq!(deletes.len(), 4, "{changes:?}");
    for (c, k) in deletes.iter().zip(&rest) {
        assert_eq!(
            (c.kind.as_str(), c.id.as_str()),
            (k.kind.as_str(), k.id.as_str())
        );
        assert_eq!(c.op, fleetdb::ChangeOp::Delete);
        let n = keys.iter().position(|x| x == k).unwrap();
        assert_eq!(c.old_value, Some(json!({"n": n})), "{c:?}");
        assert!(c.revision > before);
    }
    assert!(deletes.windows(2).all(|w| w[0].revision < w[1].revision));
}

/// Creating an object with its tags in one transaction (a fast path on some backends): the
/// object and its tags get increasing revisions in op order with one change row each; the same
/// transaction on an existing object merges its labels and updates its tags; a missing
/// namespace or an existing object under `object_create` fails and writes nothing.
pub async fn object_with_tags_in_one_transaction(h: &Harness) {
    let st = &h.store;
    let k = key("default", "job", "j-new");
    let before = st.revision().await.unwrap().current;
    let put = |k: ObjectKey, create: bool, label: &'static str, x: i64| {
        st.txn(move |tx| {
            let k = k.clone();
            async move {
                let mut labels = Labels::new();
                labels.insert("l".to_string(), label.to_string());
                if create {
                    tx.object_create(&k, labels)?;
                } else {
                    tx.object_put(&k, labels)?;
                }
                tx.tag_set(&k, "x", &json!(x))?;
                tx.tag_set(&k, "y", &json!({"x": x}))
            }
        })
    };
    put(k.clone(), false, "a", 1).await.unwrap();
    let obj = st.object_get(&k).await.unwrap().unwrap();
    assert_eq!(obj.labels.get("l").map(String::as_str), Some("a"));
    let x = st.tag_get(&k, "x").await.unwrap().unwrap();
    let y = st.tag_get(&k, "y").await.unwrap().unwrap();
    assert_eq!(
        (x.value.clone(), y.value.clone()),
        (json!(1), json!({"x": 1}))
    );
    assert!(before < obj.revision && obj.revision < x.revision && x.revision < y.revision);
    let changes = st
        .changes(before, &fleetdb::ChangeFilter::default(), 100)
        .await
        .unwrap();
    let mine: Vec<_> = changes.iter().filter(|c| c.id == "j-new").collect();
    assert_eq!(mine.len(), 3, "{changes:?}");
    assert_eq!(
        mine.iter()
            .map(|c| (c.entity, c.name.as_str(), c.revision))
            .collect::<Vec<_>>(),
        vec![
            (fleetdb::Entity::Object, "", obj.revision),
            (fleetdb::Entity::Tag, "x", x.revision),
            (fleetdb::Entity::Tag, "y", y.revision),
        ]
    );
    assert_eq!(mine[0].new_value, Some(json!({"labels": {"l": "a"}})));
    assert_eq!(mine[1].old_value, None);
    // Again on the existing object: labels merged, tags updated with their old values.
    put(k.clone(), false, "b", 2).await.unwrap();
    let obj2 = st.object_get(&k).await.unwrap().unwrap();
    assert_eq!(obj2.labels.get("l").map(String::as_str), Some("b"));
    assert_eq!(obj2.created_at, obj.created_at);
    assert_eq!(st.tag_get(&k, "x").await.unwrap().unwrap().value, json!(2));
    // Create on an existing object fails and changes nothing.
    let r = put(k.clone(), true, "c", 3).await;
    assert!(matches!(r, Err(Error::AlreadyExists { .. })), "{r:?}");
    assert_eq!(st.tag_get(&k, "x").await.unwrap().unwrap().value, json!(2));
    // A missing namespace: NotFound, nothing written.
    let nowhere = key("nowhere", "job", "j1");
    let r = put(nowhere.clone(), false, "a", 1).await;
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    let r = put(nowhere.clone(), true, "a", 1).await;
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
}

/// Many objects with their tags in one transaction (a fleet import; PostgreSQL writes it as one
/// statement): revisions and change-log rows in op order, and all or nothing when an object
/// exists (`Create`) or a namespace is missing; upserts of existing objects merge.
pub async fn objects_with_tags_in_bulk(h: &Harness) {
    let st = &h.store;
    let ids = |prefix: &str, n: usize| -> Vec<ObjectKey> {
        (0..n)
            .map(|i| key("default", "job", &format!("{prefix}{i:03}")))
            .collect()
    };
    // keys[i] with label l=`label`, tags x = i and y = {"x": i} (none for every third key).
    let bulk = |keys: Vec<ObjectKey>, create: bool, label: &'static str| {
        st.txn(move |tx| {
            let keys = keys.clone();
            async move {
                for (i, k) in keys.iter().enumerate() {
                    let labels = crate::labels(&[("l", label)]);
                    if create {
                        tx.object_create(k, labels)?;
                    } else {
                        tx.object_put(k, labels)?;
                    }
                    if i % 3 != 2 || !create {
                        tx.tag_set(k, "x", &json!(i))?;
                        tx.tag_set(k, "y", &json!({ "x": i }))?;
                    }
                }
                Ok(())
            }
        })
    };
    let changes_after = |r: fleetdb::Revision| async move {
        st.changes(r, &fleetdb::ChangeFilter::default(), 1000)
            .await
            .unwrap()
    };

    // New objects: every op has its revision and change-log row, in op order.
    let before = st.revision().await.unwrap().current;
    let keys = ids("a", 6);
    bulk(keys.clone(), true, "a").await.unwrap();
    let mut expected = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let obj = st.object_get(k).await.unwrap().unwrap();
        assert_eq!(obj.labels, crate::labels(&[("l", "a")]));
        expected.push((
            k.id.clone(),
            fleetdb::Entity::Object,
            String::new(),
            obj.revision,
        ));
        for name in ["x", "y"] {
            match st.tag_get(k, name).await.unwrap() {
                Some(t) if i % 3 != 2 => {
                    let want = if name == "x" {
                        json!(i)
                    } else {
                        json!({ "x": i })
                    };
                    assert_eq!(t.value, want);
                    expected.push((
                        k.id.clone(),
                        fleetdb::Entity::Tag,
                        name.to_string(),
                        t.revision,
                    ));
                }
                None if i % 3 == 2 => {}
                other => panic!("tag {name} of {k}: {other:?}"),
            }
        }
    }
    let changes = changes_after(before).await;
    let got: Vec<_> = changes
        .iter()
        .map(|c| (c.id.clone(), c.entity, c.name.clone(), c.revision))
        .collect();
    assert_eq!(got, expected, "one change per op, revisions in op order");
    let revs: Vec<_> = expected.iter().map(|e| e.3).collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");
    assert_eq!(changes[0].new_value, Some(json!({"labels": {"l": "a"}})));
    assert_eq!(changes[1].new_value, Some(json!(0)));

    // One object exists: a create batch fails whole and writes nothing.
    let at = st.revision().await.unwrap().current;
    let mut clash = ids("b", 3);
    clash.insert(1, keys[4].clone());
    let r = bulk(clash.clone(), true, "b").await;
    assert!(matches!(r, Err(Error::AlreadyExists { .. })), "{r:?}");
    for k in &clash {
        let o = st.object_get(k).await.unwrap();
        if *k == keys[4] {
            assert_eq!(o.unwrap().labels, crate::labels(&[("l", "a")]));
        } else {
            assert!(o.is_none(), "{k} was written by a failed batch");
        }
    }
    assert_eq!(
        st.tag_get(&keys[4], "x").await.unwrap().unwrap().value,
        json!(4)
    );
    assert!(changes_after(at).await.is_empty());

    // The same as upserts: the existing object is merged (created_at kept), the rest created.
    let created = st.object_get(&keys[4]).await.unwrap().unwrap().created_at;
    h.clock.advance(Duration::from_secs(5));
    bulk(clash.clone(), false, "c").await.unwrap();
    for (i, k) in clash.iter().enumerate() {
        let o = st.object_get(k).await.unwrap().unwrap();
        assert_eq!(o.labels, crate::labels(&[("l", "c")]));
        assert_eq!(st.tag_get(k, "x").await.unwrap().unwrap().value, json!(i));
        if *k == keys[4] {
            assert_eq!(o.created_at, created);
            assert!(o.updated_at > created);
        }
    }

    // A missing namespace anywhere in the batch: NotFound, nothing written.
    let at = st.revision().await.unwrap().current;
    let mut lost = ids("d", 3);
    lost.push(key("nowhere", "job", "d9"));
    for create in [true, false] {
        let r = bulk(lost.clone(), create, "d").await;
        assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    }
    for k in &lost[..3] {
        assert!(st.object_get(k).await.unwrap().is_none());
    }
    assert!(changes_after(at).await.is_empty());

    // Upserts of existing objects in bulk: labels merged (an empty value deletes one), identical
    // labels and tag values change nothing, the rest get revisions and change rows in op order.
    let at = st.revision().await.unwrap().current;
    let y0 = st.tag_get(&keys[0], "y").await.unwrap().unwrap();
    let k = keys.clone();
    st.txn(move |tx| {
        let k = k.clone();
        async move {
            tx.object_put(&k[0], crate::labels(&[("l", "a")]))?;
            tx.tag_set(&k[0], "x", &json!(0))?;
            tx.tag_set(&k[0], "y", &json!("new"))?;
            tx.object_put(&k[1], crate::labels(&[("l", ""), ("z", "1")]))?;
            tx.tag_set(&k[1], "x", &json!(100))?;
            tx.object_put(&k[2], crate::labels(&[("z", "2")]))
        }
    })
    .await
    .unwrap();
    let got: Vec<_> = changes_after(at)
        .await
        .iter()
        .map(|c| {
            (
                c.id.clone(),
                c.name.clone(),
                c.old_value.clone(),
                c.new_value.clone(),
            )
        })
        .collect();
    let s = |v: &str| v.to_string();
    assert_eq!(
        got,
        vec![
            (s("a000"), s("y"), Some(json!({"x": 0})), Some(json!("new"))),
            (
                s("a001"),
                s(""),
                Some(json!({"labels": {"l": "a"}})),
                Some(json!({"labels": {"z": "1"}}))
            ),
            (s("a001"), s("x"), Some(json!(1)), Some(json!(100))),
            (
                s("a002"),
                s(""),
                Some(json!({"labels": {"l": "a"}})),
                Some(json!({"labels": {"l": "a", "z": "2"}}))
            ),
        ]
    );
    let o0 = st.object_get(&keys[0]).await.unwrap().unwrap();
    assert!(
        o0.revision < y0.revision,
        "an identical put keeps its revision"
    );
    assert!(st.tag_get(&keys[0], "x").await.unwrap().unwrap().revision < at);
    let o1 = st.object_get(&keys[1]).await.unwrap().unwrap();
    assert_eq!(o1.labels, crate::labels(&[("z", "1")]));
    assert!(o1.updated_at > o1.created_at);

    // Racing creates of overlapping batches: one wins whole, the other fails whole.
    for round in 0..4 {
        let common = ids(&format!("r{round}c"), 10);
        let mut left = ids(&format!("r{round}l"), 10);
        let mut right = ids(&format!("r{round}r"), 10);
        left.extend(common.iter().cloned());
        right.splice(0..0, common.iter().cloned());
        let (a, b) = tokio::join!(
            bulk(left.clone(), true, "l"),
            bulk(right.clone(), true, "r")
        );
        let (won, lost) = match (&a, &b) {
            (Ok(()), Err(Error::AlreadyExists { .. })) => (&left, &right),
            (Err(Error::AlreadyExists { .. }), Ok(())) => (&right, &left),
            other => panic!("round {round}: {other:?}"),
        };
        let label = if won == &left { "l" } else { "r" };
        for k in won {
            let o = st.object_get(k).await.unwrap().unwrap();
            assert_eq!(o.labels, crate::labels(&[("l", label)]), "{k}");
        }
        for k in lost.iter().filter(|k| !common.contains(k)) {
            assert!(st.object_get(k).await.unwrap().is_none(), "{k}");
        }
    }
}

/// Tag sets of many existing objects in one transaction (PostgreSQL: one statement): new and
/// changed values get revisions and change-log rows in op order, identical ones are no-ops, and
/// a missing object fails the whole batch.
pub async fn tag_sets_in_bulk(h: &Harness) {
    let st = &h.store;
    let keys: Vec<ObjectKey> = (0..4)
        .map(|i| key("default", "machine", &format!("m{i}")))
        .collect();
    for k in &keys {
        st.object_put(k, Labels::new()).await.unwrap();
        st.tag_set(k, "state", &json!("new")).await.unwrap();
    }
    let set_all = |sets: Vec<(ObjectKey, &'static str, serde_json::Value)>| {
        st.txn(move |tx| {
            let sets = sets.clone();
            async move {
                for (k, name, value) in &sets {
                    tx.tag_set(k, name, value)?;
                }
                Ok(())
            }
        })
    };
    let before = st.revision().await.unwrap().current;
    let kept = st.tag_get(&keys[1], "state").await.unwrap().unwrap();
    set_all(vec![
        (keys[0].clone(), "state", json!("ready")),
        (keys[1].clone(), "state", json!("new")), // identical: a no-op
        (keys[2].clone(), "owner", json!({"team": "a"})),
        (keys[0].clone(), "owner", json!({"team": "b"})),
    ])
    .await
    .unwrap();
    assert_eq!(st.tag_get(&keys[1], "state").await.unwrap().unwrap(), kept);
    let changes = st
        .changes(before, &fleetdb::ChangeFilter::default(), 100)
        .await
        .unwrap();
    let got: Vec<_> = changes
        .iter()
        .map(|c| {
            (
                c.id.as_str(),
                c.name.as_str(),
                c.old_value.clone(),
                c.new_value.clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("m0", "state", Some(json!("new")), Some(json!("ready"))),
            ("m2", "owner", None, Some(json!({"team": "a"}))),
            ("m0", "owner", None, Some(json!({"team": "b"}))),
        ]
    );
    assert!(changes.windows(2).all(|w| w[0].revision < w[1].revision));
    for (c, (k, name)) in changes.iter().zip([
        (&keys[0], "state"),
        (&keys[2], "owner"),
        (&keys[0], "owner"),
    ]) {
        let t = st.tag_get(k, name).await.unwrap().unwrap();
        assert_eq!(
            (t.revision, Some(t.value)),
            (c.revision, c.new_value.clone())
        );
    }

    // A missing object anywhere: NotFound, nothing written.
    let at = st.revision().await.unwrap().current;
    let r = set_all(vec![
        (keys[3].clone(), "state", json!("gone")),
        (key("default", "machine", "nope"), "state", json!("x")),
    ])
    .await;
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    assert_eq!(
        st.tag_get(&keys[3], "state").await.unwrap().unwrap().value,
        json!("new")
    );
    assert!(st
        .changes(at, &fleetdb::ChangeFilter::default(), 100)
        .await
        .unwrap()
        .is_empty());

    // Racing bulk sets of the same tags both commit, one after the other.
    let at = st.revision().await.unwrap().current;
    let sets = |v: &'static str| keys.iter().map(|k| (k.clone(), "race", json!(v))).collect();
    let (a, b) = tokio::join!(set_all(sets("a")), set_all(sets("b")));
    a.unwrap();
    b.unwrap();
    let changes = st
        .changes(at, &fleetdb::ChangeFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(changes.len(), 8, "{changes:?}");
    let last = changes[7].new_value.clone();
    for k in &keys {
        assert_eq!(
            Some(st.tag_get(k, "race").await.unwrap().unwrap().value),
            last
        );
    }
}

/// Many lone writes at once (each a transaction of its own: an object created with its tags, or
/// one tag set), as a busy server's clients or a queue's producers send them: each answers as it
/// would alone, whatever the backend makes of the concurrency (PostgreSQL shares their
/// transactions, SQLite commits them in groups) — one of two creates of an object wins, a missing
/// namespace or object is `NotFound`, an identical value is a no-op, every change is in the
/// change log once, in each write's op order.
pub async fn lone_writes_at_once_answer_as_alone(h: &Harness) {
    let st = &h.store;
    for i in 0..20 {
        let k = key("default", "job", &format!("old{i}"));
        st.object_put(&k, Labels::new()).await.unwrap();
        st.tag_set(&k, "a", &json!(1)).await.unwrap();
    }
    let before = st.revision().await.unwrap().current;
    let create = |ns: &'static str, id: String| async move {
        let k = key(ns, "job", &id);
        let k2 = k.clone();
        st.txn(move |tx| {
            let k = k.clone();
            async move {
                tx.object_create(&k, Labels::new())?;
                tx.tag_set(&k, "a", &json!(1))?;
                tx.tag_set(&k, "b", &json!({ "id": k.id }))
            }
        })
        .await
        .map(|()| k2)
    };
    let set = |id: String, value: serde_json::Value| async move {
        st.tag_set(&key("default", "job", &id), "a", &value).await
    };
    let creates = futures::future::join_all(
        (0..60)
            .map(|i| create("default", format!("new{i}")))
            .chain((0..8).flat_map(|i| {
                [
                    create("default", format!("twice{i}")),
                    create("default", format!("twice{i}")),
                ]
            }))
            .chain((0..4).map(|i| create("nowhere", format!("x{i}")))),
    );
    let sets = futures::future::join_all(
        (0..20)
            .map(|i| set(format!("old{i}"), json!(1 + i % 2)))
            .chain((0..4).map(|i| set(format!("gone{i}"), json!(2)))),
    );
    let (created, tagged) = futures::join!(creates, sets);
    let mut won = 0;
    for (i, r) in created.iter().enumerate() {
        match (i, r) {
            (0..60, Ok(_)) => {}
            (60..76, Ok(_)) => won += 1,
            (60..76, Err(Error::AlreadyExists { .. })) => {}
            (76.., Err(Error::NotFound { .. })) => {}
            (i, r) => panic!("create {i}: {r:?}"),
        }
    }
    assert_eq!(won, 8, "one of each pair of creates of one object wins");
    let mut changed_sets = 0;
    for (i, r) in tagged.iter().enumerate() {
        match (i, r) {
            (0..20, Ok(w)) => {
                assert_eq!(w.item.value, json!(1 + i % 2));
                assert_eq!(
                    w.changed,
                    i % 2 == 1,
                    "tag set {i}: an identical value is a no-op"
                );
                if w.changed {
                    changed_sets += 1;
                } else {
                    assert!(w.item.revision <= before);
                }
            }
            (20.., Err(Error::NotFound { .. })) => {}
            (i, r) => panic!("tag set {i}: {r:?}"),
        }
    }
    let changes = st
        .changes(before, &fleetdb::ChangeFilter::default(), 10_000)
        .await
        .unwrap();
    // Every new object: the object and its two tags; every changed value: one row.
    assert_eq!(changes.len(), (60 + 8) * 3 + changed_sets);
    assert!(changes.windows(2).all(|w| w[0].revision < w[1].revision));
    let mut per_object: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in &changes {
        per_object
            .entry(c.id.clone())
            .or_default()
            .push(c.name.clone());
    }
    for (id, names) in &per_object {
        if !id.starts_with("old") {
            assert_eq!(
                names,
                &["", "a", "b"],
                "{id}: object, then its tags in op order"
            );
        }
    }
    for (k, _) in created
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|k| (k, ()))
    {
        let b = st
            .tag_get(k, "b")
            .await
            .unwrap()
            .expect("created with its tags");
        assert_eq!(b.value, json!({ "id": k.id }));
    }
    assert!(st
        .object_get(&key("default", "job", "gone0"))
        .await
        .unwrap()
        .is_none());
}

/// Many objects deleted in one transaction (PostgreSQL: a read and a write statement): each
/// object's tags go first (in name order), then the object, objects in op order; a missing
/// object fails the whole batch and deletes nothing.
pub async fn objects_deleted_in_bulk(h: &Harness) {
    let st = &h.store;
    let keys: Vec<ObjectKey> = (0..3)
        .map(|i| key("default", "machine", &format!("d{i}")))
        .collect();
    for (i, k) in keys.iter().enumerate() {
        st.object_put(k, crate::labels(&[("rack", "r1")]))
            .await
            .unwrap();
        for name in ["b", "a"].iter().take(2 - i.min(2)) {
            st.tag_set(k, name, &json!(i)).await.unwrap();
        }
    }
    let delete = |ks: Vec<ObjectKey>| {
        st.txn(move |tx| {
            let ks = ks.clone();
            async move {
                for k in &ks {
                    tx.object_delete(k)?;
                }
                Ok(())
            }
        })
    };
    let at = st.revision().await.unwrap().current;
    let r = delete(vec![keys[0].clone(), key("default", "machine", "nope")]).await;
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    assert!(st.object_get(&keys[0]).await.unwrap().is_some());
    assert_eq!(st.tag_list(&keys[0]).await.unwrap().len(), 2);
    delete(vec![keys[1].clone(), keys[0].clone(), keys[2].clone()])
        .await
        .unwrap();
    for k in &keys {
        assert!(st.object_get(k).await.unwrap().is_none());
        assert!(st.tag_get(k, "a").await.unwrap().is_none());
    }
    let got: Vec<_> = st
        .changes(at, &fleetdb::ChangeFilter::default(), 100)
        .await
        .unwrap()
        .iter()
        .map(|c| {
            (
                c.id.clone(),
                c.entity,
                c.name.clone(),
                c.op,
                c.old_value.clone(),
            )
        })
        .collect();
    use fleetdb::{ChangeOp::Delete, Entity};
    let s = |v: &str| v.to_string();
    let rack = Some(json!({"labels": {"rack": "r1"}}));
    assert_eq!(
        got,
        vec![
            (s("d1"), Entity::Tag, s("b"), Delete, Some(json!(1))),
            (s("d1"), Entity::Object, s(""), Delete, rack.clone()),
            (s("d0"), Entity::Tag, s("a"), Delete, Some(json!(0))),
            (s("d0"), Entity::Tag, s("b"), Delete, Some(json!(0))),
            (s("d0"), Entity::Object, s(""), Delete, rack.clone()),
            (s("d2"), Entity::Object, s(""), Delete, rack),
        ]
    );
}

pub async fn finish_many_with_writes_is_atomic(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let keys = machines(h, 4).await;
    for k in &keys {
        st.tag_set(k, "todo", &json!(true)).await.unwrap();
    }
    let s = st.session_start(spec("c")).await.unwrap();
    let mut got = s.claim("P", "has(todo)", 4).await.unwrap();
    assert_eq!(got.len(), 4);
    let claimed: Vec<ObjectKey> = got.iter().map(|w| w.key().clone()).collect();
    // One claim goes stale: force-cancelled and taken by another session.
    let other = st.session_start(spec("other")).await.unwrap();
    let stale = claimed[3].clone();
    assert!(st.work_cancel(&stale, "P").await.unwrap());
    let taken = other.claim_object(&stale, "P").await.unwrap();
    let r = s
        .finish_many_with(&mut got, |tx| {
            let claimed = claimed.clone();
            async move {
                for k in &claimed {
                    tx.tag_delete(k, "todo")?;
                }
                Ok(7)
            }
        })
        .await;
    assert!(matches!(r, Err(Error::WorkLost { .. })), "{r:?}");
    for k in &claimed {
        assert!(
            st.tag_get(k, "todo").await.unwrap().is_some(),
            "no caller write of a failed batch is applied"
        );
    }
    let held = st.work_list(Some("P"), 10).await.unwrap();
    assert_eq!(held.len(), 4, "3 still held by s, 1 by other: {held:?}");
    assert_eq!(held.iter().filter(|w| w.session_id == s.id()).count(), 3);
    // Without the stale one, the batch commits: writes, releases and history together.
    let mut three: Vec<_> = got.drain(..3).collect();
    let done = claimed[..3].to_vec();
    let n = s
        .finish_many_with(&mut three, |tx| {
            let done = done.clone();
            async move {
                for k in &done {
                    tx.tag_delete(k, "todo")?;
                }
                Ok(done.len())
            }
        })
        .await
        .unwrap();
    assert_eq!(n, 3);
    for k in &done {
        assert!(st.tag_get(k, "todo").await.unwrap().is_none());
        let ev = events(h, k).await;
        assert_eq!(
            ev.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
            vec![WorkEvent::Started, WorkEvent::Finished],
            "{ev:?}"
        );
    }
    let left = st.work_list(Some("P"), 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].session_id, other.id());
    // Ended claims cannot be finished again.
    assert!(matches!(
        s.finish_many_with(&mut three, |_| async { Ok(()) }).await,
        Err(Error::WorkLost { .. })
    ));
    drop(taken);
    std::mem::forget(got);
}

/// A tiny deterministic PRNG (xorshift), so a failing sequence is reproducible from its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Model-based test: random interleavings of claim / finish / cancel / fail / pause renewal /
/// advance clock / sweep, checked after every step against a simple in-memory model of who holds
/// what, which backoffs are active, and which sessions are alive.
pub async fn work_matches_a_model_under_random_operations(h: &Harness) {
    work_model(h, 0x9E37_79B9_7F4A_7C15).await;
}

/// [`work_matches_a_model_under_random_operations`] with other sequences.
pub async fn work_matches_a_model_seed_2(h: &Harness) {
    work_model(h, 0xD1B5_4A32_D192_ED03).await;
}

/// [`work_matches_a_model_under_random_operations`] with other sequences.
pub async fn work_matches_a_model_seed_3(h: &Harness) {
    work_model(h, 0x8CB9_2BA7_2F3D_8DD7).await;
}

/// The model's claims: (object index, process) -> (session index, token).
type Held = std::collections::HashMap<(usize, &'static str), (usize, i64)>;
/// One of the model's claims.
type HeldClaim = ((usize, &'static str), (usize, i64));
/// The model's backoffs: (object index, process) -> (until, last interval s, failures in a row).
type Backoffs = std::collections::HashMap<(usize, &'static str), (fleetdb::Timestamp, i64, u64)>;

/// In the model, the claims of dead sessions in `dead` that the store no longer has (a claim
/// took them over or expired them, or the sweep did) expired: each counts as a failure of
/// (object, process), parking it for `R` at its second failure in a row (review-w).
async fn expiries(
    st: &Store,
    objs: &[ObjectKey],
    dead: &[HeldClaim],
    held: &mut Held,
    backoffs: &mut Backoffs,
    now: fleetdb::Timestamp,
    parked: &mut u64,
) -> u64 {
    let mut n = 0;
    let rows: BTreeSet<(String, String, i64)> = st
        .work_list(None, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|w| (w.key.id, w.process, w.token))
        .collect();
    for ((o, p), (s, t)) in dead {
        if held.get(&(*o, *p)) != Some(&(*s, *t))
            || rows.contains(&(objs[*o].id.clone(), p.to_string(), *t))
        {
            continue;
        }
        held.remove(&(*o, *p));
        n += 1;
        let last = backoffs.get(&(*o, *p)).copied();
        let failures = last.map_or(1, |b| b.2 + 1);
        let until = if *p == "R" && failures >= 2 {
            *parked += 1;
            fleetdb::core::work::PARKED
        } else {
            // Past already: an expiry makes no wait.
            now
        };
        backoffs.insert((*o, *p), (until, last.map_or(0, |b| b.1), failures));
    }
    n
}

async fn work_model(h: &Harness, seed: u64) {
    use std::collections::HashMap;
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    st.process_define("Q", &["P"]).await.unwrap();
    st.process_define("R", &[]).await.unwrap();
    let procs: [&'static str; 3] = ["P", "Q", "R"];
    // R parks an object at its second failure in a row.
    st.process_max_failures("R", Some(2)).await.unwrap();
    let conflicts = |a: &str, b: &str| a == b || (a != "R" && b != "R");
    let objs = machines(h, 4).await;
    let backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(8), 2.0).unwrap();
    let ttl = Duration::from_secs(10);

    let mut sessions = Vec::new();
    let mut deadline = Vec::new();
    let mut paused = Vec::new();
    for i in 0..3 {
        sessions.push(
            st.session_start(SessionSpec::new(format!("s{i}"), "h").ttl(ttl))
                .await
                .unwrap(),
        );
        deadline.push(h.clock.now() + ttl);
        paused.push(false);
    }
    // Model: (object index, process) -> (session index, token); backoffs: -> (until, last
    // interval s, failures in a row).
    let mut held: Held = HashMap::new();
    let mut backoffs: Backoffs = HashMap::new();
    let mut handles: Vec<(usize, fleetdb::Work)> = Vec::new();
    let mut rng = Rng(seed);
    // How often each interesting outcome happened: the sequence must exercise all of them.
    let (mut claimed, mut refused, mut ended, mut lost, mut fenced) = (0, 0, 0, 0, 0);
    let (mut parked, mut cleared, mut picked, mut closed) = (0, 0, 0, 0);
    let mut lapsed = 0;

    // Three components; when one's session has expired it starts a new one (a restart).
    let mut slots = [0usize, 1, 2];
    for step in 0..300 {
        let now = h.clock.now();
        for slot in slots.iter_mut() {
            if now >= deadline[*slot] && rng.below(2) == 0 {
                sessions.push(
                    st.session_start(
                        SessionSpec::new(format!("s{}", sessions.len()), "h").ttl(ttl),
                    )
                    .await
                    .unwrap(),
                );
                deadline.push(now + ttl);
                paused.push(false);
                *slot = sessions.len() - 1;
            }
        }
        let alive = |s: usize, deadline: &Vec<fleetdb::Timestamp>| now < deadline[s];
        match rng.below(10) {
            0..=3 => {
                let (s, o, p) = (
                    slots[rng.below(3) as usize],
                    rng.below(4) as usize,
                    procs[rng.below(3) as usize],
                );
                let free = |o: usize, held: &Held, backoffs: &Backoffs| {
                    !held.iter().any(|((ho, hp), (hs, _))| {
                        *ho == o && conflicts(hp, p) && alive(*hs, &deadline)
                    }) && backoffs.get(&(o, p)).is_none_or(|b| b.0 <= now)
                };
                // Dead sessions' claims before the claim: one it takes over (or expires on its
                // way) counts as a failure, and may park the object.
                let dead: Vec<_> = held
                    .iter()
                    .filter(|(_, (hs, _))| !alive(*hs, &deadline))
                    .map(|(k, v)| (*k, *v))
                    .collect();
                if rng.below(3) == 0 {
                    // A selector claim of one: which object it takes is the hand's choice, but
                    // it must be one the model says is free, and it takes one if any is.
                    let r = sessions[s].claim(p, "kind = machine", 1).await;
                    lapsed +=
                        expiries(st, &objs, &dead, &mut held, &mut backoffs, now, &mut parked)
                            .await;
                    let any_free = (0..objs.len()).any(|o| free(o, &held, &backoffs));
                    match r {
                        Ok(mut got) => {
                            assert!(alive(s, &deadline), "step {step}: session dead");
                            match got.pop() {
                                Some(w) => {
                                    let o = objs.iter().position(|k| k == w.key()).unwrap();
                                    assert!(
                                        free(o, &held, &backoffs),
                                        "step {step}: took a held or backed-off object"
                                    );
                                    held.insert((o, p), (s, w.token()));
                                    handles.push((s, w));
                                    claimed += 1;
                                    picked += 1;
                                }
                                None => assert!(!any_free, "step {step}: missed a free object"),
                            }
                        }
                        Err(Error::SessionExpired { .. }) => {
                            assert!(!alive(s, &deadline), "step {step}: session alive")
                        }
                        Err(e) => panic!("step {step}: unexpected {e}"),
                    }
                } else {
                    let blocked = held.iter().any(|((ho, hp), (hs, _))| {
                        *ho == o && conflicts(hp, p) && alive(*hs, &deadline)
                    });
                    let in_backoff = backoffs.get(&(o, p)).is_some_and(|b| b.0 > now);
                    let r = sessions[s].claim_object(&objs[o], p).await;
                    let parks_before = parked;
                    lapsed +=
                        expiries(st, &objs, &dead, &mut held, &mut backoffs, now, &mut parked)
                            .await;
                    let parks = parked > parks_before;
                    match r {
                        Ok(w) => {
                            assert!(
                                alive(s, &deadline) && !blocked && !in_backoff && !parks,
                                "step {step}: claim should have failed"
                            );
                            held.insert((o, p), (s, w.token()));
                            handles.push((s, w));
                            claimed += 1;
                        }
                        Err(Error::SessionExpired { .. }) => {
                            assert!(!alive(s, &deadline), "step {step}: session alive")
                        }
                        Err(Error::Conflict { .. }) => {
                            assert!(
                                blocked || in_backoff || parks,
                                "step {step}: claim should have worked"
                            );
                            refused += 1;
                        }
                        Err(e) => panic!("step {step}: unexpected {e}"),
                    }
                }
            }
            4..=6 if !handles.is_empty() => {
                let i = rng.below(handles.len() as u64) as usize;
                let (s, mut w) = handles.swap_remove(i);
                let o = objs.iter().position(|k| k == w.key()).unwrap();
                let p = procs.iter().copied().find(|p| *p == w.process()).unwrap();
                let still = held.get(&(o, p)) == Some(&(s, w.token())) && alive(s, &deadline);
                if rng.below(4) == 0 {
                    // A fenced write: it commits exactly when ending the claim would succeed,
                    // and leaves the claim held.
                    let k = w.key().clone();
                    let before = st.tag_get(&k, "fenced").await.unwrap().map(|t| t.value);
                    let r = w
                        .update(|tx| {
                            let k = k.clone();
                            async move { tx.tag_set(&k, "fenced", &json!(step)) }
                        })
                        .await;
                    let after = st.tag_get(&k, "fenced").await.unwrap().map(|t| t.value);
                    match r {
                        Ok(()) => {
                            assert!(
                                still,
                                "step {step}: a fenced write of a lost claim committed"
                            );
                            assert_eq!(after, Some(json!(step)), "step {step}");
                            fenced += 1;
                        }
                        Err(Error::WorkLost { .. }) => {
                            assert!(
                                !still,
                                "step {step}: a held claim's fenced write was refused"
                            );
                            assert_eq!(after, before, "step {step}: a refused write wrote");
                            lost += 1;
                        }
                        Err(e) => panic!("step {step}: unexpected {e}"),
                    }
                    handles.push((s, w));
                } else {
                    let kind = rng.below(3);
                    let r = match kind {
                        0 => w.finish(|_| async { Ok(()) }).await,
                        1 => w.cancel().await,
                        _ => w.fail(&backoff, "model").await,
                    };
                    match r {
                        Ok(()) => {
                            assert!(still, "step {step}: ending a lost claim succeeded");
                            held.remove(&(o, p));
                            ended += 1;
                            match kind {
                                0 => {
                                    backoffs.remove(&(o, p));
                                }
                                2 => {
                                    let last = backoffs.get(&(o, p)).copied();
                                    let next = backoff
                                        .next_interval_s(last.map(|b| b.1).filter(|&i| i > 0));
                                    let failures = last.map_or(1, |b| b.2 + 1);
                                    let until = if p == "R" && failures >= 2 {
                                        parked += 1;
                                        fleetdb::core::work::PARKED
                                    } else {
                                        now + Duration::from_secs(next as u64)
                                    };
                                    backoffs.insert((o, p), (until, next, failures));
                                }
                                _ => {}
                            }
                        }
                        Err(Error::WorkLost { .. }) | Err(Error::SessionExpired { .. }) => {
                            assert!(!still, "step {step}: a held claim was refused");
                            lost += 1;
                        }
                        Err(e) => panic!("step {step}: unexpected {e}"),
                    }
                    std::mem::forget(w);
                }
            }
            7 if rng.below(3) == 0 => {
                let s = slots[rng.below(3) as usize];
                if rng.below(2) == 0 {
                    sessions[s].pause_renewal();
                    paused[s] = true;
                } else {
                    // The component closes its session: everything it holds is released (a
                    // session swept already is not found).
                    match sessions[s].clone().close().await {
                        Ok(_) => closed += 1,
                        Err(Error::NotFound { .. }) => {
                            assert!(!alive(s, &deadline), "step {step}: live session not found")
                        }
                        Err(e) => panic!("step {step}: unexpected {e}"),
                    }
                    held.retain(|_, (hs, _)| *hs != s);
                    deadline[s] = deadline[s].min(now);
                    paused[s] = true;
                }
            }
            8 => {
                h.clock.advance(Duration::from_millis(rng.below(6000)));
            }
            9 if rng.below(3) == 0 => {
                // An operator clears a backoff (parked or not): claimable again, counted anew.
                let (o, p) = (rng.below(4) as usize, procs[rng.below(3) as usize]);
                let had = st.backoff_clear(&objs[o], p).await.unwrap();
                assert_eq!(
                    had,
                    backoffs.remove(&(o, p)).is_some(),
                    "step {step}: clear"
                );
                cleared += u64::from(had);
            }
            _ => {
                let dead: Vec<_> = held
                    .iter()
                    .filter(|(_, (hs, _))| !alive(*hs, &deadline))
                    .map(|(k, v)| (*k, *v))
                    .collect();
                st.sweep_sessions().await.unwrap();
                lapsed +=
                    expiries(st, &objs, &dead, &mut held, &mut backoffs, now, &mut parked).await;
            }
        }
        // Renew (as the background task would), in the model too.
        let now = h.clock.now();
        let _ = st.renew_sessions().await;
        for s in 0..sessions.len() {
            if !paused[s] && now < deadline[s] {
                deadline[s] = now + ttl;
            }
        }
        // Compare: live claims, active backoffs.
        let mut live_store: Vec<(String, String, i64)> = st
            .work_list(None, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|w| {
                sessions
                    .iter()
                    .enumerate()
                    .any(|(i, s)| s.id() == w.session_id && now < deadline[i])
            })
            .map(|w| (w.key.id, w.process, w.token))
            .collect();
        live_store.sort();
        let mut live_model: Vec<(String, String, i64)> = held
            .iter()
            .filter(|(_, (s, _))| now < deadline[*s])
            .map(|((o, p), (_, t))| (objs[*o].id.clone(), p.to_string(), *t))
            .collect();
        live_model.sort();
        assert_eq!(live_store, live_model, "step {step}: live claims");
        let mut bo_store: Vec<(String, String, i64, u64)> = st
            .backoff_list(None, true, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|b| (b.key.id, b.process, b.until.0, b.failures))
            .collect();
        bo_store.sort();
        let mut bo_model: Vec<(String, String, i64, u64)> = backoffs
            .iter()
            .filter(|(_, b)| b.0 > now)
            .map(|((o, p), b)| (objs[*o].id.clone(), p.to_string(), b.0 .0, b.2))
            .collect();
        bo_model.sort();
        assert_eq!(bo_store, bo_model, "step {step}: active backoffs");
        for (i, s) in sessions.iter().enumerate() {
            assert_eq!(
                s.is_expired(),
                now >= deadline[i],
                "step {step}: session {i} liveness"
            );
        }
    }
    for (_, w) in handles {
        std::mem::forget(w);
    }
    let expired = sessions.iter().filter(|s| s.is_expired()).count();
    assert!(
        claimed >= 10 && refused >= 5 && ended >= 5 && lost >= 1 && fenced >= 3 && expired >= 1
            && parked >= 1 && cleared >= 1 && picked >= 3 && closed >= 1 && lapsed >= 1,
        "the sequence did not exercise enough: claimed {claimed}, refused {refused}, ended {ended}, lost {lost}, fenced {fenced}, expired {expired}, parked {parked}, cleared {cleared}, picked {picked}, closed {closed}, lapsed {lapsed}"
    );
}

pub async fn finish_and_claim_finishes_then_claims_the_next(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let keys = machines(h, 3).await;
    let s = st.session_start(spec("c")).await.unwrap();
    let mut first = s
        .claim("P", "kind = machine", 1)
        .await
        .unwrap()
        .pop()
        .unwrap();
    let k1 = first.key().clone();
    // A failing closure: nothing happens, the claim stays held, nothing more is claimed.
    let err = first
        .finish_and_claim(
            |_tx| async { Err::<(), _>(Error::invalid("test", "x", "refused on purpose")) },
            "P",
            "kind = machine",
            1,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }));
    assert_eq!(st.work_list(None, 10).await.unwrap().len(), 1);
    // The real thing: the writes, the release and the next claim.
    let (value, mut next) = first
        .finish_and_claim(
            |tx| {
                let k1 = k1.clone();
                async move {
                    tx.tag_set(&k1, "done", &serde_json::json!(true))?;
                    Ok(7)
                }
            },
            "P",
            "kind = machine and not has(done)",
            1,
        )
        .await
        .unwrap();
    assert_eq!(value, 7);
    assert_eq!(next.len(), 1);
    let n = next.pop().unwrap();
    assert_ne!(n.key(), &k1);
    assert!(n.token() > first.token(), "fencing tokens keep increasing");
    assert_eq!(
        events(h, &k1)
            .await
            .into_iter()
            .map(|(e, _)| e)
            .collect::<Vec<_>>(),
        [WorkEvent::Started, WorkEvent::Finished]
    );
    assert!(st.tag_get(&k1, "done").await.unwrap().is_some());
    assert_eq!(keys.len(), 3);
    // A claim that cannot proceed once the finish passed (an undeclared process) takes nothing;
    // the finish stands (the same on every backend).
    let mut n = n;
    let (_, none) = n
        .finish_and_claim(|_tx| async { Ok(()) }, "Undeclared", "kind = machine", 1)
        .await
        .unwrap();
    assert!(none.is_empty());
    assert_eq!(
        events(h, n.key()).await.last().map(|e| e.0),
        Some(WorkEvent::Finished)
    );
    let mut n = s
        .claim("P", "kind = machine and not has(done)", 1)
        .await
        .unwrap()
        .pop()
        .unwrap();
    // A finished claim cannot be finished again; a lost one claims nothing.
    st.work_cancel(n.key(), "P").await.unwrap();
    assert!(matches!(
        n.finish_and_claim(|_tx| async { Ok(()) }, "P", "kind = machine", 1)
            .await,
        Err(Error::WorkLost { .. })
    ));
    assert_eq!(
        st.work_list(None, 10).await.unwrap().len(),
        0,
        "nothing claimed"
    );
}

/// Claims by selectors that read labels and by ones that read only the key and tags take
/// exactly the objects that match, in claims of one and of many (the sizes backends may treat
/// differently), and never an object twice.
pub async fn claims_by_label_and_by_tag_take_exactly_the_matches(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    st.process_define("Q", &[]).await.unwrap();
    let mut r1 = Vec::new();
    for i in 0..60 {
        let k = key("default", "machine", &format!("m{i:03}"));
        let mut l = Labels::new();
        l.insert("rack".into(), format!("r{}", i % 3));
        st.object_put(&k, l).await.unwrap();
        if i % 2 == 0 {
            st.tag_set(&k, "todo", &json!(true)).await.unwrap();
        }
        if i % 3 == 1 && i % 2 == 0 {
            r1.push(k);
        }
    }
    let other = key("default", "switch", "s0");
    st.object_put(&other, Labels::new()).await.unwrap();
    st.tag_set(&other, "todo", &json!(true)).await.unwrap();
    let s = st.session_start(spec("c")).await.unwrap();
    // Held until the end (a dropped claim is cancelled and could be claimed again).
    let mut held = Vec::new();
    let claim = |process: &'static str, sel: &'static str, limit: usize| {
        let s = s.clone();
        async move { s.claim(process, sel, limit).await.unwrap() }
    };
    let keys = |works: &[fleetdb::Work]| works.iter().map(|w| w.key().clone()).collect::<Vec<_>>();
    // A label and a tag: 10 objects (rack r1, even i).
    let by_label = "label(rack) = \"r1\" and has(todo)";
    let mut got = Vec::new();
    for limit in [1, 20] {
        let works = claim("P", by_label, limit).await;
        got.extend(keys(&works));
        held.extend(works);
    }
    got.sort();
    assert_eq!(got, r1);
    // The key and a tag only: 30 machines with `todo` for Q (the switch is another kind).
    let by_tag = "kind = machine and has(todo)";
    let mut got = Vec::new();
    for limit in [1, 20, 20] {
        let works = claim("Q", by_tag, limit).await;
        got.extend(keys(&works));
        held.extend(works);
    }
    let n = got.len();
    got.sort();
    got.dedup();
    assert_eq!((n, got.len()), (30, 30), "each once");
    assert!(got.iter().all(|k| k.kind == "machine"));
    assert!(claim("Q", by_tag, 20).await.is_empty());
    assert_eq!(st.work_list(None, 100).await.unwrap().len(), 40);
    drop(held);
}

/// `finish_many_and_claim`: a batch's writes, releases and the next claim in one transaction.
/// A batch that fails (a caller write refused, a claim lost) changes nothing and claims nothing;
/// one that lands finishes every claim (history `Started`, `Finished`) and claims the next ones,
/// never one it just finished, with larger fencing tokens. Claims of 16 (the size backends may
/// treat as a batch).
pub async fn finish_many_and_claim_finishes_then_claims_the_next(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let keys = machines(h, 40).await;
    for k in &keys {
        st.tag_set(k, "todo", &json!(true)).await.unwrap();
    }
    let s = st.session_start(spec("c")).await.unwrap();
    let sel = "kind = machine and has(todo)";
    let mut got = s.claim("P", sel, 16).await.unwrap();
    assert_eq!(got.len(), 16);
    let claimed: Vec<ObjectKey> = got.iter().map(|w| w.key().clone()).collect();
    let delete_todo = |keys: Vec<ObjectKey>, extra: Option<&'static str>| {
        move |tx: fleetdb::Txn| {
            let keys = keys.clone();
            async move {
                for k in &keys {
                    tx.tag_delete(k, "todo")?;
                }
                if let Some(name) = extra {
                    tx.tag_delete(&keys[0], name)?;
                }
                Ok(keys.len())
            }
        }
    };
    // A caller write that is refused: nothing is written, every claim stays, nothing is claimed.
    let err = s
        .finish_many_and_claim(
            &mut got,
            delete_todo(claimed.clone(), Some("absent")),
            "P",
            sel,
            16,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_eq!(st.work_list(Some("P"), 100).await.unwrap().len(), 16);
    for k in &claimed {
        assert!(st.tag_get(k, "todo").await.unwrap().is_some());
    }
    // A lost claim (cancelled by an operator): the whole batch is refused.
    let lost = claimed[15].clone();
    assert!(st.work_cancel(&lost, "P").await.unwrap());
    let err = s
        .finish_many_and_claim(&mut got, delete_todo(claimed.clone(), None), "P", sel, 16)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WorkLost { .. }), "{err:?}");
    assert_eq!(st.work_list(Some("P"), 100).await.unwrap().len(), 15);
    for k in &claimed {
        assert!(st.tag_get(k, "todo").await.unwrap().is_some());
    }
    // Without it, the batch lands and the next 16 are claimed in the same transaction.
    let mut batch: Vec<_> = got.drain(..15).collect();
    let done = claimed[..15].to_vec();
    let top = batch.iter().map(|w| w.token()).max().unwrap();
    let (n, next) = s
        .finish_many_and_claim(&mut batch, delete_todo(done.clone(), None), "P", sel, 16)
        .await
        .unwrap();
    assert_eq!(n, 15);
    assert_eq!(next.len(), 16);
    for w in &next {
        assert!(!done.contains(w.key()), "{} was just finished", w.key());
        assert!(w.token() > top, "fencing tokens keep increasing");
        assert_eq!(w.session().id(), s.id());
    }
    for k in &done {
        assert!(st.tag_get(k, "todo").await.unwrap().is_none());
        assert_eq!(
            events(h, k)
                .await
                .into_iter()
                .map(|(e, _)| e)
                .collect::<Vec<_>>(),
            [WorkEvent::Started, WorkEvent::Finished]
        );
    }
    let held = st.work_list(Some("P"), 100).await.unwrap();
    assert_eq!(held.len(), 16);
    assert!(held.iter().all(|w| next.iter().any(|n| n.key() == &w.key)));
    // Ended claims cannot be finished again, and another session's claims are refused.
    assert!(matches!(
        s.finish_many_and_claim(&mut batch, delete_todo(Vec::new(), None), "P", sel, 1)
            .await,
        Err(Error::WorkLost { .. })
    ));
    let other = st.session_start(spec("other")).await.unwrap();
    let mut next = next;
    assert!(matches!(
        other
            .finish_many_and_claim(&mut next, |_| async { Ok(()) }, "P", sel, 1)
            .await,
        Err(Error::Invalid { .. })
    ));
    assert_eq!(st.work_list(Some("P"), 100).await.unwrap().len(), 16);
    std::mem::forget(got);
}

/// A worker's finish that deletes the tag that made the object eligible (the shape backends may
/// run as one statement), alone and followed by the next claim: every check of the general path
/// (a missing tag, a lost claim) leaves everything as it was, and a finish that lands deletes the
/// tag with its change-log row (old value), ends the claim with `Finished` history, and the next
/// claim never sees the finished object.
pub async fn finish_deleting_the_eligible_tag(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let keys = machines(h, 3).await;
    for (i, k) in keys.iter().enumerate() {
        st.tag_set(k, "todo", &json!({"n": i})).await.unwrap();
    }
    let s = st.session_start(spec("c")).await.unwrap();
    let sel = "kind = machine and has(todo)";
    let mut w0 = s.claim("P", sel, 1).await.unwrap().pop().unwrap();
    let k0 = w0.key().clone();
    assert_eq!(k0, keys[0]);
    // A tag that is not there: the finish fails whole, the claim and the tag stay.
    let err = w0
        .finish_and_claim(
            |tx| {
                let k0 = k0.clone();
                async move {
                    tx.tag_delete(&k0, "todo")?;
                    tx.tag_delete(&k0, "absent")
                }
            },
            "P",
            sel,
            1,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert!(st.tag_get(&k0, "todo").await.unwrap().is_some());
    assert_eq!(st.work_list(None, 10).await.unwrap().len(), 1);
    let before = st.revision().await.unwrap().current;
    let mut next = finish_deleting_todo(&mut w0, sel).await.unwrap();
    let mut w1 = next.pop().expect("the next object is claimed");
    assert_eq!(w1.key(), &keys[1]);
    assert!(st.tag_get(&k0, "todo").await.unwrap().is_none());
    let changes = st
        .changes(before, &fleetdb::ChangeFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].id, k0.id);
    assert_eq!(changes[0].name, "todo");
    assert_eq!(changes[0].op, fleetdb::ChangeOp::Delete);
    assert_eq!(changes[0].old_value, Some(json!({"n": 0})));
    assert_eq!(
        event_kinds(h, &k0).await,
        [WorkEvent::Started, WorkEvent::Finished]
    );
    // A plain finish of the same shape; then a claim lost to an operator cannot be finished and
    // its tag stays.
    let k1 = w1.key().clone();
    w1.finish(|tx| {
        let k1 = k1.clone();
        async move { tx.tag_delete(&k1, "todo") }
    })
    .await
    .unwrap();
    assert!(st.tag_get(&k1, "todo").await.unwrap().is_none());
    let mut w2 = s.claim("P", sel, 1).await.unwrap().pop().unwrap();
    let k2 = w2.key().clone();
    assert_eq!(k2, keys[2]);
    st.work_cancel(&k2, "P").await.unwrap();
    let err = finish_deleting_todo(&mut w2, sel).await.unwrap_err();
    assert!(matches!(err, Error::WorkLost { .. }), "{err:?}");
    assert!(st.tag_get(&k2, "todo").await.unwrap().is_some());
    // Nothing left to claim after a finish: the finish still lands.
    let mut w2 = s.claim("P", sel, 1).await.unwrap().pop().unwrap();
    let next = finish_deleting_todo(&mut w2, sel).await.unwrap();
    assert!(next.is_empty());
    assert!(st.tag_get(&k2, "todo").await.unwrap().is_none());
    assert!(st.work_list(None, 10).await.unwrap().is_empty());
    assert_eq!(
        event_kinds(h, &k1).await,
        [WorkEvent::Started, WorkEvent::Finished]
    );
    assert_eq!(
        event_kinds(h, &k2).await,
        [
            WorkEvent::Started,
            WorkEvent::Canceled,
            WorkEvent::Started,
            WorkEvent::Finished
        ]
    );
}

/// Finish `w` deleting its object's `todo` tag, and claim the next object matching `sel`.
async fn finish_deleting_todo(
    w: &mut fleetdb::Work,
    sel: &str,
) -> fleetdb::Result<Vec<fleetdb::Work>> {
    let k = w.key().clone();
    w.finish_and_claim(
        move |tx| {
            let k = k.clone();
            async move { tx.tag_delete(&k, "todo") }
        },
        "P",
        sel,
        1,
    )
    .await
    .map(|((), next)| next)
}

async fn event_kinds(h: &Harness, k: &ObjectKey) -> Vec<WorkEvent> {
    events(h, k).await.into_iter().map(|(e, _)| e).collect()
}

/// Fenced writes ([`fleetdb::Work::update`], [`Store::txn_fenced`]): they commit only while the
/// claim is held by its session with its token and the session is alive; otherwise `WorkLost`
/// and nothing is written. The claim stays held after one.
pub async fn fenced_writes_commit_only_while_the_claim_is_held(h: &Harness) {
    let st = &h.store;
    st.process_define("Install", &[]).await.unwrap();
    let k = machines(h, 1).await.remove(0);
    let s = st.session_start(spec("installer")).await.unwrap();
    let mut w = s.claim_object(&k, "Install").await.unwrap();
    let progress = |v: &'static str| {
        let k = k.clone();
        move |tx: fleetdb::Txn| {
            let k = k.clone();
            async move { tx.tag_set(&k, "progress", &json!(v)) }
        }
    };
    let seen = || async { st.tag_get(&k, "progress").await.unwrap().map(|t| t.value) };
    w.update(progress("imaging")).await.unwrap();
    assert_eq!(seen().await, Some(json!("imaging")));
    assert_eq!(st.work_list(None, 10).await.unwrap().len(), 1, "still held");
    // A writer without the Work (a worker's command) fences with the claim's description.
    let fence = w.fence();
    st.txn_fenced(&fence, progress("booting")).await.unwrap();
    assert_eq!(seen().await, Some(json!("booting")));
    let lost = |r: fleetdb::Result<()>, why: &str| match r {
        Err(Error::WorkLost { what }) => assert!(what.contains(why), "{what}"),
        other => panic!("expected WorkLost ({why}), got {other:?}"),
    };
    let mut stale = fence.clone();
    stale.token -= 1;
    lost(
        st.txn_fenced(&stale, progress("stale")).await,
        "held by another claim",
    );
    let mut other = fence.clone();
    other.session_id = "another-session".into();
    lost(
        st.txn_fenced(&other, progress("other")).await,
        "held by another claim",
    );
    let mut unclaimed = fence.clone();
    unclaimed.process = "Recovery".into();
    lost(
        st.txn_fenced(&unclaimed, progress("unclaimed")).await,
        "not held by anyone",
    );
    assert_eq!(
        seen().await,
        Some(json!("booting")),
        "refused writes wrote nothing"
    );
    // The session's deadline passes (no sweeper has run: the claim's row is still there).
    s.pause_renewal();
    h.clock.advance(Duration::from_secs(11));
    lost(
        st.txn_fenced(&fence, progress("late")).await,
        "expired session",
    );
    lost(w.update(progress("late")).await, "expired");
    assert_eq!(seen().await, Some(json!("booting")));
    // Taken over: the old fence stays refused, the new holder's writes go through.
    let s2 = st.session_start(spec("rescuer")).await.unwrap();
    let mut w2 = s2.claim_object(&k, "Install").await.unwrap();
    lost(
        st.txn_fenced(&fence, progress("late")).await,
        "held by another claim",
    );
    w2.update(progress("rescued")).await.unwrap();
    assert_eq!(seen().await, Some(json!("rescued")));
    let after = w2.fence();
    w2.finish(|_| async { Ok(()) }).await.unwrap();
    lost(
        st.txn_fenced(&after, progress("after")).await,
        "not held by anyone",
    );
    lost(w2.update(progress("after")).await, "ended already");
    assert_eq!(seen().await, Some(json!("rescued")));
    std::mem::forget(w); // its session is gone; dropping would try to cancel
}

/// Tracked selectors ([`Store::metrics_track_selector`]): each refresh sets
/// `fleetdb_selector_objects{selector=NAME}` to what the selector matches, as `Store::count`
/// says; an untracked name's gauge goes; bad names and selectors are refused.
pub async fn tracked_selectors_count_their_matches(h: &Harness) {
    let st = &h.store;
    let ks = machines(h, 3).await;
    for (k, tag) in [(0, "provided"), (1, "provided"), (1, "agent_started")] {
        st.tag_set(&ks[k], tag, &json!(true)).await.unwrap();
    }
    let awaiting = "kind = machine and has(provided) and not has(agent_started)";
    st.metrics_track_selector("awaiting_agent", awaiting)
        .unwrap();
    st.metrics_track_selector("machines", "kind = machine")
        .unwrap();
    let gauge = |name: &str| {
        let text = st.metrics().encode();
        let prefix = format!("fleetdb_selector_objects{{selector=\"{name}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix).map(|v| v.parse::<u64>().unwrap()))
    };
    st.metrics_refresh().await.unwrap();
    assert_eq!(gauge("awaiting_agent"), Some(1));
    assert_eq!(gauge("machines"), Some(3));
    st.tag_set(&ks[2], "provided", &json!(true)).await.unwrap();
    st.metrics_refresh().await.unwrap();
    assert_eq!(
        gauge("awaiting_agent"),
        Some(st.count(awaiting).await.unwrap())
    );
    assert_eq!(gauge("awaiting_agent"), Some(2));
    assert!(st.metrics_untrack_selector("machines"));
    assert!(!st.metrics_untrack_selector("machines"));
    st.metrics_refresh().await.unwrap();
    assert_eq!(gauge("machines"), None);
    for (name, selector) in [("bad name", "kind = machine"), ("ok", "kind = ")] {
        assert!(matches!(
            st.metrics_track_selector(name, selector),
            Err(Error::Invalid { .. })
        ));
    }
    st.metrics_refresh().await.unwrap();
    assert_eq!(gauge("ok"), None);
    assert_eq!(gauge("awaiting_agent"), Some(2));
}

/// A paused process starts no claims: selector claims find nothing, `claim_object` is refused;
/// claims already held go on and end as usual; other processes are not affected; redefining the
/// process keeps it paused; resuming lets claims start again.
pub async fn paused_processes_start_no_claims(h: &Harness) {
    let st = &h.store;
    st.process_define("Install", &[]).await.unwrap();
    st.process_define("Audit", &[]).await.unwrap();
    let ks = machines(h, 3).await;
    let s = st.session_start(spec("c")).await.unwrap();
    let mut held = s.claim_object(&ks[0], "Install").await.unwrap();
    let p = st.process_pause("Install").await.unwrap();
    assert!(p.paused);
    let listed = st.process_list().await.unwrap();
    assert!(listed.iter().any(|p| p.name == "Install" && p.paused));
    assert!(listed.iter().any(|p| p.name == "Audit" && !p.paused));
    assert!(s
        .claim("Install", "kind = machine", 5)
        .await
        .unwrap()
        .is_empty());
    match s.claim_object(&ks[1], "Install").await {
        Err(Error::Refused { reason, .. }) => assert!(reason.contains("paused"), "{reason}"),
        other => panic!("expected Refused, got {:?}", other.map(|w| w.token())),
    }
    let audits = s.claim("Audit", "kind = machine", 5).await.unwrap();
    assert_eq!(audits.len(), 3, "another process is not paused");
    for mut w in audits {
        w.cancel().await.unwrap();
    }
    // The claim held before the pause goes on: a fenced write, then its finish.
    let k0 = ks[0].clone();
    held.update(|tx| {
        let k0 = k0.clone();
        async move { tx.tag_set(&k0, "progress", &json!("done")) }
    })
    .await
    .unwrap();
    held.finish(|_| async { Ok(()) }).await.unwrap();
    // Pausing again changes nothing; redefining keeps the pause; undeclared names are refused.
    assert!(st.process_pause("Install").await.unwrap().paused);
    assert!(
        st.process_define("Install", &["Audit"])
            .await
            .unwrap()
            .paused
    );
    assert!(matches!(
        st.process_pause("Nope").await,
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        st.process_pause("bad name").await,
        Err(Error::Invalid { .. })
    ));
    assert!(s
        .claim("Install", "kind = machine", 5)
        .await
        .unwrap()
        .is_empty());
    assert!(!st.process_resume("Install").await.unwrap().paused);
    let got = s.claim("Install", "kind = machine", 5).await.unwrap();
    assert_eq!(got.len(), 3, "claims start again");
    for mut w in got {
        w.finish(|_| async { Ok(()) }).await.unwrap();
    }
}

/// A process limited to N claims held at once: claims beyond it find nothing (`claim_object` is
/// refused) until one ends or its session dies; raising or lifting the limit lets more start;
/// redefining the process keeps it; bad limits are refused.
pub async fn limited_processes_hold_at_most_their_limit(h: &Harness) {
    let st = &h.store;
    st.process_define("Install", &[]).await.unwrap();
    let ks = machines(h, 6).await;
    let all = "kind = machine";
    assert_eq!(
        st.process_limit("Install", Some(2))
            .await
            .unwrap()
            .max_active,
        Some(2)
    );
    let s1 = st.session_start(spec("a")).await.unwrap();
    let s2 = st.session_start(spec("b")).await.unwrap();
    let mut first = s1.claim("Install", all, 5).await.unwrap();
    assert_eq!(first.len(), 2, "a claim of many takes what fits");
    assert!(s2.claim("Install", all, 5).await.unwrap().is_empty());
    let free = ks
        .iter()
        .find(|k| first.iter().all(|w| w.key() != *k))
        .unwrap();
    match s2.claim_object(free, "Install").await {
        Err(Error::Refused { reason, .. }) => assert!(reason.contains("limit is 2"), "{reason}"),
        other => panic!("expected Refused, got {:?}", other.map(|w| w.token())),
    }
    // A claim that ends frees its place.
    first
        .pop()
        .unwrap()
        .finish(|_| async { Ok(()) })
        .await
        .unwrap();
    let second = s2.claim("Install", all, 5).await.unwrap();
    assert_eq!(second.len(), 1);
    // A session that dies frees its places at its deadline (only live claims count).
    s1.pause_renewal();
    h.clock.advance(Duration::from_secs(9));
    st.renew_sessions().await.unwrap();
    h.clock.advance(Duration::from_secs(2));
    assert!(s1.is_expired());
    let third = s2.claim("Install", all, 5).await.unwrap();
    assert_eq!(third.len(), 1, "s1's claim no longer counts");
    assert!(s2.claim("Install", all, 5).await.unwrap().is_empty());
    // Redefining keeps the limit; raising it lets more start; lifting it lets all start.
    assert_eq!(
        st.process_define("Install", &[]).await.unwrap().max_active,
        Some(2)
    );
    st.process_limit("Install", Some(3)).await.unwrap();
    let fourth = s2.claim("Install", all, 5).await.unwrap();
    assert_eq!(fourth.len(), 1);
    st.process_limit("Install", None).await.unwrap();
    let rest = s2.claim("Install", all, 5).await.unwrap();
    assert_eq!(rest.len(), 3, "no limit: every free machine");
    for bad in [
        Some(0),
        Some(fleetdb::core::work::PROCESS_MAX_ACTIVE_MAX + 1),
    ] {
        assert!(matches!(
            st.process_limit("Install", bad).await,
            Err(Error::Invalid { .. })
        ));
    }
    assert!(matches!(
        st.process_limit("Nope", Some(1)).await,
        Err(Error::Invalid { .. })
    ));
    let held = [first, second, third, fourth, rest].into_iter().flatten();
    for w in held {
        std::mem::forget(w);
    }
}

/// An object that fails `max_failures` times in a row is parked: no claim of the process takes it
/// (selector or `claim_object`) however much time passes, until an operator clears its backoff;
/// a finish or a clear starts the count again; other processes are not affected.
pub async fn objects_failing_too_often_are_parked(h: &Harness) {
    let st = &h.store;
    st.process_define("Install", &[]).await.unwrap();
    st.process_define("Audit", &[]).await.unwrap();
    let ks = machines(h, 2).await;
    let all = "kind = machine";
    let p = st.process_max_failures("Install", Some(3)).await.unwrap();
    assert_eq!(p.max_failures, Some(3));
    let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 2.0).unwrap();
    // Each failure from a session of its own (time passes between them beyond any TTL).
    let fail = |cause: &'static str| {
        let (k, b) = (&ks[0], &b);
        async move {
            let s = st.session_start(spec("a")).await.unwrap();
            let mut w = s.claim_object(k, "Install").await.unwrap();
            w.fail(b, cause).await.unwrap();
            s.close().await.unwrap();
        }
    };
    let backoff = || async {
        st.backoff_list(Some("Install"), false, 10)
            .await
            .unwrap()
            .into_iter()
            .find(|b| b.key == ks[0])
            .unwrap()
    };
    // Two failures: backed off, counted, not parked.
    for (i, cause) in ["one", "two"].into_iter().enumerate() {
        fail(cause).await;
        let bo = backoff().await;
        assert_eq!(bo.failures, i as u64 + 1);
        assert!(!bo.parked());
        assert!(st.backoff_parked(None, 10).await.unwrap().is_empty());
        h.clock.advance(Duration::from_secs(61));
    }
    // The third parks it, whatever time passes.
    fail("three").await;
    let bo = backoff().await;
    assert_eq!(
        (bo.failures, bo.parked(), bo.cause.as_str()),
        (3, true, "three")
    );
    assert_eq!(bo.until, fleetdb::core::work::PARKED);
    let parked = st.backoff_parked(Some("Install"), 10).await.unwrap();
    assert_eq!(parked, vec![bo.clone()]);
    assert!(st
        .backoff_parked(Some("Audit"), 10)
        .await
        .unwrap()
        .is_empty());
    h.clock.advance(Duration::from_secs(30 * 24 * 3600));
    let s = st.session_start(spec("a")).await.unwrap();
    let got = s.claim("Install", all, 5).await.unwrap();
    assert_eq!(got.len(), 1, "only the other machine");
    assert_eq!(got[0].key(), &ks[1]);
    match s.claim_object(&ks[0], "Install").await {
        Err(Error::Conflict { what }) => assert!(what.contains("parked"), "{what}"),
        other => panic!("expected Conflict, got {:?}", other.map(|w| w.token())),
    }
    // Other processes still claim it; the stats and `active only` listings count it.
    let mut audit = s.claim_object(&ks[0], "Audit").await.unwrap();
    audit.cancel().await.unwrap();
    let stats = st.work_stats().await.unwrap();
    let install = stats.iter().find(|x| x.process == "Install").unwrap();
    assert_eq!((install.active_backoffs, install.parked), (1, 1));
    st.metrics_refresh().await.unwrap();
    let m = st.metrics();
    assert_eq!(m.work_parked.with_label_values(&["Install"]).get(), 1);
    assert_eq!(m.work_parked.with_label_values(&["Audit"]).get(), 0);
    assert_eq!(
        st.backoff_list(Some("Install"), true, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    // Raising or lifting the setting leaves it parked; clearing the backoff frees it and starts
    // the count again.
    st.process_max_failures("Install", None).await.unwrap();
    assert!(backoff().await.parked());
    st.process_max_failures("Install", Some(2)).await.unwrap();
    assert!(st.backoff_clear(&ks[0], "Install").await.unwrap());
    fail("again").await;
    assert_eq!(backoff().await.failures, 1, "counted from the clear");
    h.clock.advance(Duration::from_secs(2));
    // A finish starts it again too.
    s.claim_object(&ks[0], "Install")
        .await
        .unwrap()
        .finish(|_| async { Ok(()) })
        .await
        .unwrap();
    fail("after the finish").await;
    assert_eq!(backoff().await.failures, 1, "counted from the finish");
    h.clock.advance(Duration::from_secs(2));
    fail("second").await;
    assert!(
        backoff().await.parked(),
        "the lowered setting applies at the next failure"
    );
    // Unparking clears every parked backoff (of the process named), and only those.
    assert_eq!(st.backoff_unpark(Some("Audit")).await.unwrap(), 0);
    assert_eq!(st.backoff_unpark(None).await.unwrap(), 1);
    assert!(st.backoff_parked(None, 10).await.unwrap().is_empty());
    assert!(st
        .backoff_list(Some("Install"), false, 10)
        .await
        .unwrap()
        .is_empty());
    // Redefining keeps it; bad settings and undeclared processes are refused.
    assert_eq!(
        st.process_define("Install", &[])
            .await
            .unwrap()
            .max_failures,
        Some(2)
    );
    for bad in [
        Some(0),
        Some(fleetdb::core::work::PROCESS_MAX_FAILURES_MAX + 1),
    ] {
        assert!(matches!(
            st.process_max_failures("Install", bad).await,
            Err(Error::Invalid { .. })
        ));
    }
    assert!(matches!(
        st.process_max_failures("Nope", Some(1)).await,
        Err(Error::Invalid { .. })
    ));
    for w in got {
        std::mem::forget(w);
    }
}

/// Unparking clears more parked backoffs than one of its transactions holds
/// ([`fleetdb::UNPARK_BATCH`]), all of them.
pub async fn unparking_clears_every_parked_backoff(h: &Harness) {
    let st = &h.store;
    st.process_define("Install", &[]).await.unwrap();
    st.process_max_failures("Install", Some(1)).await.unwrap();
    let n = fleetdb::UNPARK_BATCH + 3;
    machines(h, n).await;
    let s = st.session_start(spec("w")).await.unwrap();
    let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 1.0).unwrap();
    loop {
        let got = s.claim("Install", "kind = machine", 100).await.unwrap();
        if got.is_empty() {
            break;
        }
        for mut w in got {
            w.fail(&b, "bad image").await.unwrap();
        }
    }
    let parked = st.backoff_parked(None, 1000).await.unwrap();
    assert_eq!(parked.len(), n);
    assert_eq!(st.backoff_unpark(Some("Install")).await.unwrap(), n as u64);
    assert!(st.backoff_parked(None, 1000).await.unwrap().is_empty());
    assert_eq!(
        s.claim("Install", "kind = machine", 1).await.unwrap().len(),
        1
    );
}

/// `work_explain` says why an object is or is not claimable, and agrees with what a claim of it
/// does in every state: matching or not, held by a conflicting process, by a dead session,
/// paused, at the limit, in backoff, parked, missing, undeclared.
pub async fn work_explain_says_why_an_object_is_not_claimed(h: &Harness) {
    let st = &h.store;
    st.process_define("Install", &[]).await.unwrap();
    st.process_define("Recovery", &["Install"]).await.unwrap();
    let ks = machines(h, 2).await;
    let m1 = &ks[0];
    let sel = "kind = machine and has(provided) and not has(agent_started)";
    let s = st.session_start(spec("explainer")).await.unwrap();
    // What the explanation says and what a claim of the object does agree; returns the blockers.
    let agrees = |key: ObjectKey, process: &'static str, selector: Option<&'static str>| {
        let s = &s;
        async move {
            let e = st.work_explain(&key, process, selector).await.unwrap();
            assert_eq!((&e.key, e.process.as_str()), (&key, process));
            let by_selector = match selector {
                Some(text) => {
                    let got = s.claim(process, text, 10).await;
                    let took = got
                        .as_ref()
                        .is_ok_and(|ws| ws.iter().any(|w| w.key() == &key));
                    for mut w in got.unwrap_or_default() {
                        w.cancel().await.unwrap();
                    }
                    Some(took)
                }
                None => None,
            };
            // `claim_object` names its object: the selector's verdict is not its business.
            let object_side: Vec<&String> = e
                .blockers
                .iter()
                .filter(|b| !b.contains("does not match the selector"))
                .collect();
            match s.claim_object(&key, process).await {
                Ok(mut w) => {
                    assert!(object_side.is_empty(), "claimed, yet {object_side:?}");
                    w.cancel().await.unwrap();
                }
                Err(err) => {
                    let first = object_side
                        .first()
                        .unwrap_or_else(|| panic!("refused ({err}), yet explained claimable"));
                    assert!(
                        err.to_string().contains(first.as_str()) || first.contains("not declared"),
                        "{err} / {first}"
                    );
                }
            }
            if let Some(took) = by_selector {
                assert_eq!(took, e.claimable(), "{:?}", e.blockers);
            }
            e.blockers
        }
    };
    // Not matching: the terms it fails.
    let e = st.work_explain(m1, "Install", Some(sel)).await.unwrap();
    let sc = e.selector.clone().unwrap();
    assert!(!sc.matches);
    assert_eq!(sc.unmet, vec!["has(provided)".to_string()]);
    assert!(e.object_exists && e.declared.is_some() && e.holders.is_empty());
    let b = agrees(m1.clone(), "Install", Some(sel)).await;
    assert_eq!(b.len(), 1);
    assert!(
        b[0].contains("does not match the selector") && b[0].contains("has(provided)"),
        "{b:?}"
    );
    st.tag_set(m1, "provided", &serde_json::json!(true))
        .await
        .unwrap();
    assert!(agrees(m1.clone(), "Install", Some(sel)).await.is_empty());
    // Held by a conflicting process's live claim.
    let other = st.session_start(spec("recovery")).await.unwrap();
    let held = other.claim_object(m1, "Recovery").await.unwrap();
    let e = st.work_explain(m1, "Install", None).await.unwrap();
    assert_eq!(e.holders.len(), 1);
    assert!(e.holders[0].alive);
    assert_eq!(
        (
            e.holders[0].work.process.as_str(),
            e.holders[0].component.as_str()
        ),
        ("Recovery", "recovery")
    );
    let b = agrees(m1.clone(), "Install", Some(sel)).await;
    assert!(b[0].contains("held for process Recovery"), "{b:?}");
    // A dead session's claim blocks nothing (the next claim takes it over).
    other.pause_renewal();
    for _ in 0..3 {
        h.clock.advance(Duration::from_secs(4));
        st.renew_sessions().await.unwrap();
    }
    assert!(other.is_expired() && !s.is_expired());
    let e = st.work_explain(m1, "Install", None).await.unwrap();
    assert_eq!(e.holders.len(), 1);
    assert!(!e.holders[0].alive);
    assert!(agrees(m1.clone(), "Install", None).await.is_empty());
    std::mem::forget(held);
    // Paused; at its limit.
    st.process_pause("Install").await.unwrap();
    let b = agrees(m1.clone(), "Install", Some(sel)).await;
    assert!(b.iter().any(|x| x.contains("paused")), "{b:?}");
    st.process_resume("Install").await.unwrap();
    st.process_limit("Install", Some(1)).await.unwrap();
    let mut taken = s.claim_object(&ks[1], "Install").await.unwrap();
    let e = st.work_explain(m1, "Install", None).await.unwrap();
    assert_eq!(e.held, Some(1));
    let b = agrees(m1.clone(), "Install", None).await;
    assert!(b[0].contains("its limit is 1"), "{b:?}");
    taken.cancel().await.unwrap();
    st.process_limit("Install", None).await.unwrap();
    // In backoff, then parked.
    let backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(5), 1.0).unwrap();
    let mut w = s.claim_object(m1, "Install").await.unwrap();
    w.fail(&backoff, "no disk").await.unwrap();
    let b = agrees(m1.clone(), "Install", Some(sel)).await;
    assert!(
        b[0].contains("in backoff") && b[0].contains("no disk"),
        "{b:?}"
    );
    assert_eq!(
        st.work_explain(m1, "Install", None)
            .await
            .unwrap()
            .backoff
            .unwrap()
            .failures,
        1
    );
    for _ in 0..2 {
        h.clock.advance(Duration::from_secs(3));
        st.renew_sessions().await.unwrap();
    }
    st.process_max_failures("Install", Some(2)).await.unwrap();
    let mut w = s.claim_object(m1, "Install").await.unwrap();
    w.fail(&backoff, "still no disk").await.unwrap();
    let e = st.work_explain(m1, "Install", Some(sel)).await.unwrap();
    assert_eq!(e.blockers.len(), 1);
    assert!(
        e.blockers[0].contains("parked") && e.blockers[0].contains("2 failures"),
        "{:?}",
        e.blockers
    );
    assert!(e.backoff.unwrap().parked());
    // Several reasons at once, in the claim's order; a missing object; an undeclared process.
    st.process_pause("Install").await.unwrap();
    let e = st.work_explain(m1, "Install", None).await.unwrap();
    assert_eq!(e.blockers.len(), 2);
    assert!(
        e.blockers[0].contains("paused") && e.blockers[1].contains("parked"),
        "{:?}",
        e.blockers
    );
    let gone = ObjectKey::new("default", "machine", "gone").unwrap();
    let e = st.work_explain(&gone, "Install", Some(sel)).await.unwrap();
    assert!(!e.object_exists);
    assert!(
        e.blockers.iter().any(|b| b.contains("not found")),
        "{:?}",
        e.blockers
    );
    let e = st.work_explain(m1, "Nope", None).await.unwrap();
    assert!(e.declared.is_none());
    assert!(e.blockers[0].contains("not declared"), "{:?}", e.blockers);
    // Bad input is refused, not explained.
    for bad in [
        st.work_explain(m1, "Install", Some("has(")).await,
        st.work_explain(m1, "no such name!", None).await,
    ] {
        assert!(matches!(bad, Err(Error::Invalid { .. })), "{bad:?}");
    }
}

/// Many workers of a limited process racing (claims, finish-and-claims, shared transactions on
/// PostgreSQL): the claims held by live sessions never pass the limit (2, with 8 workers).
pub async fn racing_workers_never_pass_a_process_limit(h: &Harness) {
    let st = &h.store;
    st.process_define("Install", &[]).await.unwrap();
    machines(h, 12).await;
    st.process_limit("Install", Some(2)).await.unwrap();
    let held = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (st, held, most) = (st.clone(), held.clone(), most.clone());
        tasks.push(tokio::spawn(async move {
            use std::sync::atomic::Ordering::SeqCst;
            let s = st.session_start(spec(&format!("w{i}"))).await.unwrap();
            let mut got = 0;
            let mut current = s.claim("Install", "kind = machine", 1).await.unwrap().pop();
            for _ in 0..150 {
                let Some(mut w) = current.take() else {
                    tokio::task::yield_now().await;
                    current = s.claim("Install", "kind = machine", 1).await.unwrap().pop();
                    continue;
                };
                got += 1;
                let now = held.fetch_add(1, SeqCst) + 1;
                most.fetch_max(now, SeqCst);
                let live = st.work_list(Some("Install"), 100).await.unwrap().len();
                assert!(live <= 2, "{live} claims held, the limit is 2");
                tokio::task::yield_now().await;
                held.fetch_sub(1, SeqCst);
                let (_, next) = w
                    .finish_and_claim(|_| async { Ok(()) }, "Install", "kind = machine", 1)
                    .await
                    .unwrap();
                current = next.into_iter().next();
            }
            if let Some(mut w) = current {
                w.cancel().await.unwrap();
            }
            s.close().await.unwrap();
            got
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert!(total >= 20, "the workers got work: {total} claims");
    assert!(most.load(std::sync::atomic::Ordering::SeqCst) <= 2);
    assert!(st.work_list(None, 100).await.unwrap().is_empty());
}

// ---------------------------------------------------------------- selector edge values

/// Tag values at the edges the selector documentation promises to handle alike on both
/// backends and in the reference (docs/selectors.md, "Field comparisons"): every JSON type,
/// unicode and escaped strings, nested values, floats of every size short of the documented
/// precision edges.
fn edge_values() -> Vec<serde_json::Value> {
    vec![
        json!(1),
        json!(1.0),
        json!(2),
        json!(-1),
        json!(2.5),
        json!(0),
        json!(-0.0),
        json!(0.1),
        json!(1e-7),
        json!(1e-300),
        json!(1e300),
        json!("1"),
        json!("a"),
        json!("A"),
        json!(""),
        json!("é"),
        json!("\u{1F600}"),
        json!("\u{FFFD}"),
        json!("a\"b"),
        json!("a\\b"),
        json!("\n"),
        json!("\u{1}"),
        json!(true),
        json!(false),
        json!(null),
        json!({"g": 1}),
        json!({"g": 1.0}),
        json!({"g": "a"}),
        json!({"g": "é"}),
        json!({"g": "\u{1}"}),
        json!({"g": null}),
        json!({"g": {"h": 2}}),
        json!({"g": {"h": "a"}}),
        json!({"g": [1, 2]}),
        json!({"0": 1}),
        json!({"bb": 1, "a": 2}),
        json!({"g": 0.1}),
        json!([1, 2]),
        json!([0.1, "x"]),
        json!({}),
        json!([]),
    ]
}

/// An object of [`selector_edge_values_agree_with_the_reference`]: key, labels, tags (value,
/// updated at).
type EdgeObject = (
    ObjectKey,
    Labels,
    BTreeMap<String, (serde_json::Value, fleetdb::Timestamp)>,
);

/// Every selector over objects built from edge values (every JSON type, unicode and escaped
/// strings, nested values, -0.0, 0.1, 1e±300; labels with `=`, `!=`, `in`, `not in`) matches
/// what the in-memory reference says, page by page.
pub async fn selector_edge_values_agree_with_the_reference(h: &Harness) {
    let st = &h.store;
    let values = edge_values();
    let label_values = ["x", "1", "é", "\u{1F600}", "a\"b", "a b", "A"];
    let now = st.clock().now();
    let mut objects: Vec<EdgeObject> = Vec::new();
    for (i, a) in values.iter().enumerate() {
        let mut batch = Vec::new();
        for (j, b) in values.iter().enumerate() {
            let k = key("default", "machine", &format!("p{i:02}-{j:02}"));
            let mut l = Labels::new();
            if (i + j) % 8 != 7 {
                l.insert(
                    "l".into(),
                    label_values[(i + j) % 8 % label_values.len()].into(),
                );
            }
            let mut tags = BTreeMap::new();
            tags.insert("t1".to_string(), (a.clone(), now));
            tags.insert("t2".to_string(), (b.clone(), now));
            batch.push((k, l, tags));
        }
        let b2 = batch.clone();
        st.txn(move |tx| {
            let b2 = b2.clone();
            async move {
                for (k, l, tags) in &b2 {
                    tx.object_put(k, l.clone())?;
                    for (name, (v, _)) in tags {
                        tx.tag_set(k, name, v)?;
                    }
                }
                Ok(())
            }
        })
        .await
        .unwrap();
        objects.extend(batch);
    }
    // The stored times, for the reference.
    let now = st.clock().now();
    for (k, _, tags) in objects.iter_mut() {
        for t in st.tag_list(k).await.unwrap() {
            tags.get_mut(&t.name).unwrap().1 = t.updated_at;
        }
    }
    let mut selectors = Vec::new();
    let paths = ["", ".g", ".g.h", ".0"];
    let ops = ["=", "!=", "<", "<=", ">", ">="];
    let literals = [
        "0",
        "1",
        "1.0",
        "-1",
        "2.5",
        "-0.0",
        "0.1",
        "1e-7",
        "1e-300",
        "1e300",
        "\"\"",
        "\"a\"",
        "\"A\"",
        "\"1\"",
        "\"é\"",
        "\"\u{1F600}\"",
        "\"\u{FFFD}\"",
        "'a\"b'",
        "\"a\\\\b\"",
        "\"\\n\"",
        "\"\u{1}\"",
        "true",
        "false",
        "null",
    ];
    for pa in paths {
        for op in ops {
            for pb in paths {
                selectors.push(format!("tag(t1){pa} {op} tag(t2){pb}"));
            }
            for lit in literals {
                selectors.push(format!("tag(t1){pa} {op} {lit}"));
            }
        }
    }
    for v in label_values {
        let q = serde_json::to_string(v).unwrap();
        selectors.push(format!("label(l) = {q}"));
        selectors.push(format!("label(l) != {q}"));
        selectors.push(format!("label(l) in ({q}, \"x\")"));
        selectors.push(format!("label(l) not in ({q})"));
    }
    let mut failures = Vec::new();
    for text in &selectors {
        let parsed = Selector::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let expected: Vec<String> = objects
            .iter()
            .filter(|(k, l, tags)| {
                parsed.matches(
                    &ObjectView {
                        namespace: &k.namespace,
                        kind: &k.kind,
                        id: &k.id,
                        labels: l,
                        tags,
                    },
                    now,
                )
            })
            .map(|(k, _, _)| k.id.clone())
            .collect();
        let mut got = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = st.select(text, cursor.as_deref(), 1000).await.unwrap();
            got.extend(page.items.into_iter().map(|o| o.key.id));
            match page.next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        if got != expected {
            let extra: Vec<&String> = got
                .iter()
                .filter(|x| !expected.contains(x))
                .take(4)
                .collect();
            let missing: Vec<&String> = expected
                .iter()
                .filter(|x| !got.contains(x))
                .take(4)
                .collect();
            failures.push(format!(
                "{text}: {} selected, reference {}; extra {extra:?}, missing {missing:?}",
                got.len(),
                expected.len()
            ));
        }
    }
    let names: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{i:02}={v}"))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} selectors differ from the reference (values {names:?}):\n{}",
        failures.len(),
        selectors.len(),
        failures.join("\n")
    );
}

/// review-c: a deleted object takes its backoffs along. Its history is kept (invariant 21), but
/// a backoff or a parking belongs to the object: once the machine is removed from the inventory
/// it must not stay counted as parked (`process ls` PARKED, `fleetdb_work_parked`, `backoff ls
/// --parked`), and a new object created later under the same key (a machine re-added after its
/// disk was replaced) must not be born parked by its predecessor's failures.
pub async fn a_deleted_objects_backoffs_go_with_it(h: &Harness) {
    let st = &h.store;
    st.process_define("Install", &[]).await.unwrap();
    st.process_max_failures("Install", Some(1)).await.unwrap();
    let ks = machines(h, 1).await;
    let m = &ks[0];
    let s = st.session_start(spec("w")).await.unwrap();
    let b = Backoff::new(Duration::from_secs(5), Duration::from_secs(60), 2.0).unwrap();
    let mut w = s.claim_object(m, "Install").await.unwrap();
    w.fail(&b, "disk gone").await.unwrap();
    assert_eq!(st.backoff_parked(None, 10).await.unwrap().len(), 1);
    // The machine is decommissioned: its history stays, its parking goes.
    st.object_delete(m).await.unwrap();
    assert_eq!(events(h, m).await.len(), 2, "history outlives the object");
    let stats = st.work_stats().await.unwrap();
    let install = stats.iter().find(|x| x.process == "Install").unwrap();
    assert_eq!(
        (install.active_backoffs, install.parked),
        (0, 0),
        "a deleted object is still counted as parked in `process ls`"
    );
    assert!(
        st.backoff_parked(None, 10).await.unwrap().is_empty(),
        "a deleted object is still listed by `backoff ls --parked`"
    );
    // A new machine under the same key is a new object: claimable at once.
    st.object_put(m, Labels::new()).await.unwrap();
    let e = st.work_explain(m, "Install", None).await.unwrap();
    assert!(
        e.claimable(),
        "a re-created object is born parked: {:?}",
        e.blockers
    );
    let mut w = s.claim_object(m, "Install").await.unwrap();
    w.cancel().await.unwrap();

    // Objects deleted together in one transaction (PostgreSQL's bulk path), and an object the
    // collector removes: their backoffs go too.
    let more = [
        key("default", "machine", "x1"),
        key("default", "machine", "x2"),
        key("default", "disk", "d1"),
    ];
    for k in &more {
        st.object_put(k, Labels::new()).await.unwrap();
        let mut w = s.claim_object(k, "Install").await.unwrap();
        w.fail(&b, "broken").await.unwrap();
    }
    assert_eq!(st.backoff_list(None, false, 10).await.unwrap().len(), 3);
    st.txn(|tx| {
        let keys = more[..2].to_vec();
        async move {
            for k in &keys {
                tx.object_delete(k)?;
            }
            Ok(())
        }
    })
    .await
    .unwrap();
    st.gc_kind_declare("disk", true).await.unwrap();
    st.gc_run().await.unwrap();
    assert!(
        st.object_get(&more[2]).await.unwrap().is_none(),
        "collected"
    );
    assert_eq!(
        st.backoff_list(None, false, 10).await.unwrap(),
        vec![],
        "the backoffs of objects deleted together or collected are gone"
    );

    // Deleted while it was worked on: the failure is recorded, no backoff is left behind.
    let y = key("default", "machine", "y1");
    st.object_put(&y, Labels::new()).await.unwrap();
    let mut w = s.claim_object(&y, "Install").await.unwrap();
    st.object_delete(&y).await.unwrap();
    w.fail(&b, "gone").await.unwrap();
    assert_eq!(events(h, &y).await.len(), 2);
    assert_eq!(st.backoff_list(None, false, 10).await.unwrap(), vec![]);
}

/// Undeclared process names are an error (issue 3, item 5) in the operators' calls too: a typo
/// in `backoff clear`, `work cancel`, `backoff unpark --process` or a listing by process must
/// not answer "nothing there" (the backoff stays, the operator believes it cleared). A declared
/// process with nothing to clear or list still answers so.
pub async fn operators_naming_an_undeclared_process_are_refused(h: &Harness) {
    let st = &h.store;
    st.process_define("Install", &[]).await.unwrap();
    let ks = machines(h, 2).await;
    let m = &ks[0];
    let s = st.session_start(spec("w")).await.unwrap();
    let b = Backoff::new(Duration::from_secs(60), Duration::from_secs(60), 1.0).unwrap();
    let mut w = s.claim_object(m, "Install").await.unwrap();
    w.fail(&b, "boom").await.unwrap();
    let _held = s.claim_object(&ks[1], "Install").await.unwrap();
    let undeclared = |what: &str, r: Result<String, Error>| match r {
        Err(Error::Invalid { rule, .. }) if rule.contains("not declared") => {}
        other => panic!("{what} of an undeclared process: {other:?}"),
    };
    undeclared(
        "backoff clear",
        st.backoff_clear(m, "Instal").await.map(|b| b.to_string()),
    );
    undeclared(
        "work cancel",
        st.work_cancel(m, "Instal").await.map(|b| b.to_string()),
    );
    undeclared(
        "backoff unpark",
        st.backoff_unpark(Some("Instal"))
            .await
            .map(|n| n.to_string()),
    );
    undeclared(
        "work ls",
        st.work_page(Some("Instal"), None, None, 10)
            .await
            .map(|p| format!("{:?}", p.items)),
    );
    undeclared(
        "backoff ls",
        st.backoff_page(Some("Instal"), fleetdb::BackoffWhich::All, None, 10)
            .await
            .map(|p| format!("{:?}", p.items)),
    );
    undeclared(
        "history",
        st.history(&HistoryFilter::Process("Instal".into()), None, 10)
            .await
            .map(|p| format!("{:?}", p.items)),
    );
    // Nothing was changed by the refusals; a declared process with nothing there answers so.
    assert_eq!(st.backoff_list(None, false, 10).await.unwrap().len(), 1);
    assert_eq!(st.work_list(None, 10).await.unwrap().len(), 1);
    st.process_define("Audit", &[]).await.unwrap();
    assert!(!st.backoff_clear(m, "Audit").await.unwrap());
    assert!(!st.work_cancel(m, "Audit").await.unwrap());
    assert_eq!(st.backoff_unpark(Some("Audit")).await.unwrap(), 0);
    assert!(st
        .work_page(Some("Audit"), None, None, 10)
        .await
        .unwrap()
        .items
        .is_empty());
    assert!(st
        .history(&HistoryFilter::Process("Audit".into()), None, 10)
        .await
        .unwrap()
        .items
        .is_empty());
    assert!(st.backoff_clear(m, "Install").await.unwrap());
}

/// review-w: a lapsed claim's `Expired` history carries the time it lapsed — its session's
/// deadline — however late it is noticed: by a sweep that ran an hour late (every process was
/// down), or by a claim that took the object over. It was stamped with the time of the sweep
/// or of the takeover, so an operator reading history saw the claim held an hour longer than it was.
pub async fn an_expired_claims_history_carries_its_sessions_deadline(h: &Harness) {
    let st = &h.store;
    st.process_define("P", &[]).await.unwrap();
    let ks = machines(h, 3).await;
    let dead = st.session_start(spec("crashy")).await.unwrap();
    let held = dead.claim("P", "kind = machine", 3).await.unwrap();
    assert_eq!(held.len(), 3);
    dead.pause_renewal();
    let deadline = st.session_get(dead.id()).await.unwrap().unwrap().deadline;
    h.clock.advance(Duration::from_secs(3600));
    let dead_id = dead.id().to_string();
    let expired_at = |k: &ObjectKey| {
        let (k, dead_id) = (k.clone(), dead_id.clone());
        async move {
            let hist = st
                .history(&HistoryFilter::Object(k), None, 10)
                .await
                .unwrap()
                .items;
            let e: Vec<_> = hist
                .iter()
                .filter(|e| e.event == WorkEvent::Expired)
                .collect();
            assert_eq!(e.len(), 1, "{hist:?}");
            assert_eq!(e[0].session_id, dead_id);
            (e[0].at, e[0].component.clone())
        }
    };
    // Taken over by a claim of the object by name, then by a selector claim, an hour late.
    let rescuer = st.session_start(spec("rescuer")).await.unwrap();
    let a = rescuer.claim_object(&ks[0], "P").await.unwrap();
    let b = rescuer.claim("P", "kind = machine", 1).await.unwrap();
    assert_eq!(b.len(), 1);
    let taken = b[0].key().clone();
    assert_ne!(taken, ks[0]);
    // The third by a sweep, an hour late.
    assert_eq!(st.sweep_sessions().await.unwrap(), 1);
    for k in &ks {
        assert_eq!(expired_at(k).await, (deadline, "crashy".to_string()), "{k}");
    }
    // A claim's own events keep the time they happened (a session's claims at one clock
    // reading are 1 µs apart).
    let started = st
        .history(&HistoryFilter::Object(taken), None, 10)
        .await
        .unwrap()
        .items;
    assert_eq!(started[0].event, WorkEvent::Started);
    let now = h.clock.now();
    assert!(
        started[0].at >= now && started[0].at.0 < now.0 + 1000,
        "{started:?}"
    );
    std::mem::forget(held); // their session is gone; dropping would try to cancel
    drop((a, b));
}

/// review-w: a worker that dies holding a claim (killed out of memory, crashed on a poison
/// object) lets its session lapse; that expiry counts as a failure of (object, process) in a
/// row, as `fail` does, wherever it is noticed — by the sweep, or by a claim taking the dead
/// holder's claim over (of the object by name, or by selector) — so a process with a failure
/// budget parks the object instead of handing it to the next worker to die on, for ever. The
/// claim whose takeover parks it takes other work (a selector claim) or is refused (a claim of
/// the object), the expiry and the parking committed. A finish starts the count again; without
/// a budget nothing parks, and a `fail` after an expiry still waits the first interval.
pub async fn lapsed_claims_count_as_failures_and_park(h: &Harness) {
    let st = &h.store;
    st.process_define("Install", &[]).await.unwrap();
    st.process_define("Audit", &[]).await.unwrap();
    st.process_max_failures("Install", Some(3)).await.unwrap();
    let ks = machines(h, 3).await;
    let all = "kind = machine";
    let expired = || {
        st.metrics()
            .work_finished
            .with_label_values(&["Install", "expired"])
            .get()
    };
    let backoff = |k: &ObjectKey, p: &'static str| {
        let k = k.clone();
        async move {
            st.backoff_list(Some(p), false, 100)
                .await
                .unwrap()
                .into_iter()
                .find(|b| b.key == k)
        }
    };
    // A worker claims, then dies: its session lapses.
    let crash = |k: &ObjectKey, p: &'static str| {
        let k = k.clone();
        async move {
            let s = st.session_start(spec("crashy")).await.unwrap();
            let w = s.claim_object(&k, p).await.unwrap();
            s.pause_renewal();
            std::mem::forget(w);
            h.clock.advance(Duration::from_secs(11));
        }
    };
    // m000 and m001 lapse once, noticed by the sweep.
    crash(&ks[0], "Install").await;
    crash(&ks[1], "Install").await;
    st.sweep_sessions().await.unwrap();
    for k in &ks[..2] {
        let b = backoff(k, "Install").await.expect("counted");
        assert_eq!((b.failures, b.parked()), (1, false), "{k}");
        assert_eq!(b.cause, "session expired");
        assert!(b.until <= h.clock.now(), "no wait: {b:?}");
    }
    // m000 is claimed and lapses again, noticed by the next claim of it (counted 2), which
    // lapses too (a lapse counts where it is noticed).
    crash(&ks[0], "Install").await;
    assert_eq!(backoff(&ks[0], "Install").await.unwrap().failures, 1);
    crash(&ks[0], "Install").await;
    let b = backoff(&ks[0], "Install").await.unwrap();
    assert_eq!((b.failures, b.parked()), (2, false));
    // The third lapse reaches the budget: the selector claim that finds it expires it, parks
    // m000 and takes m001 instead.
    let rescuer = st.session_start(spec("rescuer")).await.unwrap();
    let before = expired();
    let mut got = rescuer.claim("Install", all, 2).await.unwrap();
    assert_eq!(
        got.iter().map(|w| w.key().clone()).collect::<Vec<_>>(),
        [ks[1].clone(), ks[2].clone()]
    );
    assert_eq!(expired(), before + 1);
    let b = backoff(&ks[0], "Install").await.unwrap();
    assert_eq!((b.failures, b.parked()), (3, true));
    assert_eq!(
        events(h, &ks[0])
            .await
            .iter()
            .map(|e| e.0)
            .collect::<Vec<_>>(),
        [
            WorkEvent::Started,
            WorkEvent::Expired,
            WorkEvent::Started,
            WorkEvent::Expired,
            WorkEvent::Started,
            WorkEvent::Expired
        ]
    );
    assert!(st.work_list(Some("Install"), 10).await.unwrap().len() == 2);
    match rescuer.claim_object(&ks[0], "Install").await {
        Err(Error::Conflict { what }) => assert!(what.contains("parked"), "{what}"),
        other => panic!("expected Conflict, got {:?}", other.map(|w| w.token())),
    }
    // A finish starts m001's count again.
    for w in got.iter_mut() {
        w.finish(|_| async { Ok(()) }).await.unwrap();
    }
    drop(got);
    assert!(backoff(&ks[1], "Install").await.is_none());
    crash(&ks[1], "Install").await;
    crash(&ks[1], "Install").await;
    let b = backoff(&ks[1], "Install").await.unwrap();
    assert_eq!(
        (b.failures, b.parked()),
        (1, false),
        "the takeover counted one"
    );
    // m002 lapses three times (two noticed by the next crashing claim); a claim of it by name
    // that takes the third lapse over is refused, the expiry and the parking committed.
    for _ in 0..3 {
        crash(&ks[2], "Install").await;
    }
    let rescuer = st.session_start(spec("rescuer")).await.unwrap();
    // The explanation says so before the claim does.
    let why = st.work_explain(&ks[2], "Install", None).await.unwrap();
    assert!(!why.claimable(), "{why:?}");
    assert!(why.blockers[0].contains("parked"), "{why:?}");
    let before = expired();
    match rescuer.claim_object(&ks[2], "Install").await {
        Err(Error::Conflict { what }) => assert!(what.contains("parked"), "{what}"),
        other => panic!("expected Conflict, got {:?}", other.map(|w| w.token())),
    }
    assert_eq!(expired(), before + 1);
    let b = backoff(&ks[2], "Install").await.unwrap();
    assert_eq!((b.failures, b.parked()), (3, true));
    assert!(st
        .work_list(Some("Install"), 10)
        .await
        .unwrap()
        .iter()
        .all(|w| w.key != ks[2]));
    // Without a budget: counted, never parked; a failure after a lapse waits the first
    // interval of its backoff.
    for _ in 0..3 {
        crash(&ks[0], "Audit").await;
    }
    let rescuer = st.session_start(spec("rescuer")).await.unwrap();
    let mut w = rescuer.claim_object(&ks[0], "Audit").await.unwrap();
    let b = Backoff::new(Duration::from_secs(5), Duration::from_secs(60), 2.0).unwrap();
    w.fail(&b, "broken").await.unwrap();
    let bo = backoff(&ks[0], "Audit").await.unwrap();
    assert_eq!((bo.failures, bo.parked()), (4, false));
    assert_eq!(bo.until, h.clock.now() + Duration::from_secs(5));
    assert_eq!(bo.last_interval_s, 5);
}

/// Every claim started is counted ended once, by the process that ended it, whichever way it
/// ends — a finish, a finish with the next claim, a batch finish, a fail (parking included), a
/// cancel, a drop, a claim given up in flight, an operator's cancel, a session close, a crashed
/// worker's expiry taken over or swept — with two processes (stores) claiming at once: over
/// both, `fleetdb_work_started_total` = `fleetdb_work_finished_total` (every result) + the
/// claims still held (`fleetdb_work_active`), per process.
pub async fn every_claim_started_is_counted_ended_once(h: &Harness) {
    let a = &h.store;
    let b = h.another_process().await;
    a.process_define("P", &[]).await.unwrap();
    a.process_define("Q", &[]).await.unwrap();
    a.process_max_failures("P", Some(2)).await.unwrap();
    machines(h, 40).await;
    let all = "kind = machine";
    let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 1.0).unwrap();
    // One round of one store's worker: each claim ends another way; some stay held (returned).
    async fn round(s: &fleetdb::Session, round: usize, backoff: &Backoff) -> Vec<fleetdb::Work> {
        let mut held = Vec::new();
        for (p, n) in [("P", 4), ("Q", 3)] {
            let got = s.claim(p, "kind = machine", n).await.unwrap();
            for (i, mut w) in got.into_iter().enumerate() {
                match (i + round) % 7 {
                    0 => w.finish(|_| async { Ok(()) }).await.unwrap(),
                    1 => {
                        let (_, next) = w
                            .finish_and_claim(|_| async { Ok(()) }, p, "kind = machine", 1)
                            .await
                            .unwrap();
                        held.extend(next);
                    }
                    2 => w.fail(backoff, "boom").await.unwrap(),
                    3 => w.cancel().await.unwrap(),
                    4 => drop(w),
                    _ => held.push(w),
                }
            }
            // A claim given up in flight.
            drop(poll_once(s.claim(p, "kind = machine", 1)));
        }
        // Half of what is held is finished in one batch; the rest stays held.
        let kept = held.split_off(held.len() / 2);
        s.finish_many(&mut held).await.unwrap();
        kept
    }
    let sa = a.session_start(spec("a")).await.unwrap();
    let sb = b.session_start(spec("b")).await.unwrap();
    // Kept for later: an operator cancels some, a close, a crash or a drop ends the rest.
    let mut kept = Vec::new();
    for r in 0..6 {
        let (ka, kb) = tokio::join!(round(&sa, r, &backoff), round(&sb, r, &backoff));
        kept.extend(ka);
        kept.extend(kb);
        // An operator cancels one claim held, from the other process.
        if let Some(w) = a.work_list(None, 100).await.unwrap().first() {
            b.work_cancel(&w.key, &w.process).await.unwrap();
        }
        h.clock.advance(Duration::from_secs(2));
        a.renew_sessions().await.unwrap();
        b.renew_sessions().await.unwrap();
    }
    // b's session is closed with claims held; a crashed worker of a lapses with its claims, some
    // taken over by b's next claims, the rest swept by a.
    sb.close().await.unwrap();
    let crashed = a.session_start(spec("crashy")).await.unwrap();
    std::mem::forget(crashed.claim("P", all, 3).await.unwrap());
    std::mem::forget(crashed.claim("Q", all, 3).await.unwrap());
    crashed.pause_renewal();
    h.clock.advance(Duration::from_secs(11));
    let rescuer = b.session_start(spec("rescuer")).await.unwrap();
    let taken = rescuer.claim("P", all, 40).await.unwrap();
    a.sweep_sessions().await.unwrap();
    b.sweep_sessions().await.unwrap();
    drop(taken);
    drop(kept);
    // The drops' cancels run on tasks of their own: wait until the counts settle.
    let total = |r: &str| {
        [a.metrics(), b.metrics()]
            .iter()
            .map(|m| {
                ["P", "Q"]
                    .iter()
                    .map(|p| match r {
                        "started" => m.work_started.with_label_values(&[p]).get(),
                        r => m.work_finished.with_label_values(&[p, r]).get(),
                    })
                    .sum::<u64>()
            })
            .sum::<u64>()
    };
    let mut last = (0, 0, 0);
    for _ in 0..100 {
        a.metrics_refresh().await.unwrap();
        let active: i64 = ["P", "Q"]
            .iter()
            .map(|p| a.metrics().work_active.with_label_values(&[p]).get())
            .sum();
        let ended: u64 = ["finished", "canceled", "failed", "expired"]
            .iter()
            .map(|r| total(r))
            .sum();
        last = (total("started"), ended, active as u64);
        if last.0 == last.1 + last.2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(last.0 > 40, "enough claims to tell: {last:?}");
    assert_eq!(
        last.0,
        last.1 + last.2,
        "(started, ended, active): finished {} canceled {} failed {} expired {}",
        total("finished"),
        total("canceled"),
        total("failed"),
        total("expired")
    );
}
