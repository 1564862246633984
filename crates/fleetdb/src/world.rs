//! The World API: what hosts share (see `fleetdb_core::world` for the model and limits).
//!
//! Key-values, deploys, schedules and membership are read by anyone through [`Store`]. What is
//! a host's own — its exports, its value in a per-host map, its scheduler registration — is
//! written through a [`World`] handle bound to that host, and exports are collected through it
//! too, so a host only ever sees exports meant for it. (Over the network the server will bind
//! the handle to the caller's credentials.) [`Store::changes`] and a [`Store::watch`] without a
//! viewer are the operator's views: they carry every export's data, whoever it is for.

use std::collections::BTreeMap;

use fleetdb_core::validate;
use fleetdb_core::work::SessionInfo;
use fleetdb_core::world::{
    self, Deploy, DeployDraft, DeployFile, Export, ExportFilter, ExportId, ExportOutcome,
    ExportRecord, KvEntry, Lifetime, Registration, Schedule, ScheduleOptions, Space, WorldQuery,
    WorldRecord,
};
use fleetdb_core::{Applied, Error, Labels, Op, OpResult, Page, Result, Revision};

use crate::watch::{Watch, WatchRequest, WatchScope};
use crate::{check_limit, Session, Store, Written};

/// Filters in one collect call.
pub const COLLECT_FILTERS_MAX: usize = 100;

/// How long the lease that protects a deploy's file blobs, written before the deploy itself,
/// lives if the deploy never lands (it is deleted as soon as the deploy is written or refused).
const DEPLOY_UPLOAD_LEASE: std::time::Duration = std::time::Duration::from_secs(600);

fn one(results: Vec<OpResult>) -> Result<OpResult> {
    results
        .into_iter()
        .next()
        .ok_or_else(|| Error::Backend("the backend returned no result for a write".into()))
}

fn record(r: OpResult) -> Result<Written<WorldRecord>> {
    match r.applied {
        Applied::World(rec) => Ok(Written {
            item: *rec,
            changed: r.changed,
        }),
        _ => Err(Error::Backend(
            "the backend returned the wrong kind of result for a World write".into(),
        )),
    }
}

fn exports(r: OpResult) -> Result<ExportOutcome> {
    match r.applied {
        Applied::Exports(o) => Ok(o),
        _ => Err(Error::Backend(
            "the backend returned the wrong kind of result for an export".into(),
        )),
    }
}

fn deleted(r: OpResult) -> Result<Revision> {
    match r.applied {
        Applied::Deleted { revision } => Ok(revision),
        _ => Err(Error::Backend(
            "the backend returned the wrong kind of result for a delete".into(),
        )),
    }
}

impl Store {
    /// The World as host `host` sees and writes it.
    pub fn world(&self, host: &str) -> Result<World> {
        validate::name("host", host)?;
        Ok(World {
            store: self.clone(),
            host: host.to_string(),
        })
    }

    async fn world_query(&self, q: WorldQuery) -> Result<Vec<WorldRecord>> {
        self.ready().await?;
        self.backend.world_list(&q).await
    }

    /// Every record `q` selects, page by page (`q.limit` per page), all pages from one
    /// snapshot (a write committing meanwhile is wholly in or wholly out).
    async fn world_query_all(&self, q: WorldQuery) -> Result<Vec<WorldRecord>> {
        Ok(self
            .world_snapshot(vec![q])
            .await?
            .pop()
            .unwrap_or_default())
    }

    /// Every record of each query, page by page, all from ONE snapshot.
    async fn world_snapshot(&self, queries: Vec<WorldQuery>) -> Result<Vec<Vec<WorldRecord>>> {
        self.ready().await?;
        let n = queries.len();
        let out = self.backend.world_list_all(&queries).await?;
        if out.len() != n {
            return Err(Error::Backend(format!(
                "the backend answered {} World queries, not {n}",
                out.len()
            )));
        }
        Ok(out)
    }

