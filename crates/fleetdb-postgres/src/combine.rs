//! Lone writes of many callers share transactions: group commit for the two hot single-write
//! shapes, creating one object with its tags (adding a work item) and setting one tag (making an
//! object eligible, recording a fact).
//!
//! At most [`IN_FLIGHT_MAX`] such transactions of this backend are in flight at once. A write
//! that finds a turn free runs alone at once, exactly as it would without sharing (its
//! one-statement path: one client pays nothing for the sharing). Writes arriving meanwhile wait
//! in a queue; when a transaction ends, its turn goes to the waiting ones: those of the first
//! one's shape, one per object, up to [`SHARED_MAX`] writes and [`SHARED_OPS_MAX`] ops, joined
//! into ONE batch that runs as that shape's bulk statement ([`crate::fused::MANY`] for creates,
//! [`crate::fused::TAG_SETS`] for tag sets) on a spawned task, which answers each caller with
//! the results of its own ops. Under load, a commit (its WAL flush), a round trip and one
//! statement's executor start-up carry several writes instead of one each; the transactions of
//! eight producers adding work one at a time were most of PostgreSQL's commits.
//!
//! The rules that keep it each write's own semantics:
//! - a write is either answered from the shared transaction or handed back to its caller, which
//!   runs it alone: every write of a shared transaction that could not decide (an object
//!   existed, or a namespace or an object was missing: nothing of it was written; alone, the
//!   general path decides and names the error) or that failed otherwise after its retries;
//! - except when the database could not be used (`Unavailable`): every caller gets that error,
//!   as each would have alone;
//! - one write per object in a transaction, so each op is decided on rows no other op of the
//!   transaction wrote; the ops of one write stay together and in order, so its revisions
//!   follow its op order, as alone;
//! - the transaction's time is the latest of its writes' (each write's own time is taken when
//!   it is called, before the commit that carries it);
//! - a write whose caller gave up while it waited is taken out of the queue (`Queued`): it did
//!   not happen, and must not happen later — after its caller's next writes, which need not
//!   queue (a tag delete), the next shared transaction would have written it over them. Once a
//!   shared transaction has taken it, it is written or not with that transaction (as a write
//!   alone whose caller gave up after sending it); nothing is left half-written.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use fleetdb_core::{Batch, Error, ObjectKey, Op, OpResult, Result};
use tokio::sync::oneshot;

use crate::{fused, PostgresBackend};

/// Lone-write transactions of one backend in flight at once (alone or shared). Measured with
/// the one-at-a-time benchmark flat out (8 producers, 8 workers, interleaved, a slow machine
/// hour): without sharing 878 / 1,043 completed/s while adds ran at 1,866 / 2,033/s (p99
/// 5.8 s); two in flight 1,146 / 1,517 completed/s, adds 1,350 / 1,732/s (p99 1.4–1.6 s); one
/// in flight 1,122 / 1,306 completed/s with adds at the same rate (p99 46–60 ms).
pub(crate) const IN_FLIGHT_MAX: usize = 1;

/// Writes one shared transaction carries at most.
pub(crate) const SHARED_MAX: usize = 64;

/// Ops one shared transaction carries at most (a lone create may set many tags).
pub(crate) const SHARED_OPS_MAX: usize = 1_000;

/// The shapes that share transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// One object put (a create, or an upsert with tags) followed by tag sets of that object.
    Create,
    /// One tag set.
    TagSet,
}

/// The shape of `batch` and the object it writes, if it is one that shares transactions: no
/// preconditions, and either one tag set of a valid JSON value or one object that the create path
/// takes ([`fused::new_objects`]).
pub(crate) fn shape(batch: &Batch) -> Option<(Shape, &ObjectKey)> {
    if !batch.preconditions.is_empty() {
        return None;
    }
    match batch.ops.as_slice() {
        [Op::TagSet { key, value, .. }] => serde_json::from_str::<serde_json::Value>(value)
            .is_ok()
            .then_some((Shape::TagSet, key)),
        [Op::ObjectPut { key, .. }, ..] => fused::new_objects(batch)
            .is_some_and(|objects| objects.len() == 1)
            .then_some((Shape::Create, key)),
        _ => None,
    }
}

