//! `fleetdb session|process|work|backoff|history|select|worker`.

use clap::{Args, Subcommand};
use fleetdb::{BackoffWhich, Error, HistoryEntry, HistoryFilter, ObjectKey, Store};
use serde_json::{json, Value};

use crate::output::{self, Format};

#[derive(Subcommand, Debug)]
pub enum SessionCmd {
    /// List sessions (live and expired but not yet swept).
    Ls,
    /// Show one session.
    Show { id: String },
    /// Close a session: release its work (history: Canceled) and delete it.
    Close { id: String },
}

#[derive(Subcommand, Debug)]
pub enum ProcessCmd {
    /// Declare a process (or change its conflicts).
    Define {
        name: String,
        /// Processes it conflicts with (declared already), comma-separated.
        #[arg(long, value_delimiter = ',')]
        conflicts: Vec<String>,
    },
    /// List declared processes.
    Ls,
    /// Pause a process: no claim for it starts until it is resumed (claims held go on).
    Pause { name: String },
    /// Resume a paused process.
    Resume { name: String },
    /// Limit a process to N claims held at once, fleet-wide (`none`: no limit).
    Limit {
        name: String,
        /// Claims held at once (1 to 1,000,000), or `none`.
        max_active: String,
    },
    /// Park an object after N failures of the process in a row: no claim takes it again until
    /// `backoff clear` (`none`: retry for ever).
    MaxFailures {
        name: String,
        /// Failures in a row (1 to 1,000,000), or `none`.
        max_failures: String,
    },
}

/// Paging of `work ls` and `backoff ls` (their JSON stays an array: when more remain, the
/// cursor of the rest is said on stderr, `more: --cursor C`).
#[derive(clap::Args, Debug)]
pub struct PageArgs {
    /// Page size (1..=1000).
    #[arg(long, default_value_t = 1000, value_parser = crate::output::page_limit)]
    limit: usize,
    /// Continue after this cursor (from a previous page's `more: --cursor C`).
    #[arg(long)]
    cursor: Option<String>,
}

impl PageArgs {
    /// Every page `fetch` gives from the cursor on (one page unless `all`), and the cursor of
    /// the rest, if any.
    async fn collect<T, F, Fut>(
        &self,
        all: bool,
        mut fetch: F,
    ) -> Result<(Vec<T>, Option<String>), Error>
    where
        F: FnMut(Option<String>, usize) -> Fut,
        Fut: std::future::Future<Output = Result<fleetdb::Page<T>, Error>>,
    {
        let mut items = Vec::new();
        let mut cursor = self.cursor.clone();
        loop {
            let page = fetch(cursor, self.limit).await?;
            items.extend(page.items);
            match page.next {
                Some(next) if all => cursor = Some(next),
                rest => return Ok((items, rest)),
            }
        }
    }
}

/// Say where the rest of a listing starts (stderr: stdout keeps its documented shape).
fn more(next: Option<String>) {
    if let Some(n) = next {
        eprintln!("more: --cursor {n}");
    }
}