    async fn world_one(&self, space: Space, key: &str) -> Result<Option<WorldRecord>> {
        let mut q = WorldQuery::new(space);
        q.key = Some(key.to_string());
        q.live_at = Some(self.clock.now());
        q.limit = 1;
        Ok(self.world_query(q).await?.pop())
    }

    // ---- key-values ----

    /// The entry at `key`; `None` if there is none (a missing key is not an error).
    pub async fn kv_get(&self, key: &str) -> Result<Option<KvEntry>> {
        world::validate_kv_key(key)?;
        Ok(self.world_one(Space::Kv, key).await?.map(KvEntry::from))
    }

    /// Entries whose key starts with `prefix`, in key order, after `after`, at most `limit`;
    /// `next` is the cursor of the next page (the last key), `None` when this page ends the
    /// listing (one row more than `limit` is read to tell).
    pub async fn kv_list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<KvEntry>> {
        world::validate_kv_prefix(prefix)?;
        check_limit(limit)?;
        if let Some(a) = after {
            // A position is a key a listing returned: anything else (a NUL, which PostgreSQL's
            // text refuses) is refused here, alike on every backend.
            world::validate_kv_key(a)?;
        }
        let mut q = WorldQuery::new(Space::Kv);
        q.key_prefix = Some(prefix.to_string());
        q.after_key = after.map(str::to_string);
        q.live_at = Some(self.clock.now());
        q.limit = limit + 1;
        let mut items: Vec<KvEntry> = self
            .world_query(q)
            .await?
            .into_iter()
            .map(KvEntry::from)
            .collect();
        let next = crate::next_page(&mut items, limit, |e| e.key.clone());
        Ok(Page { items, next })
    }

    /// Set a key (persistent). Setting the same value changes nothing (`changed: false`).
    pub async fn kv_set(&self, key: &str, value: &str) -> Result<Written<KvEntry>> {
        self.kv_set_with(key, value, None, Lifetime::persistent())
            .await
    }

    /// Set a key only if its revision is `expect` (`Revision(0)`: only if absent); otherwise
    /// `Conflict` naming the current revision.
    pub async fn kv_cas(
        &self,
        key: &str,
        value: &str,
        expect: Revision,
    ) -> Result<Written<KvEntry>> {
        self.kv_set_with(key, value, Some(expect), Lifetime::persistent())
            .await
    }

    /// Set a key with every option: compare-and-set and a lifetime (session-bound or TTL).
    pub async fn kv_set_with(
        &self,
        key: &str,
        value: &str,
        expect: Option<Revision>,
        lifetime: Lifetime,
    ) -> Result<Written<KvEntry>> {
        let r = one(self
            .write(vec![Op::KvSet {
                key: key.to_string(),
                value: value.to_string(),
                expect,
                lifetime,
            }])
            .await?)?;
        let w = record(r)?;
        Ok(Written {
            item: KvEntry::from(w.item),
            changed: w.changed,
        })
    }

    /// Delete a key (`NotFound` if missing); with `expect`, only at that revision.
    pub async fn kv_delete(&self, key: &str, expect: Option<Revision>) -> Result<Revision> {
        deleted(one(self
            .write(vec![Op::KvDelete {
                key: key.to_string(),
                expect,
            }])
            .await?)?)
    }

    // ---- per-host maps ----

    /// Every host's value in map `namespace`: host → value.
    pub async fn map_get(&self, namespace: &str) -> Result<BTreeMap<String, String>> {
        validate::name("map namespace", namespace)?;
        let mut q = WorldQuery::new(Space::Map);
        q.scope = Some(namespace.to_string());
        q.limit = fleetdb_core::query::LIST_PAGE_MAX;
        Ok(self
            .world_query_all(q)
            .await?
            .into_iter()
            .map(|r| (r.owner.clone(), r.text()))
            .collect())
    }

    // ---- deploys ----