/// What a shared transaction decided for one write.
enum Answer {
    Done(Result<Vec<OpResult>>),
    /// Nothing of it was written: the caller runs it alone.
    Alone,
}

/// A write waiting for a turn.
struct Waiting {
    /// Its place in the queue, to take it out again ([`WriteCombiner::withdraw`]).
    id: u64,
    shape: Shape,
    key: ObjectKey,
    batch: Batch,
    reply: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct State {
    in_flight: usize,
    waiting: VecDeque<Waiting>,
    next_id: u64,
}

/// The lone writes of one backend (shared by its clones).
#[derive(Default)]
pub(crate) struct WriteCombiner {
    state: Mutex<State>,
    /// Shared transactions committed, the writes they answered, and the ones that handed their
    /// writes back (for tests and debugging).
    pub(crate) shared_txns: AtomicU64,
    pub(crate) shared_writes: AtomicU64,
    pub(crate) shared_failed: AtomicU64,
}

impl WriteCombiner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A turn at once (`None`), or a place in the queue.
    fn enter(
        &self,
        shape: Shape,
        key: &ObjectKey,
        batch: &Batch,
    ) -> Option<(u64, oneshot::Receiver<Answer>)> {
        let mut state = self.lock();
        if state.in_flight < IN_FLIGHT_MAX {
            state.in_flight += 1;
            return None;
        }
        let (reply, answer) = oneshot::channel();
        let id = state.next_id;
        state.next_id += 1;
        state.waiting.push_back(Waiting {
            id,
            shape,
            key: key.clone(),
            batch: batch.clone(),
            reply,
        });
        Some((id, answer))
    }

    /// Take write `id` out of the queue if it is still there (its caller is leaving).
    fn withdraw(&self, id: u64) {
        self.lock().waiting.retain(|w| w.id != id);
    }

    /// A turn ends: the waiting writes it passes to (see the module documentation), or none —
    /// then the turn is given back.
    fn pass(&self) -> Vec<Waiting> {
        let mut state = self.lock();
        let taken = take(&mut state.waiting);
        if taken.is_empty() {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
        taken
    }
}

/// The waiting writes of the first one's shape, one per object, within [`SHARED_MAX`] and
/// [`SHARED_OPS_MAX`], in arrival order; the others keep their places.
fn take(waiting: &mut VecDeque<Waiting>) -> Vec<Waiting> {
    let Some(shape) = waiting.front().map(|w| w.shape) else {
        return Vec::new();
    };
    let mut taken: Vec<Waiting> = Vec::new();
    let mut keys = HashSet::new();
    let mut ops = 0;
    let mut kept = VecDeque::with_capacity(waiting.len());
    while let Some(w) = waiting.pop_front() {
        let fits = taken.len() < SHARED_MAX
            && (taken.is_empty() || ops + w.batch.ops.len() <= SHARED_OPS_MAX)
            && w.shape == shape
            && !keys.contains(&w.key);
        if fits {
            ops += w.batch.ops.len();
            keys.insert(w.key.clone());
            taken.push(w);
        } else {
            kept.push_back(w);
        }
    }
    *waiting = kept;
    taken
}

thread_local! {
    /// Set while this thread spawns the task a dropped turn passes on (see [`passing_on`]).
    static PASSING_ON: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The runtime to spawn the task a dropped turn (this module's or a claim's) passes its waiting
/// work on to, and a guard to hold while spawning it; `None` when that work cannot run: there
/// is no runtime (a transaction's future dropped on a plain thread), or this thread is spawning
/// such a task already — a runtime shutting down drops a spawned task at once, and with it the
/// turn the task held, whose drop would spawn the next group's task from inside the first
/// spawn, and so on, one stack frame deeper per waiting group. On `None` the caller drops the
/// waiting work's replies, group after group in a loop (each caller still there runs alone),
/// until its turn is given back.
pub(crate) fn passing_on() -> Option<(tokio::runtime::Handle, impl Drop)> {
    struct Spawning;
    impl Drop for Spawning {
        fn drop(&mut self) {
            PASSING_ON.with(|p| p.set(false));
        }
    }
    if PASSING_ON.with(|p| p.get()) {
        return None;
    }
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    PASSING_ON.with(|p| p.set(true));
    Some((runtime, Spawning))
}

/// Takes a queued write back out of the queue when its caller goes away (a timeout, a
/// `select!`); a no-op once a shared transaction has taken it.
struct Queued<'a> {
    combiner: &'a WriteCombiner,
    id: u64,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.combiner.withdraw(self.id);
    }
}