#[derive(Subcommand, Debug)]
pub enum WorkCmd {
    /// List active claims (ordered by process, then object).
    Ls {
        #[arg(long)]
        process: Option<String>,
        /// Only the claims of this session.
        #[arg(long)]
        session: Option<String>,
        #[command(flatten)]
        page: PageArgs,
        /// Follow cursors and list everything.
        #[arg(long)]
        all: bool,
    },
    /// Force-cancel a claim, whoever holds it (its holder then gets WorkLost).
    Cancel {
        kind: String,
        id: String,
        process: String,
    },
    /// Why an object is or is not claimed for a process: every reason a claim would not take it
    /// (paused, at the limit, held, in backoff, parked, not matching the selector), the claims on
    /// it, its backoff and its latest history. Takes and writes nothing.
    Explain {
        /// Kind of the object.
        kind: String,
        /// Id of the object.
        id: String,
        /// The process whose claims would take it.
        #[arg(long)]
        process: String,
        /// The workers' selector: which of its terms the object fails.
        #[arg(long)]
        selector: Option<String>,
        /// History events shown (newest first).
        #[arg(long, default_value_t = 5)]
        history: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum BackoffCmd {
    /// List backoffs (active ones; --all for those already over too; --parked for the parked
    /// ones only).
    Ls {
        #[arg(long)]
        process: Option<String>,
        #[arg(long, conflicts_with = "parked")]
        all: bool,
        #[arg(long)]
        parked: bool,
        #[command(flatten)]
        page: PageArgs,
        /// Follow cursors and list everything (`--all` shows the backoffs already over).
        #[arg(long)]
        all_pages: bool,
    },
    /// Clear the backoff of an object for a process.
    Clear {
        kind: String,
        id: String,
        process: String,
    },
    /// Clear every parked backoff (of one process with --process): the objects run again.
    Unpark {
        #[arg(long)]
        process: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// Kind and id of the object (or use --process).
    #[arg(num_args = 0..=2)]
    object: Vec<String>,
    /// History of one process instead of one object.
    #[arg(long, conflicts_with = "object")]
    process: Option<String>,
    #[arg(long, default_value_t = 100, value_parser = crate::output::page_limit)]
    limit: usize,
    #[arg(long)]
    cursor: Option<String>,
}

#[derive(Args, Debug)]
pub struct SelectArgs {
    /// The selector (see docs/selectors.md).
    selector: String,
    /// Only print how many objects match.
    #[arg(long)]
    count: bool,
    #[arg(long, default_value_t = 100, value_parser = crate::output::page_limit)]
    limit: usize,
    #[arg(long)]
    cursor: Option<String>,
}

pub(crate) fn session_json(s: &fleetdb::SessionInfo, now: fleetdb::Timestamp) -> Value {
    json!({
        "id": s.id, "component": s.component, "host": s.host, "runtime_info": s.runtime_info,
        "ttl_ms": s.ttl_ms, "created_at": s.created_at.to_rfc3339(), "deadline": s.deadline.to_rfc3339(),
        "alive": s.alive_at(now),
    })
}

fn work_json(w: &fleetdb::WorkInfo) -> Value {
    json!({
        "namespace": w.key.namespace, "kind": w.key.kind, "id": w.key.id, "process": w.process,
        "session_id": w.session_id, "token": w.token, "started_at": w.started_at.to_rfc3339(),
    })
}

fn backoff_json(b: &fleetdb::BackoffInfo) -> Value {
    json!({"namespace": b.key.namespace, "kind": b.key.kind, "id": b.key.id, "process": b.process,
        "until": (!b.parked()).then(|| b.until.to_rfc3339()), "parked": b.parked(),
        "failures": b.failures, "cause": b.cause, "last_interval_s": b.last_interval_s})
}

fn history_json(e: &HistoryEntry) -> Value {
    json!({
        "seq": e.seq, "namespace": e.key.namespace, "kind": e.key.kind, "id": e.key.id,
        "process": e.process, "event": e.event.as_str(), "session_id": e.session_id,
        "component": e.component, "host": e.host, "token": e.token, "at": e.at.to_rfc3339(), "cause": e.cause,
    })
}

pub async fn session(store: &Store, fmt: Format, cmd: SessionCmd) -> Result<(), Error> {
    let now = store.clock().now();
    match cmd {
        SessionCmd::Ls => {
            let mut all = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let page = store.session_list(cursor.as_deref(), 1000).await?;
                all.extend(page.items);
                match page.next {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            match fmt {
                Format::Json => output::print_json(
                    &all.iter().map(|s| session_json(s, now)).collect::<Vec<_>>(),
                ),
                Format::Table => output::table(
                    &["ID", "COMPONENT", "HOST", "DEADLINE", "ALIVE"],
                    &all.iter()
                        .map(|s| {
                            vec![
                                s.id.clone(),
                                s.component.clone(),
                                s.host.clone(),
                                s.deadline.to_rfc3339(),
                                s.alive_at(now).to_string(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
        SessionCmd::Show { id } => {
            let s = store
                .session_get(&id)
                .await?
                .ok_or_else(|| Error::not_found(format!("session {id}")))?;
            let every = PageArgs {
                limit: fleetdb::core::query::LIST_PAGE_MAX,
                cursor: None,
            };
            let (held, _) = every
                .collect(true, |cursor, limit| {
                    let id = id.as_str();
                    async move {
                        store
                            .work_page(None, Some(id), cursor.as_deref(), limit)
                            .await
                    }
                })
                .await?;
            match fmt {
                Format::Json => {
                    let mut v = session_json(&s, now);
                    v["work"] = held.iter().map(work_json).collect();
                    output::print_json(&v);
                }
                Format::Table => {
                    println!("id:           {}\ncomponent:    {}\nhost:         {}\nruntime info: {}\nttl:          {} ms\ncreated:      {}\ndeadline:     {}\nalive:        {}",
                        s.id, s.component, s.host, output::one_line(&s.runtime_info), s.ttl_ms, s.created_at, s.deadline, s.alive_at(now));
                    for w in held {
                        println!("work:         {} {} (token {})", w.process, w.key, w.token);
                    }
                }
            }
        }
        SessionCmd::Close { id } => {
            let n = store.session_close(&id).await?;
            match fmt {
                Format::Json => output::print_json(&json!({"closed": id, "released": n})),
                Format::Table => println!("closed session {id}; released {n} claim(s)"),
            }
        }
    }
    Ok(())
}

pub async fn process(store: &Store, fmt: Format, cmd: ProcessCmd) -> Result<(), Error> {
    let procs = match cmd {
        ProcessCmd::Define { name, conflicts } => {
            let c: Vec<&str> = conflicts.iter().map(String::as_str).collect();
            vec![store.process_define(&name, &c).await?]
        }
        ProcessCmd::Ls => {
            let procs = store.process_list().await?;
            let stats = store.work_stats().await?;
            return process_ls(fmt, &procs, &stats);
        }
        ProcessCmd::Pause { name } => vec![store.process_pause(&name).await?],
        ProcessCmd::Resume { name } => vec![store.process_resume(&name).await?],
        ProcessCmd::Limit { name, max_active } => {
            let max = count_or_none("process limit", &max_active, "claims")?;
            vec![store.process_limit(&name, max).await?]
        }
        ProcessCmd::MaxFailures { name, max_failures } => {
            let max = count_or_none("process max failures", &max_failures, "failures in a row")?;
            vec![store.process_max_failures(&name, max).await?]
        }
    };
    match fmt {
        Format::Json => output::print_json(&procs.iter().map(process_json).collect::<Vec<_>>()),
        Format::Table => output::table(
            &PROCESS_HEADER,
            &procs.iter().map(process_row).collect::<Vec<_>>(),
        ),
    }
    Ok(())
}

/// A count given as `N` or `none` (`None`), for `field`: a whole number of `unit`.
fn count_or_none(field: &str, text: &str, unit: &str) -> Result<Option<u64>, Error> {
    match text {
        "none" => Ok(None),
        n => n
            .parse::<u64>()
            .map(Some)
            .map_err(|_| Error::invalid(field, n, format!("a whole number of {unit}, or `none`"))),
    }
}

/// The columns of a process in tables ([`process_row`]).
const PROCESS_HEADER: [&str; 5] = ["PROCESS", "CONFLICTS", "STATE", "LIMIT", "MAX-FAILURES"];

fn process_row(p: &fleetdb::Process) -> Vec<String> {
    let state = if p.paused { "paused" } else { "active" };
    let or_dash = |n: Option<u64>| n.map_or("-".into(), |n| n.to_string());
    vec![
        p.name.clone(),
        p.conflicts.join(","),
        state.into(),
        or_dash(p.max_active),
        or_dash(p.max_failures),
    ]
}

fn process_json(p: &fleetdb::Process) -> serde_json::Value {
    json!({"name": p.name, "conflicts": p.conflicts, "created_at": p.created_at.to_rfc3339(),
       "paused": p.paused, "max_active": p.max_active, "max_failures": p.max_failures})
}

/// `process ls`: each process with its state, limit, live claims and active backoffs.
fn process_ls(
    fmt: Format,
    procs: &[fleetdb::Process],
    stats: &[fleetdb::core::backend::WorkStats],
) -> Result<(), Error> {
    let counts = |name: &str| {
        stats
            .iter()
            .find(|s| s.process == name)
            .map_or((0, 0, 0), |s| (s.active_work, s.active_backoffs, s.parked))
    };
    match fmt {
        Format::Json => output::print_json(
            &procs
                .iter()
                .map(|p| {
                    let (work, backoffs, parked) = counts(&p.name);
                    let mut v = process_json(p);
                    v["active_work"] = work.into();
                    v["active_backoffs"] = backoffs.into();
                    v["parked"] = parked.into();
                    v
                })
                .collect::<Vec<_>>(),
        ),
        Format::Table => {
            let mut header = PROCESS_HEADER.to_vec();
            header.extend(["ACTIVE", "BACKOFFS", "PARKED"]);
            output::table(
                &header,
                &procs
                    .iter()
                    .map(|p| {
                        let (work, backoffs, parked) = counts(&p.name);
                        let mut row = process_row(p);
                        row.extend([work, backoffs, parked].map(|n| n.to_string()));
                        row
                    })
                    .collect::<Vec<_>>(),
            )
        }
    }
    Ok(())
}

pub async fn work(store: &Store, fmt: Format, ns: &str, cmd: WorkCmd) -> Result<(), Error> {
    let (process, session, page, all) = match cmd {
        WorkCmd::Ls {
            process,
            session,
            page,
            all,
        } => (process, session, page, all),
        WorkCmd::Cancel { kind, id, process } => {
            let k = ObjectKey::new(ns, &kind, &id)?;
            let canceled = store.work_cancel(&k, &process).await?;
            match fmt {
                Format::Json => output::print_json(&json!({"canceled": canceled})),
                Format::Table => println!(
                    "{}",
                    if canceled {
                        "canceled"
                    } else {
                        "no such claim"
                    }
                ),
            }
            return Ok(());
        }
        WorkCmd::Explain {
            kind,
            id,
            process,
            selector,
            history,
        } => {
            let most = fleetdb::core::work::HISTORY_PAGE_ROWS_MAX;
            if history > most {
                return Err(Error::invalid(
                    "--history",
                    history.to_string(),
                    format!("shows at most {most} events"),
                ));
            }
            let k = ObjectKey::new(ns, &kind, &id)?;
            let e = store
                .work_explain(&k, &process, selector.as_deref())
                .await?;
            let events = match history {
                0 => Vec::new(),
                n => {
                    store
                        .history(&HistoryFilter::Object(k), None, n)
                        .await?
                        .items
                }
            };
            return explain(fmt, &e, &events);
        }
    };
    let (process, session) = (process.as_deref(), session.as_deref());
    let (items, next) = page
        .collect(all, |cursor, limit| async move {
            store
                .work_page(process, session, cursor.as_deref(), limit)
                .await
        })
        .await?;
    more(next);
    match fmt {
        Format::Json => output::print_json(&items.iter().map(work_json).collect::<Vec<_>>()),
        Format::Table => output::table(
            &["PROCESS", "OBJECT", "SESSION", "TOKEN", "STARTED"],
            &items
                .iter()
                .map(|w| {
                    vec![
                        w.process.clone(),
                        w.key.to_string(),
                        w.session_id.clone(),
                        w.token.to_string(),
                        w.started_at.to_rfc3339(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
    Ok(())
}

/// `work explain`.
fn explain(
    fmt: Format,
    e: &fleetdb::core::work::WorkExplain,
    events: &[HistoryEntry],
) -> Result<(), Error> {
    let holder_json = |h: &fleetdb::core::work::Holder| {
        let mut v = work_json(&h.work);
        v["alive"] = h.alive.into();
        v["component"] = h.component.clone().into();
        v["host"] = h.host.clone().into();
        v
    };
    match fmt {
        Format::Json => output::print_json(&json!({
            "namespace": e.key.namespace, "kind": e.key.kind, "id": e.key.id, "process": e.process,
            "claimable": e.claimable(), "blockers": e.blockers, "object_exists": e.object_exists,
            "declared": e.declared.as_ref().map(process_json), "held": e.held,
            "holders": e.holders.iter().map(holder_json).collect::<Vec<_>>(),
            "backoff": e.backoff.as_ref().map(backoff_json),
            "selector": e.selector.as_ref().map(|s| json!({"selector": s.selector, "matches": s.matches, "unmet": s.unmet})),
            "history": events.iter().map(history_json).collect::<Vec<_>>(),
        })),
        Format::Table => {
            let verdict = if e.claimable() {
                "claimable now"
            } else {
                "NOT claimable"
            };
            println!("{} for {}: {verdict}", e.key, e.process);
            for b in &e.blockers {
                println!("  - {}", output::one_line(b));
            }
            if let Some(p) = &e.declared {
                let mut facts = vec![if p.paused { "paused" } else { "active" }.to_string()];
                if let Some(max) = p.max_active {
                    facts.push(format!("{} of {max} claims held", e.held.unwrap_or(0)));
                }
                if let Some(n) = p.max_failures {
                    facts.push(format!("parks after {n} failures in a row"));
                }
                println!("process:  {} ({})", p.name, facts.join(", "));
            }
            for h in &e.holders {
                let state = if h.alive {
                    "alive"
                } else {
                    "session dead: the next claim takes it over"
                };
                println!(
                    "claim:    {} by session {} ({} on {}), token {}, since {} ({state})",
                    h.work.process,
                    h.work.session_id,
                    h.component,
                    h.host,
                    h.work.token,
                    h.work.started_at
                );
            }
            if let Some(b) = &e.backoff {
                let until = if b.parked() {
                    "parked until cleared".to_string()
                } else {
                    format!("until {}", b.until)
                };
                println!(
                    "backoff:  {until}, {} failure(s) in a row, last interval {}s: {}",
                    b.failures,
                    b.last_interval_s,
                    output::one_line(&b.cause)
                );
            }
            if let Some(s) = &e.selector {
                if s.matches {
                    println!("selector: matches `{}`", s.selector);
                } else {
                    let unmet: Vec<String> = s.unmet.iter().map(|t| format!("`{t}`")).collect();
                    println!("selector: fails {} of `{}`", unmet.join(", "), s.selector);
                }
            }
            for h in events {
                let cause = h
                    .cause
                    .as_deref()
                    .map(|c| format!(": {}", output::one_line(c)))
                    .unwrap_or_default();
                println!(
                    "history:  {} {} {} (token {}, {} on {}){cause}",
                    h.at,
                    h.event.as_str(),
                    h.process,
                    h.token,
                    h.component,
                    h.host
                );
            }
        }
    }
    Ok(())
}

pub async fn backoff(store: &Store, fmt: Format, ns: &str, cmd: BackoffCmd) -> Result<(), Error> {
    match cmd {
        BackoffCmd::Ls {
            process,
            all,
            parked,
            page,
            all_pages,
        } => {
            let which = match (parked, all) {
                (true, _) => BackoffWhich::Parked,
                (false, true) => BackoffWhich::All,
                (false, false) => BackoffWhich::Active,
            };
            let process = process.as_deref();
            let (items, next) = page
                .collect(all_pages, |cursor, limit| async move {
                    store
                        .backoff_page(process, which, cursor.as_deref(), limit)
                        .await
                })
                .await?;
            more(next);
            match fmt {
                Format::Json => {
                    output::print_json(&items.iter().map(backoff_json).collect::<Vec<_>>())
                }
                Format::Table => output::table(
                    &[
                        "PROCESS", "OBJECT", "UNTIL", "INTERVAL", "FAILURES", "CAUSE",
                    ],
                    &items
                        .iter()
                        .map(|b| {
                            let cause: String =
                                output::one_line(&b.cause).chars().take(60).collect();
                            let until = if b.parked() {
                                "parked (until cleared)".to_string()
                            } else {
                                b.until.to_rfc3339()
                            };
                            vec![
                                b.process.clone(),
                                b.key.to_string(),
                                until,
                                format!("{}s", b.last_interval_s),
                                b.failures.to_string(),
                                cause,
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
        BackoffCmd::Unpark { process } => {
            let n = store.backoff_unpark(process.as_deref()).await?;
            match fmt {
                Format::Json => output::print_json(&json!({"cleared": n})),
                Format::Table => println!("cleared {n} parked backoff(s)"),
            }
        }
        BackoffCmd::Clear { kind, id, process } => {
            let k = ObjectKey::new(ns, &kind, &id)?;
            let cleared = store.backoff_clear(&k, &process).await?;
            match fmt {
                Format::Json => output::print_json(&json!({"cleared": cleared})),
                Format::Table => println!(
                    "{}",
                    if cleared {
                        "cleared"
                    } else {
                        "no backoff to clear"
                    }
                ),
            }
        }
    }
    Ok(())
}

pub async fn history(store: &Store, fmt: Format, ns: &str, a: HistoryArgs) -> Result<(), Error> {
    let filter = match (&a.process, a.object.as_slice()) {
        (Some(p), []) => HistoryFilter::Process(p.clone()),
        (None, [kind, id]) => HistoryFilter::Object(ObjectKey::new(ns, kind, id)?),
        _ => {
            return Err(Error::invalid(
                "history",
                a.object.join(" "),
                "give KIND ID, or --process P",
            ))
        }
    };
    let page = store.history(&filter, a.cursor.as_deref(), a.limit).await?;
    match fmt {
        Format::Json => output::print_json(
            &json!({"items": page.items.iter().map(history_json).collect::<Vec<_>>(), "next": page.next}),
        ),
        Format::Table => {
            output::table(
                &[
                    "AT",
                    "EVENT",
                    "PROCESS",
                    "OBJECT",
                    "TOKEN",
                    "COMPONENT",
                    "HOST",
                    "CAUSE",
                ],
                &page
                    .items
                    .iter()
                    .map(|e| {
                        vec![
                            e.at.to_rfc3339(),
                            e.event.as_str().into(),
                            e.process.clone(),
                            e.key.to_string(),
                            e.token.to_string(),
                            e.component.clone(),
                            e.host.clone(),
                            output::one_line(e.cause.as_deref().unwrap_or_default())
                                .chars()
                                .take(60)
                                .collect(),
                        ]
                    })
                    .collect::<Vec<_>>(),
            );
            if let Some(n) = page.next {
                eprintln!("more: --cursor {n}");
            }
        }
    }
    Ok(())
}

pub async fn select(store: &Store, fmt: Format, a: SelectArgs) -> Result<(), Error> {
    if a.count {
        let n = store.count(&a.selector).await?;
        match fmt {
            Format::Json => output::print_json(&json!({"count": n})),
            Format::Table => println!("{n}"),
        }
        return Ok(());
    }
    let page = store
        .select(&a.selector, a.cursor.as_deref(), a.limit)
        .await?;
    match fmt {
        Format::Json => output::print_json(
            &json!({"items": page.items.iter().map(output::object).collect::<Vec<_>>(), "next": page.next}),
        ),
        Format::Table => {
            output::table(
                &["NAMESPACE", "KIND", "ID", "LABELS"],
                &page
                    .items
                    .iter()
                    .map(|o| {
                        vec![
                            o.key.namespace.clone(),
                            o.key.kind.clone(),
                            o.key.id.clone(),
                            output::labels_text(&o.labels),
                        ]
                    })
                    .collect::<Vec<_>>(),
            );
            if let Some(n) = page.next {
                eprintln!("more: --cursor {n}");
            }
        }
    }
    Ok(())
}