    /// Add a deploy: `id` must be new, deploy `id - 1` must exist (unless `id` is 1), and when
    /// both `hash` and `parent_hash` are given, `parent_hash` must equal deploy `id - 1`'s hash.
    /// A refusal is `Refused` (or `AlreadyExists`) saying which rule failed. Files of the tree are
    /// stored once per content (sha256).
    ///
    /// The files' contents go to the content store first (each distinct content once, under a
    /// short lease so that no collection removes them before the deploy holds them), then the
    /// deploy is written in one transaction that checks they are there. A retained deploy holds
    /// its files' blobs; once pruned, blobs no other deploy or root holds are collected.
    pub async fn deploy_add(&self, mut draft: DeployDraft) -> Result<Deploy> {
        draft.validate()?;
        let files = std::mem::take(&mut draft.files);
        if !files.is_empty() {
            // Refuse what the chain refuses before uploading anything (the transaction decides
            // again: another deploy may land meanwhile).
            let previous = match draft.id {
                1 => None,
                id => self.deploy_get(id - 1).await?,
            };
            let exists = self.deploy_get(draft.id).await?.is_some();
            world::check_deploy_chain(
                &draft,
                exists,
                self.deploy_max_id().await?,
                previous.as_ref(),
            )?;
        }
        let lease = if files.is_empty() {
            None
        } else {
            Some(
                self.lease_create(crate::LeaseSpec {
                    id: None,
                    labels: Labels::new(),
                    flat: true,
                    expire_in: Some(DEPLOY_UPLOAD_LEASE),
                })
                .await?,
            )
        };
        let written = async {
            let mut stored = Vec::with_capacity(files.len());
            let mut sizes: std::collections::HashMap<String, u64> = Default::default();
            for f in &files {
                let digest = world::sha256_digest(&f.content);
                if !sizes.contains_key(&digest) {
                    let info = self
                        .blob_put(
                            &f.content,
                            Labels::new(),
                            lease.as_ref().map(|l| l.id.as_str()),
                        )
                        .await?;
                    sizes.insert(digest.clone(), info.size);
                }
                stored.push(DeployFile {
                    path: f.path.clone(),
                    mode: f.mode,
                    size: sizes[&digest],
                    digest,
                });
            }
            self.write(vec![Op::DeployAdd {
                deploy: draft,
                stored,
            }])
            .await
        }
        .await;
        if let Some(l) = lease {
            // The deploy holds the blobs now (or failed); the lease would expire anyway.
            if let Err(e) = self.lease_delete(&l.id, false).await {
                tracing::debug!(lease = %l.id, error = %e, "dropping a deploy upload lease failed");
            }
        }
        let w = record(one(written?)?)?;
        Deploy::try_from(w.item)
    }

    pub async fn deploy_get(&self, id: u64) -> Result<Option<Deploy>> {
        self.world_one(Space::Deploy, &world::deploy_key(id))
            .await?
            .map(Deploy::try_from)
            .transpose()
    }

    /// Deploys in id order after `after`, at most `limit`.
    pub async fn deploy_list(&self, after: Option<u64>, limit: usize) -> Result<Vec<Deploy>> {
        check_limit(limit)?;
        let mut q = WorldQuery::new(Space::Deploy);
        q.after_key = after.map(world::deploy_key);
        q.limit = limit;
        self.world_query(q)
            .await?
            .into_iter()
            .map(Deploy::try_from)
            .collect()
    }

    /// The highest deploy id (one index lookup), `None` if there is no deploy.
    pub async fn deploy_max_id(&self) -> Result<Option<u64>> {
        let mut q = WorldQuery::new(Space::Deploy);
        q.descending = true;
        q.limit = 1;
        self.world_query(q)
            .await?
            .pop()
            .map(|r| world::parse_deploy_key(&r.key))
            .transpose()
    }