/// Holds one of the [`IN_FLIGHT_MAX`] turns; passes it on when dropped, however the transaction
/// holding it ended.
struct Turn(PostgresBackend);

impl Drop for Turn {
    fn drop(&mut self) {
        let taken = self.0.writes.pass();
        if taken.is_empty() {
            return;
        }
        let Some((runtime, _spawning)) = passing_on() else {
            drop(taken);
            while !self.0.writes.pass().is_empty() {}
            return;
        };
        // The turn goes with `taken`, made before the task: a task dropped unpolled (a runtime
        // shutting down) still passes it on when it drops.
        let turn = Turn(self.0.clone());
        let backend = self.0.clone();
        runtime.spawn(async move {
            let _turn = turn;
            backend.commit_shared(taken).await;
        });
    }
}

impl PostgresBackend {
    /// A write of a shape that shares transactions ([`shape`]): alone at once when a turn is
    /// free, else in the next shared transaction (or alone, if that one hands it back).
    pub(crate) async fn commit_lone(
        &self,
        batch: Batch,
        shape: Shape,
        key: &ObjectKey,
    ) -> Result<Vec<OpResult>> {
        match self.writes.enter(shape, key, &batch) {
            None => {
                let _turn = Turn(self.clone());
                self.commit_unshared(&batch).await
            }
            Some((id, answer)) => {
                let queued = Queued {
                    combiner: &self.writes,
                    id,
                };
                let answer = answer.await;
                drop(queued);
                match answer {
                    Ok(Answer::Done(result)) => result,
                    Ok(Answer::Alone) | Err(_) => self.commit_unshared(&batch).await,
                }
            }
        }
    }

