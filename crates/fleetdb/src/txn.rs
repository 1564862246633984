//! User transactions: optimistic, with buffered writes.
//!
//! Inside [`crate::Store::txn`], reads go to the store and remember the revision they saw;
//! writes are buffered. At the end, everything is committed as ONE [`Batch`] whose preconditions
//! are those reads: if anything read has changed meanwhile, the commit fails with `Conflict` and
//! the closure runs again on fresh data. So the closure may run more than once and must be free of
//! side effects outside the transaction (no sending of messages, no counters).
//!
//! This shape is the same for every backend (embedded, PostgreSQL, remote): a batch is plain data.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fleetdb_core::{
    validate, Backend, Batch, Error, Labels, Limits, Namespace, Object, ObjectKey, Op,
    Precondition, PutMode, Result, Revision, Tag, Timestamp,
};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ReadKey {
    Namespace(String),
    Object(ObjectKey),
    Tag(ObjectKey, String),
}

#[derive(Debug, Default)]
struct State {
    reads: BTreeMap<ReadKey, Option<Revision>>,
    ops: Vec<Op>,
    /// The ops' content so far ([`Op::payload_bytes`]).
    bytes: usize,
    /// The attempt this handle belongs to has ended (its closure returned: the batch was taken
    /// to commit, or the attempt was given up or is run again with a new handle). A clone used
    /// after it is refused: a write would go into a batch already committed or thrown away.
    ended: bool,
}

/// A transaction handle, passed by value to the closure (clones share the same transaction).
///
/// A handle serves one attempt of the closure, until the closure returns: a clone used after
/// that (kept outside the closure, or held by a task that outlives it) refuses reads and writes
/// with `Invalid` rather than accept writes that nothing will commit.
#[derive(Clone)]
pub struct Txn {
    backend: Arc<dyn Backend>,
    limits: Limits,
    now: Timestamp,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Txn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn").field("now", &self.now).finish()
    }
}