    /// The files of a deploy's tree with their contents, byte-identical to what was added.
    pub async fn deploy_files(&self, id: u64) -> Result<Vec<(DeployFile, Vec<u8>)>> {
        let Some(d) = self.deploy_get(id).await? else {
            return Err(Error::not_found(format!("deploy {id}")));
        };
        let mut out = Vec::with_capacity(d.files.len());
        for f in d.files {
            // The content store; deploys added before trees moved there kept them as World blobs.
            // Its size is known (at most the tree's bound): no size lookup before the read.
            let bytes = match self.blob_read_range(&f.digest, 0, Some(f.size)).await {
                Ok(bytes) => bytes,
                Err(Error::NotFound { .. }) => {
                    match self.world_one(Space::Blob, &f.digest).await? {
                        Some(blob) => blob.data,
                        None => {
                            return Err(Error::Backend(format!(
                                "blob {} of deploy {id} file {:?} is missing",
                                f.digest, f.path
                            )))
                        }
                    }
                }
                Err(e) => return Err(e),
            };
            out.push((f, bytes));
        }
        Ok(out)
    }

    /// Remove deploys with id < `before` (the newest deploy always stays). Returns how many.
    /// Their files' blobs stay until a collection finds nothing else holds them.
    pub async fn deploy_prune(&self, before: u64) -> Result<u64> {
        let r = one(self.write(vec![Op::DeployPrune { before }]).await?)?;
        match r.applied {
            Applied::Done { count } => Ok(count),
            _ => Err(Error::Backend("unexpected result of a deploy prune".into())),
        }
    }

    // ---- scheduler and membership ----

    /// The scheduled hosts of `namespace` (`None`: nobody ever registered).
    ///
    /// Never a host whose registration is no longer live: when a registered session passed its
    /// deadline and no sweep has rewritten the schedule yet, the hosts are computed here from
    /// the live registrations and the stored schedule, as that sweep will write them
    /// ([`world::compute_schedule`]); `revision` and `updated_at` stay the stored schedule's.
    pub async fn schedule_get(&self, namespace: &str) -> Result<Option<Schedule>> {
        validate::name("scheduler namespace", namespace)?;
        let mut stored = WorldQuery::new(Space::Schedule);
        stored.key = Some(namespace.to_string());
        stored.limit = 1;
        let [schedule, registrations]: [Vec<WorldRecord>; 2] = self
            .world_snapshot(vec![stored, self.registrations_query(namespace)])
            .await?
            .try_into()
            .map_err(|_| Error::Backend("the backend answered the wrong World queries".into()))?;
        let Some(record) = schedule.into_iter().next() else {
            return Ok(None);
        };
        let live = registrations
            .into_iter()
            .map(Registration::try_from)
            .collect::<Result<Vec<_>>>()?;
        Schedule::try_from(world::schedule_record_live(record, &live)?).map(Some)
    }

    /// The live registrations of `namespace`, by host.
    pub async fn schedule_registrations(&self, namespace: &str) -> Result<Vec<Registration>> {
        validate::name("scheduler namespace", namespace)?;
        self.world_query_all(self.registrations_query(namespace))
            .await?
            .into_iter()
            .map(Registration::try_from)
            .collect()
    }

    fn registrations_query(&self, namespace: &str) -> WorldQuery {
        let mut q = WorldQuery::new(Space::Registration);
        q.scope = Some(namespace.to_string());
        q.live_at = Some(self.clock.now());
        q.limit = fleetdb_core::query::LIST_PAGE_MAX;
        q
    }

    /// The live sessions (host, component, runtime info), by id.
    pub async fn members(&self) -> Result<Vec<SessionInfo>> {
        self.ready().await?;
        let now = self.clock.now();
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .backend
                .session_list(after.as_deref(), fleetdb_core::query::LIST_PAGE_MAX)
                .await?;
            let done = page.len() < fleetdb_core::query::LIST_PAGE_MAX;
            after = page.last().map(|s| s.id.clone());
            out.extend(page.into_iter().filter(|s| s.alive_at(now)));
            if done {
                return Ok(out);
            }
        }
    }
}

/// One host's view of the World: what it exports, collects, and owns.
#[derive(Debug, Clone)]
pub struct World {
    store: Store,
    host: String,
}

impl World {
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Export records. Identical records are not rewritten; the outcome lists exactly which
    /// records changed and which did not.
    pub async fn export(&self, records: Vec<ExportRecord>) -> Result<ExportOutcome> {
        self.export_op(records, false).await
    }

