//! Conformance cases of the content store: content-addressed blobs written through resumable,
//! verified uploads.

use std::time::Duration;

use fleetdb::core::content::{
    CHUNK_BYTES, INGEST_TTL_DEFAULT, INGEST_TTL_UNNAMED, INGEST_WRITE_BYTES_MAX,
};
use fleetdb::core::gc::Resource;
use fleetdb::core::world::sha256_digest;
use fleetdb::{Batch, Error, Labels, Op, Store};

use crate::{labels, Harness};

/// Deterministic bytes that differ at every offset of a chunk.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

async fn ingest_refs(s: &Store) -> Vec<String> {
    s.ingest_list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.reference)
        .collect()
}

async fn lease_create(h: &Harness, id: &str) {
    h.store
        .backend()
        .commit(Batch {
            preconditions: Vec::new(),
            ops: vec![Op::LeaseCreate {
                id: id.into(),
                labels: Labels::new(),
                flat: false,
                expires_at: None,
            }],
            now: h.store.clock().now(),
        })
        .await
        .unwrap();
}

pub async fn blob_put_get_ranges_info_list_delete(h: &Harness) {
    let s = &h.store;
    let small = b"hello, fleet".to_vec();
    let info = s
        .blob_put(&small, labels(&[("team", "infra")]), None)
        .await
        .unwrap();
    assert_eq!(info.digest, sha256_digest(&small));
    assert_eq!(info.size, small.len() as u64);
    assert_eq!(info.labels, labels(&[("team", "infra")]));
    assert_eq!(s.blob_get(&info.digest).await.unwrap(), small);

    // Several chunks and more than one write's worth (> 4 MiB), not aligned.
    let big = pattern(INGEST_WRITE_BYTES_MAX + 2 * CHUNK_BYTES + 123, 7);
    let binfo = s.blob_put(&big, Labels::new(), None).await.unwrap();
    assert_eq!(binfo.size, big.len() as u64);
    assert!(
        s.blob_get(&binfo.digest).await.unwrap() == big,
        "byte-identical"
    );
    let d = &binfo.digest;
    let c = CHUNK_BYTES as u64;
    for (off, len) in [
        (0, Some(10)),
        (c - 5, Some(10)), // across a chunk boundary
        (c, Some(c)),      // exactly one chunk
        (3 * c + 17, Some(2 * c + 1)),
        (big.len() as u64 - 3, Some(100)), // clipped at the end
        (big.len() as u64 - 3, None),
        (big.len() as u64, None), // at the end: nothing
    ] {
        let end = len.map_or(big.len() as u64, |l| (off + l).min(big.len() as u64));
        let got = s.blob_read_range(d, off, len).await.unwrap();
        assert!(
            got == big[off as usize..end as usize],
            "range {off}+{len:?}"
        );
    }
    let err = s
        .blob_read_range(d, big.len() as u64 + 1, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");

    // The empty blob.
    let empty = s.blob_put(b"", Labels::new(), None).await.unwrap();
    assert_eq!(empty.size, 0);
    assert!(s.blob_get(&empty.digest).await.unwrap().is_empty());

    // Info and list (ordered by digest, paged).
    assert_eq!(s.blob_info(d).await.unwrap().unwrap(), binfo);
    let mut all = [
        info.digest.clone(),
        binfo.digest.clone(),
        empty.digest.clone(),
    ];
    all.sort();
    let p1 = s.blob_list(None, 2).await.unwrap();
    assert_eq!(
        p1.items
            .iter()
            .map(|b| b.digest.clone())
            .collect::<Vec<_>>(),
        all[..2]
    );
    let p2 = s.blob_list(p1.next.as_deref(), 2).await.unwrap();
    assert_eq!(
        p2.items
            .iter()
            .map(|b| b.digest.clone())
            .collect::<Vec<_>>(),
        all[2..]
    );
    assert!(p2.next.is_none());

    // Delete: metadata and bytes.
    s.blob_delete(d).await.unwrap();
    assert!(s.blob_info(d).await.unwrap().is_none());
    let err = s.blob_get(d).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let err = s.blob_delete(d).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    // Nothing left to remove: the delete took the bytes.
    assert_eq!(s.backend().blob_orphans_remove().await.unwrap(), 0);
    // The others are untouched.
    assert_eq!(s.blob_get(&info.digest).await.unwrap(), small);

    // Bad input is refused at the edge.
    let err = s.blob_get("sha256:XYZ").await.unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    let err = s.blob_writer("bad ref!", None, None).await.unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
}

pub async fn blob_digest_or_size_mismatch_commits_nothing(h: &Harness) {
    let s = &h.store;
    let data = pattern(CHUNK_BYTES + 10, 1);
    let other = sha256_digest(b"something else");
    let before = s.revision().await.unwrap().current;

    // Wrong digest.
    let mut w = s
        .blob_writer("up-digest", Some((&other, data.len() as u64)), None)
        .await
        .unwrap();
    w.write(&data).await.unwrap();
    let err = w.commit(Labels::new()).await.unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    assert!(s.blob_info(&other).await.unwrap().is_none());
    assert!(s.blob_info(&sha256_digest(&data)).await.unwrap().is_none());
    assert!(s.blob_list(None, 10).await.unwrap().items.is_empty());
    assert_eq!(ingest_refs(s).await, ["up-digest"]);

    // Wrong size (the right digest): declared larger than what was sent.
    let real = sha256_digest(&data);
    let mut w = s
        .blob_writer("up-size", Some((&real, data.len() as u64 + 1)), None)
        .await
        .unwrap();
    w.write(&data).await.unwrap();
    let err = w.commit(Labels::new()).await.unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    // And committed as another size and digest than it holds.
    let w = s.blob_writer("up-size", None, None).await.unwrap();
    let err = w
        .commit_as(&real, data.len() as u64 - 1, Labels::new())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    assert!(s.blob_info(&real).await.unwrap().is_none());
    assert_eq!(
        s.revision().await.unwrap().current,
        before,
        "nothing committed"
    );
    assert_eq!(ingest_refs(s).await, ["up-digest", "up-size"]);

    // A write past the declared size is refused too.
    let mut w = s.blob_writer("up-size", None, None).await.unwrap();
    let err = w.write(b"xx").await.unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");

    // Nothing of it is swept as an orphan while the uploads exist; abort drops them.
    s.backend().blob_orphans_remove().await.unwrap();
    assert_eq!(s.ingest_list().await.unwrap()[0].offset, data.len() as u64);
    s.ingest_abort("up-digest").await.unwrap();
    s.ingest_abort("up-size").await.unwrap();
    assert!(ingest_refs(s).await.is_empty());
    let err = s.ingest_abort("up-size").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

pub async fn ingest_resumes_where_it_stands_and_refuses_other_offsets(h: &Harness) {
    let s = &h.store;
    let data = pattern(3 * CHUNK_BYTES + 777, 3);
    let digest = sha256_digest(&data);
    let size = data.len() as u64;
    let cut = CHUNK_BYTES + 5; // not on a chunk boundary
    {
        let mut w = s
            .blob_writer("resumable", Some((&digest, size)), None)
            .await
            .unwrap();
        assert_eq!(w.offset(), 0);
        w.write(&data[..cut]).await.unwrap();
        assert_eq!(w.offset(), cut as u64);
        // The client goes away.
    }
    // A different expectation for the same upload is refused.
    let err = s
        .blob_writer("resumable", Some((&sha256_digest(b"x"), size)), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");

    let mut w = s
        .blob_writer("resumable", Some((&digest, size)), None)
        .await
        .unwrap();
    assert_eq!(w.offset(), cut as u64, "continues where it stands");
    // Writes at any other offset are refused, naming where it stands.
    let now = s.clock().now();
    for off in [0, cut as u64 - 1, cut as u64 + 1] {
        let err = s
            .backend()
            .ingest_write("resumable", off, b"zz", now, now + INGEST_TTL_DEFAULT)
            .await
            .unwrap_err();
        match &err {
            Error::Invalid { rule, .. } => assert!(rule.contains(&cut.to_string()), "{err}"),
            other => panic!("{other}"),
        }
    }
    assert_eq!(s.ingest_list().await.unwrap()[0].offset, cut as u64);
    w.write(&data[cut..]).await.unwrap();
    let info = w.commit(labels(&[("k", "v")])).await.unwrap();
    assert_eq!((info.digest.as_str(), info.size), (digest.as_str(), size));
    assert!(s.blob_get(&digest).await.unwrap() == data);
    assert!(ingest_refs(s).await.is_empty(), "a commit ends the upload");

    // Without an expected digest, a writer that saw everything computes it.
    let mut w = s.blob_writer("no-expectation", None, None).await.unwrap();
    w.write(b"abc").await.unwrap();
    w.write(b"def").await.unwrap();
    let info = w.commit(Labels::new()).await.unwrap();
    assert_eq!(info.digest, sha256_digest(b"abcdef"));
}

pub async fn expired_ingests_are_swept(h: &Harness) {
    let s = &h.store;
    let mut w = s.blob_writer("old", None, None).await.unwrap();
    w.write(b"partial").await.unwrap();
    h.clock.advance(INGEST_TTL_DEFAULT / 2);
    let mut fresh = s.blob_writer("fresh", None, None).await.unwrap();
    fresh.write(b"x").await.unwrap();
    h.clock
        .advance(INGEST_TTL_DEFAULT / 2 + Duration::from_secs(1));
    // Expired: no more writes.
    let err = w.write(b"more").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let now = s.clock().now();
    assert_eq!(s.backend().ingest_sweep(now).await.unwrap(), 1);
    assert_eq!(ingest_refs(s).await, ["fresh"]);
    assert_eq!(s.backend().ingest_sweep(now).await.unwrap(), 0);
    // The reference can be used again, from scratch.
    let w = s.blob_writer("old", None, None).await.unwrap();
    assert_eq!(w.offset(), 0);
    // Nothing of the swept upload is left behind.
    assert_eq!(s.backend().blob_orphans_remove().await.unwrap(), 0);
}

/// An upload expires [`INGEST_TTL_DEFAULT`] after it was last touched (started, resumed or
/// written), not after it started: one written an hour at a time for 30 hours is committed
/// whole; one left untouched for the TTL expires.
pub async fn an_upload_expires_only_when_untouched(h: &Harness) {
    let s = &h.store;
    let mut w = s.blob_writer("slow-upload", None, None).await.unwrap();
    let mut sent = Vec::new();
    for hour in 0..30 {
        let piece = format!("hour {hour}; ");
        if let Err(e) = w.write(piece.as_bytes()).await {
            panic!("the write of hour {hour} failed: {e}");
        }
        sent.extend_from_slice(piece.as_bytes());
        let now = s.clock().now();
        assert_eq!(
            w.status().expires_at,
            now + INGEST_TTL_DEFAULT,
            "hour {hour}"
        );
        h.clock.advance(Duration::from_secs(3600));
        // A collection in between does not take it.
        let now = s.clock().now();
        assert_eq!(
            s.backend().ingest_sweep(now).await.unwrap(),
            0,
            "hour {hour}"
        );
    }
    let listed = s.ingest_list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].expires_at,
        w.status().expires_at,
        "listed as written"
    );
    let info = w.commit(Labels::new()).await.unwrap();
    assert_eq!(s.blob_get(&info.digest).await.unwrap(), sent);

    // Written just before its expiry, every time: alive. Then untouched: expired and swept.
    let mut idle = s.blob_writer("idle", None, None).await.unwrap();
    for piece in [b"a", b"b", b"c"] {
        idle.write(piece).await.unwrap();
        h.clock.advance(INGEST_TTL_DEFAULT - Duration::from_secs(1));
    }
    h.clock.advance(Duration::from_secs(2));
    let err = idle.write(b"d").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let now = s.clock().now();
    assert_eq!(s.backend().ingest_sweep(now).await.unwrap(), 1);
    assert!(ingest_refs(s).await.is_empty());
}

/// A `blob_put` given up midway (its future dropped after the first piece, as a timeout or a
/// killed process leaves it) left an upload nobody could resume (its reference is random) that
/// held its bytes for 24 hours. It lives [`INGEST_TTL_UNNAMED`] after its last write now, and the
/// giving up makes that expiry a deadline of the collector: the first collection after it
/// removes the upload and its bytes.
pub async fn a_blob_put_given_up_midway_is_reclaimed_soon(h: &Harness) {
    use futures::FutureExt as _;
    let s = &h.store;
    let data = pattern(3 * INGEST_WRITE_BYTES_MAX, 11);
    let mut put = Box::pin(s.blob_put(&data, Labels::new(), None));
    let mut written = None;
    for _ in 0..5_000 {
        if let Some(r) = (&mut put).now_or_never() {
            panic!("the put ended before it was given up: {r:?}");
        }
        if let Some(i) = s.ingest_list().await.unwrap().pop() {
            if i.offset > 0 {
                written = Some(i);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(put);
    let ingest = written.expect("the put wrote its first piece");
    assert!(ingest.offset < data.len() as u64, "{ingest:?}");
    assert_eq!(
        ingest.expires_at,
        ingest.updated_at + INGEST_TTL_UNNAMED,
        "an upload nobody can resume lives {INGEST_TTL_UNNAMED:?} after its last write"
    );
    let deadline = s.gc_status().next_deadline.expect("a collection is due");
    assert!(
        deadline <= s.clock().now() + INGEST_TTL_UNNAMED,
        "due at {deadline:?}"
    );
    h.clock.advance(INGEST_TTL_UNNAMED + Duration::from_secs(1));
    s.gc_run().await.unwrap();
    assert!(ingest_refs(s).await.is_empty(), "the upload was reclaimed");
    assert_eq!(
        s.backend().blob_orphans_remove().await.unwrap(),
        0,
        "nothing of it is left behind"
    );
    // A put that is not given up is unaffected.
    let info = s.blob_put(&data, Labels::new(), None).await.unwrap();
    assert_eq!(s.blob_get(&info.digest).await.unwrap(), data);

    // A short-lived upload waiting for its input stays alive by `keep_alive`, and says so when
    // it was not kept alive in time.
    let nine = INGEST_TTL_UNNAMED - Duration::from_secs(60);
    let mut w = s
        .blob_writer_with_ttl("waiting", None, None, INGEST_TTL_UNNAMED)
        .await
        .unwrap();
    w.write(b"first").await.unwrap();
    h.clock.advance(nine);
    w.keep_alive().await.unwrap();
    assert_eq!(w.status().expires_at, s.clock().now() + INGEST_TTL_UNNAMED);
    h.clock.advance(nine);
    w.write(b" second").await.unwrap();
    h.clock.advance(INGEST_TTL_UNNAMED + Duration::from_secs(1));
    let err = w.keep_alive().await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert_eq!(
        ingest_refs(s).await,
        ["waiting"],
        "keep_alive does not start an expired upload over"
    );
    let err = s
        .blob_writer_with_ttl("waiting", None, None, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
}

pub async fn same_content_twice_is_one_blob(h: &Harness) {
    let s = &h.store;
    let data = pattern(CHUNK_BYTES * 2 + 1, 9);
    let a = s
        .blob_put(&data, labels(&[("a", "1")]), None)
        .await
        .unwrap();
    // The same content uploaded with other write sizes.
    let mut w = s.blob_writer("again", None, None).await.unwrap();
    for piece in data.chunks(1000) {
        w.write(piece).await.unwrap();
    }
    let b = w.commit(labels(&[("b", "2")])).await.unwrap();
    assert_eq!(a.digest, b.digest);
    assert_eq!(b.labels, labels(&[("a", "1"), ("b", "2")]), "labels merge");
    let list = s.blob_list(None, 10).await.unwrap().items;
    assert_eq!(list.len(), 1);
    assert!(s.blob_get(&a.digest).await.unwrap() == data);
    assert_eq!(s.backend().blob_orphans_remove().await.unwrap(), 0);
    s.blob_delete(&a.digest).await.unwrap();
    assert!(s.blob_list(None, 10).await.unwrap().items.is_empty());
}

pub async fn blob_committed_under_a_lease_is_held_by_it(h: &Harness) {
    let s = &h.store;
    lease_create(h, "pull-1").await;
    let info = s
        .blob_put(b"layer bytes", Labels::new(), Some("pull-1"))
        .await
        .unwrap();
    let held = s.backend().lease_resources("pull-1").await.unwrap();
    assert_eq!(
        held,
        [Resource::Blob {
            digest: info.digest.clone()
        }]
    );
    // Under a lease that does not exist: nothing is committed, the upload stays.
    let mut w = s.blob_writer("leased", None, Some("nope")).await.unwrap();
    w.write(b"other bytes").await.unwrap();
    let err = w.commit(Labels::new()).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(s
        .blob_info(&sha256_digest(b"other bytes"))
        .await
        .unwrap()
        .is_none());
    assert_eq!(ingest_refs(s).await, ["leased"]);
    // The upload's bytes are kept while it exists, and committing it again works.
    s.backend().blob_orphans_remove().await.unwrap();
    let w = s.blob_writer("leased", None, Some("pull-1")).await.unwrap();
    let info = w
        .commit_as(&sha256_digest(b"other bytes"), 11, Labels::new())
        .await
        .unwrap();
    assert_eq!(s.blob_get(&info.digest).await.unwrap(), b"other bytes");
    assert_eq!(
        s.backend().lease_resources("pull-1").await.unwrap().len(),
        2
    );
}

pub async fn orphaned_bytes_are_removed_after_a_crash(h: &Harness) {
    let s = &h.store;
    let data = pattern(CHUNK_BYTES + 3, 5);
    let gone = s.blob_put(&data, Labels::new(), None).await.unwrap();
    let kept = s.blob_put(b"kept", Labels::new(), None).await.unwrap();
    // An upload in progress is not an orphan.
    let mut w = s.blob_writer("in-progress", None, None).await.unwrap();
    w.write(b"half").await.unwrap();

    // The sweep's metadata commit, then a crash before the bytes went.
    s.backend()
        .commit(Batch {
            preconditions: Vec::new(),
            ops: vec![Op::BlobDelete {
                digest: gone.digest.clone(),
            }],
            now: s.clock().now(),
        })
        .await
        .unwrap();
    assert!(s.blob_info(&gone.digest).await.unwrap().is_none());
    let err = s.blob_get(&gone.digest).await.unwrap_err();
    assert!(
        matches!(err, Error::NotFound { .. }),
        "no dangling metadata: {err}"
    );

    // Removing bytes of a blob that has metadata does nothing.
    assert_eq!(
        s.backend()
            .blob_remove_bytes(std::slice::from_ref(&kept.digest))
            .await
            .unwrap(),
        0
    );
    // The next run removes the orphan (and only it).
    assert_eq!(s.backend().blob_orphans_remove().await.unwrap(), 1);
    assert_eq!(s.backend().blob_orphans_remove().await.unwrap(), 0);
    assert_eq!(s.blob_get(&kept.digest).await.unwrap(), b"kept");
    w.write(b" done").await.unwrap();
    let done = w.commit(Labels::new()).await.unwrap();
    assert_eq!(s.blob_get(&done.digest).await.unwrap(), b"half done");

    // The same content stored again is whole.
    let again = s.blob_put(&data, Labels::new(), None).await.unwrap();
    assert_eq!(again.digest, gone.digest);
    assert!(s.blob_get(&again.digest).await.unwrap() == data);
}

/// Commits of some content racing deletes and byte removals of the same content: whenever the
/// metadata is there, the bytes are whole (never "metadata without bytes").
pub async fn commits_racing_byte_removal_never_lose_bytes(h: &Harness) {
    let data = pattern(CHUNK_BYTES + 99, 11);
    let digest = sha256_digest(&data);
    let rounds = 30;
    let (s1, s2) = (h.store.clone(), h.store.clone());
    let d1 = data.clone();
    let putter = tokio::spawn(async move {
        for _ in 0..rounds {
            s1.blob_put(&d1, Labels::new(), None).await.unwrap();
        }
    });
    let dg = digest.clone();
    let remover = tokio::spawn(async move {
        for _ in 0..rounds {
            match s2.blob_delete(&dg).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => panic!("{e}"),
            }
            s2.backend().blob_orphans_remove().await.unwrap();
            tokio::task::yield_now().await;
        }
    });
    let s = &h.store;
    for _ in 0..rounds * 2 {
        match s.blob_get(&digest).await {
            Ok(bytes) => assert!(bytes == data, "bytes whole"),
            Err(Error::NotFound { .. }) => {}
            Err(e) => panic!("metadata without its bytes: {e}"),
        }
        tokio::task::yield_now().await;
    }
    putter.await.unwrap();
    remover.await.unwrap();
    // Settle: store once more; it must read back whole.
    s.blob_put(&data, Labels::new(), None).await.unwrap();
    s.backend().blob_orphans_remove().await.unwrap();
    assert!(s.blob_get(&digest).await.unwrap() == data);
}

/// A read that would hold more than `Limits::blob_read_bytes_max` in memory (a whole blob by
/// `blob_get`, or a range running to a far end) is refused with `TooLarge`, naming the read's
/// size and `blob_read_range`, before anything is read; ranges within the bound work, also of
/// a blob larger than it. Before, `blob_get` read a blob of up to 8 GiB into memory.
pub async fn a_whole_blob_read_is_bounded_by_the_read_limit(h: &Harness) {
    let limits = fleetdb::Limits {
        blob_read_bytes_max: 10,
        ..fleetdb::Limits::default()
    };
    let small = Store::from_backend(
        h.store.backend().clone(),
        std::sync::Arc::new(h.clock.clone()),
        limits,
    )
    .await
    .unwrap();
    let data = pattern(25, 7);
    let big = small.blob_put(&data, Labels::new(), None).await.unwrap();
    let d = big.digest.as_str();
    for (what, r) in [
        ("blob_get", small.blob_get(d).await),
        ("to the end", small.blob_read_range(d, 0, None).await),
        ("11 bytes", small.blob_read_range(d, 0, Some(11)).await),
    ] {
        match r {
            Err(Error::TooLarge { field, size, max }) => {
                assert_eq!(max, 10, "{what}");
                assert!(field.contains(d), "{what}: {field}");
                assert!(field.contains("blob_read_range"), "{what}: {field}");
                assert_eq!(size, if what == "11 bytes" { 11 } else { 25 }, "{what}");
            }
            other => panic!("{what}: expected TooLarge, got {other:?}"),
        }
    }
    // Ranges within the bound, one clipped at the end (asking for more than the bound).
    assert!(small.blob_read_range(d, 0, Some(10)).await.unwrap() == data[..10]);
    assert!(small.blob_read_range(d, 15, None).await.unwrap() == data[15..]);
    assert!(small.blob_read_range(d, 20, Some(1000)).await.unwrap() == data[20..]);
    // A blob within the bound is read whole; a missing one is still NotFound.
    let fits = small
        .blob_put(&data[..10], Labels::new(), None)
        .await
        .unwrap();
    assert!(small.blob_get(&fits.digest).await.unwrap() == data[..10]);
    let missing = sha256_digest(b"never stored");
    assert!(matches!(
        small.blob_get(&missing).await,
        Err(Error::NotFound { .. })
    ));
    // The default store's bound.
    assert_eq!(fleetdb::Limits::default().blob_read_bytes_max, 256 << 20);
    assert!(h.store.blob_get(d).await.unwrap() == data);
}