impl Txn {
    pub(crate) fn new(backend: Arc<dyn Backend>, limits: Limits, now: Timestamp) -> Self {
        Txn {
            backend,
            limits,
            now,
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record that `key` was seen at `revision`. Two reads of one key that disagree mean a
    /// concurrent change: fail early with `Conflict` (the transaction is retried).
    fn record(&self, key: ReadKey, revision: Option<Revision>) -> Result<()> {
        let mut st = self.state();
        open(&st)?;
        if st.reads.len() >= self.limits.txn_reads_max && !st.reads.contains_key(&key) {
            return Err(Error::invalid(
                "transaction",
                format!("{} reads", st.reads.len() + 1),
                format!(
                    "at most {} reads per transaction",
                    self.limits.txn_reads_max
                ),
            ));
        }
        match st.reads.get(&key) {
            Some(seen) if *seen != revision => Err(Error::Conflict {
                what: format!("{key:?}"),
            }),
            Some(_) => Ok(()),
            None => {
                st.reads.insert(key, revision);
                Ok(())
            }
        }
    }

    fn push(&self, op: Op) -> Result<()> {
        op.validate(&self.limits)?;
        let mut st = self.state();
        open(&st)?;
        if st.ops.len() >= self.limits.txn_ops_max {
            return Err(Error::invalid(
                "transaction",
                format!("{} writes", st.ops.len() + 1),
                format!("at most {} writes per transaction", self.limits.txn_ops_max),
            ));
        }
        let bytes = st.bytes + op.payload_bytes();
        fleetdb_core::batch::txn_bytes_within(bytes, &self.limits)?;
        st.bytes = bytes;
        st.ops.push(op);
        Ok(())
    }

    /// The time this attempt of the transaction runs at (from the store's clock).
    pub fn now(&self) -> Timestamp {
        self.now
    }

    // ---- reads (see the transaction's own earlier writes) ----

    pub async fn namespace_get(&self, name: &str) -> Result<Option<Namespace>> {
        validate::name("namespace", name)?;
        let base = self.backend.namespace_get(name).await?;
        self.record(
            ReadKey::Namespace(name.to_string()),
            base.as_ref().map(|n| n.revision),
        )?;
        let st = self.state();
        let mut cur = base;
        for op in &st.ops {
            match op {
                Op::NamespaceCreate { name: n, labels } if n == name => {
                    cur = Some(Namespace {
                        name: n.clone(),
                        labels: validate::merge_labels(&Labels::new(), labels)?,
                        created_at: self.now,
                        updated_at: self.now,
                        revision: Revision(0),
                    })
                }
                Op::NamespaceLabels { name: n, labels } if n == name => {
                    if let Some(ns) = cur.as_mut() {
                        ns.labels = validate::merge_labels(&ns.labels, labels)?;
                        ns.updated_at = self.now;
                    }
                }
                Op::NamespaceDelete { name: n } if n == name => cur = None,
                _ => {}
            }
        }
        Ok(cur)
    }

    pub async fn object_get(&self, key: &ObjectKey) -> Result<Option<Object>> {
        key.validate()?;
        let base = self.backend.object_get(key).await?;
        self.record(
            ReadKey::Object(key.clone()),
            base.as_ref().map(|o| o.revision),
        )?;
        let st = self.state();
        let mut cur = base;
        for op in &st.ops {
            match op {
                Op::ObjectPut { key: k, labels, .. } if k == key => {
                    cur = Some(match cur.take() {
                        Some(mut o) => {
                            o.labels = validate::merge_labels(&o.labels, labels)?;
                            o.updated_at = self.now;
                            o
                        }
                        None => Object {
                            key: key.clone(),
                            labels: validate::merge_labels(&Labels::new(), labels)?,
                            created_at: self.now,
                            updated_at: self.now,
                            revision: Revision(0),
                        },
                    })
                }
                Op::ObjectDelete { key: k } if k == key => cur = None,
                _ => {}
            }
        }
        Ok(cur)
    }

    pub async fn tag_get(&self, key: &ObjectKey, name: &str) -> Result<Option<Tag>> {
        key.validate()?;
        validate::name("tag", name)?;
        let base = self.backend.tag_get(key, name).await?;
        self.record(
            ReadKey::Tag(key.clone(), name.to_string()),
            base.as_ref().map(|t| t.revision),
        )?;
        let st = self.state();
        let mut cur = base;
        for op in &st.ops {
            match op {
                Op::TagSet {
                    key: k,
                    name: n,
                    value,
                } if k == key && n == name => {
                    cur = Some(Tag {
                        object: key.clone(),
                        name: name.to_string(),
                        value: validate::parse_json("tag value", value)?,
                        updated_at: self.now,
                        revision: Revision(0),
                    })
                }
                Op::TagDelete { key: k, name: n } if k == key && n == name => cur = None,
                Op::ObjectDelete { key: k } if k == key => cur = None,
                _ => {}
            }
        }
        Ok(cur)
    }

    // ---- writes (buffered; validated now, applied at commit) ----

    pub fn namespace_create(&self, name: &str, labels: Labels) -> Result<()> {
        self.push(Op::NamespaceCreate {
            name: name.to_string(),
            labels,
        })
    }

    pub fn namespace_set_labels(&self, name: &str, labels: Labels) -> Result<()> {
        self.push(Op::NamespaceLabels {
            name: name.to_string(),
            labels,
        })
    }

    pub fn namespace_delete(&self, name: &str) -> Result<()> {
        self.push(Op::NamespaceDelete {
            name: name.to_string(),
        })
    }

    /// Create or update an object; `labels` is a patch (an empty value deletes a label).
    pub fn object_put(&self, key: &ObjectKey, labels: Labels) -> Result<()> {
        self.push(Op::ObjectPut {
            key: key.clone(),
            labels,
            mode: PutMode::Upsert,
        })
    }

    /// Create an object that must not exist yet.
    pub fn object_create(&self, key: &ObjectKey, labels: Labels) -> Result<()> {
        self.push(Op::ObjectPut {
            key: key.clone(),
            labels,
            mode: PutMode::Create,
        })
    }

    pub fn object_delete(&self, key: &ObjectKey) -> Result<()> {
        self.push(Op::ObjectDelete { key: key.clone() })
    }

    pub fn tag_set(&self, key: &ObjectKey, name: &str, value: &serde_json::Value) -> Result<()> {
        let text = validate::canonical_json(
            &format!("tag {name:?} value"),
            value,
            self.limits.tag_value_bytes_max,
        )?;
        self.push(Op::TagSet {
            key: key.clone(),
            name: name.to_string(),
            value: text,
        })
    }

    pub fn tag_delete(&self, key: &ObjectKey, name: &str) -> Result<()> {
        self.push(Op::TagDelete {
            key: key.clone(),
            name: name.to_string(),
        })
    }

    /// A guard that ends this handle's attempt when dropped: also when the caller gives up on the
    /// transaction (drops its future) while the closure runs.
    pub(crate) fn end_on_drop(&self) -> EndOnDrop {
        EndOnDrop(self.state.clone())
    }

    /// Turn the transaction into the batch to commit, and end its attempt: every clone of this
    /// handle refuses to be used from now on (called once the closure returned, whatever it
    /// returned).
    pub(crate) fn into_batch(self) -> Batch {
        let st = std::mem::replace(
            &mut *self.state(),
            State {
                ended: true,
                ..State::default()
            },
        );
        Batch {
            preconditions: st
                .reads
                .into_iter()
                .map(|(k, revision)| match k {
                    ReadKey::Namespace(name) => Precondition::Namespace { name, revision },
                    ReadKey::Object(key) => Precondition::Object { key, revision },
                    ReadKey::Tag(key, name) => Precondition::Tag {
                        key,
                        name,
                        revision,
                    },
                })
                .collect(),
            ops: st.ops,
            now: self.now,
        }
    }
}

/// Ends a handle's attempt when dropped ([`Txn::end_on_drop`]).
pub(crate) struct EndOnDrop(Arc<Mutex<State>>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).ended = true;
    }
}

/// `Invalid` once the handle's attempt has ended ([`State::ended`]).
fn open(st: &State) -> Result<()> {
    if st.ended {
        return Err(Error::invalid(
            "transaction",
            "a handle used after its attempt ended",
            "a Txn is usable only inside its closure until the closure returns (this attempt \
             committed, gave up or ran again with a new Txn): nothing was read or written",
        ));
    }
    Ok(())
}