    /// Make `records` this host's complete export set, atomically: every other export of the
    /// host is removed (listed in `removed`). A restarted host calls this to clean up.
    pub async fn sync_exports(&self, records: Vec<ExportRecord>) -> Result<ExportOutcome> {
        self.export_op(records, true).await
    }

    async fn export_op(&self, records: Vec<ExportRecord>, sync: bool) -> Result<ExportOutcome> {
        exports(one(self
            .store
            .write(vec![Op::Export {
                host: self.host.clone(),
                records,
                sync,
            }])
            .await?)?)
    }

    /// Remove exports of this host by (kind, name, target); missing ones are ignored.
    pub async fn unexport(&self, ids: Vec<ExportId>) -> Result<ExportOutcome> {
        exports(one(self
            .store
            .write(vec![Op::Unexport {
                host: self.host.clone(),
                ids,
            }])
            .await?)?)
    }

    /// Exports this host may see (its own, those to it and those to `*`) that pass any of the
    /// filters (none: all), filtered in the database. Ordered by record key,
    /// `from/kind/name/target` compared as bytes (so host `h1-a` comes before `h1`).
    pub async fn collect(&self, filters: &[ExportFilter]) -> Result<Vec<Export>> {
        if filters.len() > COLLECT_FILTERS_MAX {
            return Err(Error::invalid(
                "collect filters",
                filters.len().to_string(),
                format!("at most {COLLECT_FILTERS_MAX}"),
            ));
        }
        filters.iter().try_for_each(ExportFilter::validate)?;
        let mut q = WorldQuery::new(Space::Export);
        q.viewer = Some(self.host.clone());
        q.filters = filters.to_vec();
        q.live_at = Some(self.store.clock.now());
        q.limit = fleetdb_core::query::LIST_PAGE_MAX;
        Ok(self
            .store
            .world_query_all(q)
            .await?
            .into_iter()
            .map(Export::from)
            .collect())
    }

    /// Set this host's value in map `namespace`.
    pub async fn map_set(&self, namespace: &str, value: &str) -> Result<Written<String>> {
        let w = record(one(self
            .store
            .write(vec![Op::MapSet {
                namespace: namespace.to_string(),
                host: self.host.clone(),
                value: value.to_string(),
            }])
            .await?)?)?;
        Ok(Written {
            item: w.item.text(),
            changed: w.changed,
        })
    }

    /// Delete this host's value in map `namespace` (`NotFound` if it has none).
    pub async fn map_delete(&self, namespace: &str) -> Result<Revision> {
        deleted(one(self
            .store
            .write(vec![Op::MapDelete {
                namespace: namespace.to_string(),
                host: self.host.clone(),
            }])
            .await?)?)
    }

    /// Register this host for scheduling in `namespace`, bound to `session` (which must be this
    /// host's): it drops out when the session ends.
    pub async fn schedule_register(
        &self,
        namespace: &str,
        session: &Session,
        options: ScheduleOptions,
    ) -> Result<Registration> {
        let w = record(one(self
            .store
            .write(vec![Op::ScheduleRegister {
                namespace: namespace.to_string(),
                host: self.host.clone(),
                session_id: session.id().to_string(),
                options,
            }])
            .await?)?)?;
        Registration::try_from(w.item)
    }

    /// Remove this host's registration in `namespace` (the schedule is recomputed in the same
    /// transaction). `NotFound` when there is none, or when its session has passed its deadline
    /// (it is invisible already; the sweep removes it).
    pub async fn schedule_unregister(&self, namespace: &str) -> Result<Revision> {
        deleted(one(self
            .store
            .write(vec![Op::ScheduleUnregister {
                namespace: namespace.to_string(),
                host: self.host.clone(),
            }])
            .await?)?)
    }

    /// Watch as this host: exports directed to other hosts are never delivered.
    pub async fn watch(&self, scope: WatchScope, from: Option<Revision>) -> Result<Watch> {
        let mut req = WatchRequest::new(scope).viewer(self.host.clone());
        req.from_revision = from;
        self.store.watch(req).await
    }
}