    /// Write `taken` (one shape, distinct objects) in ONE transaction and answer each caller.
    async fn commit_shared(&self, mut taken: Vec<Waiting>) {
        if taken.len() == 1 {
            if let Some(w) = taken.pop() {
                let result = self.commit_unshared(&w.batch).await;
                let _ = w.reply.send(Answer::Done(result));
            }
            return;
        }
        let counts: Vec<usize> = taken.iter().map(|w| w.batch.ops.len()).collect();
        let joined = Batch {
            preconditions: Vec::new(),
            ops: taken
                .iter()
                .flat_map(|w| w.batch.ops.iter().cloned())
                .collect(),
            now: taken.iter().map(|w| w.batch.now).max().unwrap_or_default(),
        };
        let outcome = match taken[0].shape {
            Shape::Create => self.object_create_fused(&joined).await,
            Shape::TagSet => self.tag_sets_fused(&joined).await,
        };
        let answers: Vec<Answer> = match outcome {
            Ok(Some(results)) if results.len() == joined.ops.len() => {
                self.writes.shared_txns.fetch_add(1, Ordering::Relaxed);
                self.writes
                    .shared_writes
                    .fetch_add(taken.len() as u64, Ordering::Relaxed);
                let mut results = results.into_iter();
                counts
                    .iter()
                    .map(|&n| Answer::Done(Ok(results.by_ref().take(n).collect())))
                    .collect()
            }
            // Committed, yet not one result per op: never run such writes again.
            Ok(Some(results)) => {
                let e = Error::Backend(format!(
                    "a shared write transaction answered {} results for {} ops",
                    results.len(),
                    joined.ops.len()
                ));
                counts
                    .iter()
                    .map(|_| Answer::Done(Err(e.clone())))
                    .collect()
            }
            Err(Error::Unavailable(msg)) => counts
                .iter()
                .map(|_| Answer::Done(Err(Error::Unavailable(msg.clone()))))
                .collect(),
            other => {
                self.writes.shared_failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    writes = taken.len(),
                    outcome = ?other.as_ref().map(|r| r.as_ref().map(Vec::len)),
                    "a shared write transaction handed its writes back; each runs alone"
                );
                counts.iter().map(|_| Answer::Alone).collect()
            }
        };
        for (w, answer) in taken.into_iter().zip(answers) {
            // A caller that gave up has dropped its receiver: nothing to tell.
            let _ = w.reply.send(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetdb_core::Timestamp;

    fn waiting(shape: Shape, id: &str, ops: usize) -> Waiting {
        let key = ObjectKey::new("default", "job", id).unwrap();
        let op = Op::TagSet {
            key: key.clone(),
            name: "t".into(),
            value: "1".into(),
        };
        Waiting {
            id: 0,
            shape,
            key,
            batch: Batch {
                preconditions: Vec::new(),
                ops: vec![op; ops],
                now: Timestamp(0),
            },
            reply: oneshot::channel().0,
        }
    }

    fn ids(ws: &[Waiting]) -> Vec<String> {
        ws.iter().map(|w| w.key.id.clone()).collect()
    }

    /// A turn dropped where there is no runtime (a transaction's future dropped on a plain
    /// thread, or a runtime shutting down) with a write waiting behind it is not lost: the
    /// waiting write runs alone, and later writes get a turn at once.
    /// A batch creating job `id`.
    fn create(id: &str) -> Batch {
        Batch {
            preconditions: Vec::new(),
            now: Timestamp(5),
            ops: vec![Op::ObjectPut {
                key: ObjectKey::new("default", "job", id).unwrap(),
                labels: fleetdb_core::Labels::new(),
                mode: fleetdb_core::PutMode::Create,
            }],
        }
    }

    #[tokio::test]
    async fn a_turn_dropped_without_a_runtime_is_passed_on() {
        let (backend, base, schema) = crate::test_backend(2).await;
        let key = ObjectKey::new("default", "job", "held").unwrap();
        assert!(backend
            .writes
            .enter(Shape::Create, &key, &create("held"))
            .is_none());
        let turn = Turn(backend.clone());
        let waiter = {
            let backend = backend.clone();
            let batch = create("waiting");
            tokio::spawn(
                async move { fleetdb_core::backend::Backend::commit(&backend, batch).await },
            )
        };
        while backend.writes.lock().waiting.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        std::thread::spawn(move || drop(turn)).join().unwrap();
        waiter.await.unwrap().unwrap();
        let later = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            fleetdb_core::backend::Backend::commit(&backend, create("later")),
        )
        .await
        .expect("a later write gets a turn");
        later.unwrap();
        assert_eq!(backend.writes.lock().in_flight, 0);
        crate::testing::drop_schema(&base, &schema).await.unwrap();
    }

    /// A runtime shutting down drops each task a turn spawns at once, and with it the turn the
    /// task held: passing that one on spawned the next group's task from inside the first
    /// spawn, one stack frame deeper per waiting group (here 2,000 groups, one write each, on a
    /// thread of 256 KiB: the stack overflowed). Now the groups are drained in a loop.
    #[tokio::test]
    async fn turns_passed_on_while_the_runtime_shuts_down_do_not_recurse() {
        let (backend, base, schema) = crate::test_backend(2).await;
        let key = ObjectKey::new("default", "job", "one").unwrap();
        let batch = create("one");
        let mut turns = Vec::new();
        while backend.writes.enter(Shape::Create, &key, &batch).is_none() {
            turns.push(Turn(backend.clone()));
        }
        // One object: each group takes one write.
        let answers: Vec<_> = (0..2_000)
            .map(|_| backend.writes.enter(Shape::Create, &key, &batch).unwrap())
            .collect();
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let handle = rt.handle().clone();
                drop(rt);
                let _entered = handle.enter();
                drop(turns);
            })
            .unwrap()
            .join()
            .unwrap();
        {
            let state = backend.writes.lock();
            assert!(state.waiting.is_empty());
            assert_eq!(state.in_flight, 0);
        }
        for (_, mut a) in answers {
            assert!(
                a.try_recv().is_err(),
                "every waiting write is told to run alone"
            );
        }
        crate::testing::drop_schema(&base, &schema).await.unwrap();
    }

    #[test]
    fn a_turn_takes_one_shape_one_write_per_object_in_arrival_order() {
        let mut q: VecDeque<Waiting> = [
            waiting(Shape::TagSet, "a", 1),
            waiting(Shape::Create, "b", 2),
            waiting(Shape::TagSet, "a", 1),
            waiting(Shape::TagSet, "c", 1),
        ]
        .into_iter()
        .collect();
        let taken = take(&mut q);
        assert_eq!(ids(&taken), ["a", "c"]);
        let left: Vec<Waiting> = q.into_iter().collect();
        assert_eq!(ids(&left), ["b", "a"]);
        assert_eq!(left[0].shape, Shape::Create);
    }

    #[test]
    fn a_turn_stays_within_its_write_and_op_limits() {
        let mut q: VecDeque<Waiting> = (0..SHARED_MAX + 5)
            .map(|i| waiting(Shape::TagSet, &format!("o{i}"), 1))
            .collect();
        assert_eq!(take(&mut q).len(), SHARED_MAX);
        assert_eq!(q.len(), 5);

        let mut q: VecDeque<Waiting> = [
            waiting(Shape::Create, "a", SHARED_OPS_MAX - 1),
            waiting(Shape::Create, "b", 2),
            waiting(Shape::Create, "c", 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(ids(&take(&mut q)), ["a", "c"]);
        // A write larger than the limit still goes, alone.
        let mut q: VecDeque<Waiting> = [waiting(Shape::Create, "big", SHARED_OPS_MAX + 1)]
            .into_iter()
            .collect();
        assert_eq!(take(&mut q).len(), 1);
        assert!(take(&mut q).is_empty());
    }

    #[test]
    fn only_lone_creates_and_tag_sets_share() {
        let key = ObjectKey::new("default", "job", "a").unwrap();
        let batch = |ops: Vec<Op>| Batch {
            preconditions: Vec::new(),
            ops,
            now: Timestamp(0),
        };
        let set = |value: &str| Op::TagSet {
            key: key.clone(),
            name: "t".into(),
            value: value.into(),
        };
        let put = |mode| Op::ObjectPut {
            key: key.clone(),
            labels: Default::default(),
            mode,
        };
        use fleetdb_core::PutMode;
        assert_eq!(
            shape(&batch(vec![set("1")])).map(|s| s.0),
            Some(Shape::TagSet)
        );
        assert_eq!(shape(&batch(vec![set("{bad")])), None);
        assert_eq!(shape(&batch(vec![set("1"), set("2")])), None);
        assert_eq!(
            shape(&batch(vec![put(PutMode::Create), set("1")])).map(|s| s.0),
            Some(Shape::Create)
        );
        assert_eq!(
            shape(&batch(vec![put(PutMode::Create)])).map(|s| s.0),
            Some(Shape::Create)
        );
        // A lone upsert usually updates: not a create.
        assert_eq!(shape(&batch(vec![put(PutMode::Upsert)])), None);
        let mut guarded = batch(vec![set("1")]);
        guarded
            .preconditions
            .push(fleetdb_core::Precondition::SessionAlive {
                session_id: "s".into(),
            });
        assert_eq!(shape(&guarded), None);
    }
}
