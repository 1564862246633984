//! `fleetdb`: the operator CLI. Every command is a thin shell over `fleetdb::Store`; validation
//! and errors come from the library, so the CLI and the API can never disagree.

mod gc_cmd;
mod import_cmd;
mod output;
mod watchdog;
mod work_cmd;
mod worker;
mod world_cmd;

use std::io::Read;
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use fleetdb::{
    core::validate, ChangeFilter, Error, Labels, ObjectCursor, ObjectKey, ObjectQuery, OpenOptions,
    PutMode, Revision, Store,
};
use output::Format;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "fleetdb",
    version,
    about = "FleetDB: state and coordination for infrastructure control planes"
)]
struct Cli {
    /// Database URL: sqlite:///path/db.sqlite, sqlite::memory:, postgres://user@host/db.
    /// Default: the embedded database ./fleetdb-data/fleetdb.sqlite.
    #[arg(long, global = true, env = "FLEETDB_DB", default_value = fleetdb::DEFAULT_URL)]
    db: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Format,
    /// Namespace to work in.
    #[arg(short = 'n', long, global = true, env = "FLEETDB_NAMESPACE", default_value = fleetdb::DEFAULT_NAMESPACE)]
    namespace: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Namespaces.
    #[command(subcommand)]
    Ns(NsCmd),
    /// Objects (machines, switches, anything with an identity).
    #[command(subcommand)]
    Object(ObjectCmd),
    /// Tags: named JSON facts on objects.
    #[command(subcommand)]
    Tag(TagCmd),
    /// Read the change log.
    Changes(ChangesArgs),
    /// Drop change-log entries before a revision, or older than an age.
    #[command(group(clap::ArgGroup::new("cut").required(true).args(["before", "older_than"])))]
    Compact {
        /// Drop entries with a revision lower than this.
        #[arg(long, value_parser = crate::output::revision)]
        before: Option<i64>,
        /// Drop entries written longer ago than this (e.g. 7d), in revision order up to the
        /// first younger one.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
    },
    /// Schema migrations.
    #[command(subcommand)]
    Migrate(MigrateCmd),
    /// Sessions: components' liveness.
    #[command(subcommand)]
    Session(work_cmd::SessionCmd),
    /// Processes and their conflicts.
    #[command(subcommand)]
    Process(work_cmd::ProcessCmd),
    /// Active claims.
    #[command(subcommand)]
    Work(work_cmd::WorkCmd),
    /// Backoffs after failures.
    #[command(subcommand)]
    Backoff(work_cmd::BackoffCmd),
    /// Work history of an object (KIND ID) or of a process (--process P), newest first.
    History(work_cmd::HistoryArgs),
    /// List (or --count) the objects a selector matches.
    Select(work_cmd::SelectArgs),
    /// Turn a program into a worker: claim objects and run it for each one.
    Worker(worker::WorkerArgs),
    /// Stream changes (objects, or World data with --world) as JSON lines.
    Watch(world_cmd::WatchArgs),
    /// Export a record from a host (or `export sync`: replace a host's whole export set).
    Export(world_cmd::ExportArgs),
    /// The exports a host may see.
    Collect(world_cmd::CollectArgs),
    /// Remove an export of a host.
    Unexport(world_cmd::UnexportArgs),
    /// Key-values.
    #[command(subcommand)]
    Kv(world_cmd::KvCmd),
    /// Per-host string maps.
    #[command(subcommand)]
    Map(world_cmd::MapCmd),
    /// Deploys: a chain of payloads and file trees.
    #[command(subcommand)]
    Deploy(world_cmd::DeployCmd),
    /// The scheduler: hosts register for a namespace; anyone reads the scheduled set.
    #[command(subcommand)]
    Schedule(world_cmd::ScheduleCmd),
    /// Live sessions (host, component, runtime info).
    Members,
    /// Leases: hold objects and blobs alive until deleted or expired.
    #[command(subcommand)]
    Lease(gc_cmd::LeaseCmd),
    /// The content store: content-addressed blobs (sha256).
    #[command(subcommand)]
    Blob(gc_cmd::BlobCmd),
    /// Garbage collection: collectable kinds, runs and their stats.
    #[command(subcommand)]
    Gc(gc_cmd::GcCmd),
}

#[derive(Subcommand, Debug)]
enum NsCmd {
    /// Create a namespace.
    Create {
        name: String,
        /// KEY=VALUE, repeatable.
        #[arg(short, long = "label")]
        labels: Vec<String>,
    },
    /// List namespaces.
    Ls,
    /// Show one namespace.
    Get { name: String },
    /// Set or delete (KEY=) labels of a namespace.
    Label {
        name: String,
        #[arg(required = true)]
        labels: Vec<String>,
    },
    /// Delete an empty namespace.
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
enum ObjectCmd {
    /// Create or update an object. Labels are a patch: KEY= deletes a label.
    Put {
        kind: String,
        id: String,
        /// KEY=VALUE, repeatable.
        #[arg(short, long = "label")]
        labels: Vec<String>,
        /// Fail if the object exists already.
        #[arg(long)]
        create: bool,
    },
    /// Show one object.
    Get { kind: String, id: String },
    /// List objects, ordered by kind then id.
    Ls(ObjectLs),
    /// Delete an object and its tags.
    Rm { kind: String, id: String },
    /// Import objects with their labels and tags from JSON lines ({"kind": …, "id": …,
    /// "labels": {…}, "tags": {"name": <JSON>, …}}), in transactions of --batch objects. Every
    /// line is validated before anything is written.
    Import {
        /// The file (`-` or omitted: stdin).
        file: Option<String>,
        /// Fail if an object exists already (default: create or update; labels are a patch).
        #[arg(long)]
        create: bool,
        /// Objects per transaction (1..=5000).
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Transactions in flight at once (1..=16), started in line order.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
    },
}

#[derive(Args, Debug)]
struct ObjectLs {
    /// Only this kind.
    kind: Option<String>,
    /// Label selector: KEY=VALUE, KEY!=VALUE, KEY, !KEY, comma-separated (all must hold).
    #[arg(short = 'l', long)]
    selector: Option<String>,
    /// Page size (1..=1000).
    #[arg(long, default_value_t = 100, value_parser = crate::output::page_limit)]
    limit: usize,
    /// Continue after this cursor (the `next` of a previous page).
    #[arg(long)]
    cursor: Option<String>,
    /// Follow cursors and list everything.
    #[arg(long)]
    all: bool,
}

#[derive(Subcommand, Debug)]
enum TagCmd {
    /// Set a tag to a JSON value (given as an argument, or read from stdin if omitted or `-`).
    Set {
        kind: String,
        id: String,
        name: String,
        value: Option<String>,
        /// Commit only while the claim of the `fleetdb worker` running this command is held (from
        /// FLEETDB_NAMESPACE, _KIND, _ID, _PROCESS, _SESSION, _TOKEN); otherwise exit 4, nothing
        /// written.
        #[arg(long)]
        fenced: bool,
    },
    /// Show one tag.
    Get {
        kind: String,
        id: String,
        name: String,
    },
    /// List the tags of an object.
    Ls { kind: String, id: String },
    /// Delete a tag.
    Rm {
        kind: String,
        id: String,
        name: String,
        /// As for `tag set --fenced`.
        #[arg(long)]
        fenced: bool,
    },
}

#[derive(Args, Debug)]
struct ChangesArgs {
    /// Entries after this revision (default: from the oldest entry the log still holds; an
    /// explicit revision the log was compacted past is refused, exit 4).
    #[arg(long, value_parser = crate::output::revision)]
    after: Option<i64>,
    /// Only this kind (in the selected namespace).
    #[arg(long)]
    kind: Option<String>,
    /// Only ids with this prefix (needs --kind).
    #[arg(long)]
    prefix: Option<String>,
    /// Every namespace, not just the selected one.
    #[arg(long, conflicts_with_all = ["kind", "prefix"])]
    all_namespaces: bool,
    #[arg(long, default_value_t = 100, value_parser = crate::output::changes_limit)]
    limit: usize,
}

#[derive(Subcommand, Debug)]
enum MigrateCmd {
    /// Show the schema version of the database and of this binary (writes nothing).
    Status,
    /// Apply pending migrations.
    Up,
}

fn parse_labels(args: &[String]) -> Result<Labels, Error> {
    let mut labels = Labels::new();
    for a in args {
        let (k, v) = validate::parse_label_arg(a)?;
        // A key given two values (`-l a=1 -l a=2`, or a set and a delete): which was meant is
        // not for the command to guess.
        if labels.get(&k).is_some_and(|old| *old != v) {
            return Err(Error::invalid(
                "--label",
                a.as_str(),
                format!("the key {k:?} is given twice, with different values"),
            ));
        }
        labels.insert(k, v);
    }
    Ok(labels)
}

fn exit_code(e: &Error) -> u8 {
    match e {
        Error::Invalid { .. } | Error::TooLarge { .. } | Error::TooLargeInput { .. } => 2,
        Error::NotFound { .. } => 3,
        Error::AlreadyExists { .. }
        | Error::Conflict { .. }
        | Error::NamespaceNotEmpty { .. }
        | Error::SessionExpired { .. }
        | Error::WorkLost { .. }
        | Error::Refused { .. }
        | Error::Compacted { .. } => 4,
        Error::SchemaTooNew { .. } | Error::SchemaBehind { .. } => 5,
        Error::Unavailable(_) | Error::WatchLagged { .. } => 6,
        _ => 1,
    }
}

/// End quietly when the reader of stdout goes away (`fleetdb … | head`), like every Unix
/// filter: `println!` panics on a closed pipe (Rust ignores SIGPIPE, and must go on ignoring
/// it here: a write to a PostgreSQL socket the server closed would kill us instead of failing).
/// Exit status 141, as a shell reports a process ended by SIGPIPE.
fn quiet_on_closed_stdout() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info)
    }));
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    // Whether -n/--namespace (or FLEETDB_NAMESPACE) was given, rather than defaulted.
    let namespace_given = matches
        .value_source("namespace")
        .is_some_and(|s| s != clap::parser::ValueSource::DefaultValue);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    quiet_on_closed_stdout();
    let format = cli.output;
    let outcome = match namespace_ignored(&cli, matches.value_source("namespace")) {
        Some(refused) => Err(refused),
        None => run(cli, namespace_given).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match format {
                Format::Json => {
                    let mut err = json!({"code": e.code(), "message": e.to_string()});
                    match &e {
                        Error::WatchLagged { last_delivered } => {
                            err["last_delivered"] = json!(last_delivered.0)
                        }
                        Error::Compacted {
                            compacted_revision, ..
                        } => err["compacted_revision"] = json!(compacted_revision.0),
                        _ => {}
                    }
                    eprintln!("{}", json!({ "error": err }))
                }
                Format::Table => eprintln!("error: {e}"),
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

/// `-n` typed on the command line of a command whose selector picks the namespaces (`select`,
/// `worker`): refused (exit 2) rather than silently ignored — `-n lab worker --selector 'kind =
/// machine'` would claim the machines of every namespace. `FLEETDB_NAMESPACE` in the environment
/// is not refused: a worker gives it to its commands, which may run these.
fn namespace_ignored(cli: &Cli, source: Option<clap::parser::ValueSource>) -> Option<Error> {
    let command = match cli.command {
        Command::Select(_) => "select",
        Command::Worker(_) => "worker",
        _ => return None,
    };
    (source == Some(clap::parser::ValueSource::CommandLine)).then(|| {
        Error::invalid(
            "-n/--namespace",
            &cli.namespace,
            format!(
                "does not apply to `{command}`, whose selector matches every namespace: write \
                 `namespace = {} and …` in the selector instead",
                cli.namespace
            ),
        )
    })
}

async fn run(cli: Cli, namespace_given: bool) -> Result<(), Error> {
    validate::name("namespace", &cli.namespace)?;
    let migrate = !matches!(cli.command, Command::Migrate(MigrateCmd::Status));
    // `migrate status` reads a SQLite file on a read-only connection: nothing is created (a
    // typo in --db, a first run) and the journal mode is left as it is; the store's own open is
    // the fallback (and PostgreSQL's way).
    if !migrate {
        let url = if cli.db.is_empty() {
            fleetdb::DEFAULT_URL
        } else {
            cli.db.as_str()
        };
        if url.starts_with("sqlite:") {
            if let fleetdb::SqliteLocation::File(path) = fleetdb::sqlite_location(url)? {
                if let Ok(status) = fleetdb::sqlite_file_schema_status(&path) {
                    print_schema(cli.output, &status);
                    return Ok(());
                }
            }
        }
    }
    // A worker is the long-lived process of a CLI deployment: it keeps history and the change
    // log to their retention, if given.
    let (history_retention, change_retention) = match &cli.command {
        Command::Worker(a) => a.retention(),
        _ => (None, None),
    };
    let store = Store::open_with(
        &cli.db,
        OpenOptions {
            migrate,
            history_retention,
            change_retention,
            ..OpenOptions::default()
        },
    )
    .await?;
    // Server settings that void what a claim promises (a crash may undo a committed one): said
    // on every command, as the operator may be about to rely on them.
    // And a host clock off from the server's (PostgreSQL: the store runs on the server's).
    for w in store
        .backend()
        .durability_warnings()
        .into_iter()
        .chain(store.clock_warning())
    {
        match cli.output {
            Format::Json => eprintln!("{}", json!({ "warning": w })),
            Format::Table => eprintln!("warning: {w}"),
        }
    }
    let result = dispatch(&store, cli, namespace_given).await;
    // A short-lived command exits right after its write; tell watchers in other processes now
    // (PostgreSQL NOTIFY) rather than leave them to their poll interval.
    if store.metrics().transactions_executed.get() > 0 {
        let _ = store.backend().announce_changes().await;
    }
    result
}

async fn dispatch(store: &Store, cli: Cli, namespace_given: bool) -> Result<(), Error> {
    let ns = cli.namespace.as_str();
    let fmt = cli.output;
    let key = |kind: &str, id: &str| ObjectKey::new(ns, kind, id);
    match cli.command {
        Command::Ns(cmd) => ns_cmd(store, fmt, cmd).await,
        Command::Object(cmd) => match cmd {
            ObjectCmd::Put {
                kind,
                id,
                labels,
                create,
            } => {
                let k = key(&kind, &id)?;
                let mode = if create {
                    PutMode::Create
                } else {
                    PutMode::Upsert
                };
                let w = store
                    .object_put_mode(&k, parse_labels(&labels)?, mode)
                    .await?;
                match fmt {
                    Format::Json => {
                        let mut v = output::object(&w.item);
                        v["changed"] = json!(w.changed);
                        output::print_json(&v);
                    }
                    Format::Table => println!(
                        "{} {} (revision {})",
                        if w.changed { "wrote" } else { "unchanged" },
                        w.item.key,
                        w.item.revision
                    ),
                }
                Ok(())
            }
            ObjectCmd::Import {
                file,
                create,
                batch,
                jobs,
            } => import_cmd::import(store, fmt, ns, file.as_deref(), create, batch, jobs).await,
            ObjectCmd::Get { kind, id } => {
                let k = key(&kind, &id)?;
                let o = store
                    .object_get(&k)
                    .await?
                    .ok_or_else(|| Error::not_found(format!("object {k}")))?;
                match fmt {
                    Format::Json => output::print_json(&output::object(&o)),
                    Format::Table => output::table(
                        &["KIND", "ID", "LABELS", "CREATED", "UPDATED", "REVISION"],
                        &[object_row(&o)],
                    ),
                }
                Ok(())
            }
            ObjectCmd::Ls(args) => object_ls(store, fmt, ns, args).await,
            ObjectCmd::Rm { kind, id } => {
                let k = key(&kind, &id)?;
                let r = store.object_delete(&k).await?;
                match fmt {
                    Format::Json => {
                        output::print_json(&json!({"deleted": k.to_string(), "revision": r.0}))
                    }
                    Format::Table => println!("deleted {k} (revision {r})"),
                }
                Ok(())
            }
        },
        Command::Tag(cmd) => match cmd {
            TagCmd::Set {
                kind,
                id,
                name,
                value,
                fenced,
            } => {
                let fence = fenced.then(worker::fence_from_env).transpose()?;
                let k = key(&kind, &id)?;
                validate::name("tag", &name)?;
                let text = match value.as_deref() {
                    None | Some("-") => {
                        let mut s = String::new();
                        let limit = store.limits().tag_value_bytes_max as u64 * 4 + 1;
                        std::io::stdin()
                            .take(limit)
                            .read_to_string(&mut s)
                            .map_err(|e| {
                                Error::invalid(
                                    "tag value",
                                    "<stdin>",
                                    format!("cannot read stdin: {e}"),
                                )
                            })?;
                        if s.len() as u64 == limit {
                            // Cut at the limit: say so, not "EOF while parsing".
                            return Err(Error::TooLargeInput {
                                field: format!("tag {name:?} value (stdin)"),
                                max: limit as usize - 1,
                            });
                        }
                        s
                    }
                    Some(v) => v.to_string(),
                };
                let value = validate::parse_json(&format!("tag {name:?} value"), &text)?;
                let w = match &fence {
                    Some(f) => store.tag_set_fenced(f, &k, &name, &value).await?,
                    None => store.tag_set(&k, &name, &value).await?,
                };
                match fmt {
                    Format::Json => {
                        let mut v = output::tag(&w.item);
                        v["changed"] = json!(w.changed);
                        output::print_json(&v);
                    }
                    Format::Table => println!(
                        "{} tag {} of {} (revision {})",
                        if w.changed { "set" } else { "unchanged" },
                        name,
                        k,
                        w.item.revision
                    ),
                }
                Ok(())
            }
            TagCmd::Get { kind, id, name } => {
                let k = key(&kind, &id)?;
                let Some(t) = store.tag_get(&k, &name).await? else {
                    if store.object_get(&k).await?.is_none() {
                        return Err(Error::not_found(format!("object {k}")));
                    }
                    return Err(Error::not_found(format!("tag {name:?} of object {k}")));
                };
                match fmt {
                    Format::Json => output::print_json(&output::tag(&t)),
                    Format::Table => println!("{}", t.value),
                }
                Ok(())
            }
            TagCmd::Ls { kind, id } => {
                let k = key(&kind, &id)?;
                let tags = store.tag_list(&k).await?;
                match fmt {
                    Format::Json => {
                        output::print_json(&tags.iter().map(output::tag).collect::<Vec<_>>())
                    }
                    Format::Table => output::table(
                        &["NAME", "VALUE", "UPDATED", "REVISION"],
                        &tags
                            .iter()
                            .map(|t| {
                                vec![
                                    t.name.clone(),
                                    t.value.to_string(),
                                    t.updated_at.to_rfc3339(),
                                    t.revision.to_string(),
                                ]
                            })
                            .collect::<Vec<_>>(),
                    ),
                }
                Ok(())
            }
            TagCmd::Rm {
                kind,
                id,
                name,
                fenced,
            } => {
                let fence = fenced.then(worker::fence_from_env).transpose()?;
                let k = key(&kind, &id)?;
                let r = match &fence {
                    Some(f) => store.tag_delete_fenced(f, &k, &name).await?,
                    None => store.tag_delete(&k, &name).await?,
                };
                match fmt {
                    Format::Json => output::print_json(
                        &json!({"deleted": format!("{k}#{name}"), "revision": r.0}),
                    ),
                    Format::Table => println!("deleted tag {name} of {k} (revision {r})"),
                }
                Ok(())
            }
        },
        Command::Changes(a) => {
            let filter = if a.all_namespaces {
                ChangeFilter::default()
            } else {
                ChangeFilter {
                    namespace: Some(ns.to_string()),
                    kind: a.kind,
                    id_prefix: a.prefix,
                }
            };
            // Without --after, from the start of what the log holds: a compaction (even one that
            // lands meanwhile) moves that start, it is not a gap the user asked about.
            let mut after = a.after.unwrap_or(0);
            let changes = loop {
                match store.changes(Revision(after), &filter, a.limit).await {
                    Err(Error::Compacted {
                        compacted_revision, ..
                    }) if a.after.is_none() && compacted_revision.0 > after => {
                        after = compacted_revision.0
                    }
                    r => break r?,
                }
            };
            match fmt {
                Format::Json => {
                    output::print_json(&changes.iter().map(output::change).collect::<Vec<_>>())
                }
                Format::Table => output::table(
                    &["REVISION", "OP", "ENTITY", "KEY", "NAME", "AT"],
                    &changes
                        .iter()
                        .map(|c| {
                            vec![
                                c.revision.to_string(),
                                c.op.as_str().into(),
                                c.entity.as_str().into(),
                                format!("{}/{}/{}", c.namespace, c.kind, c.id),
                                c.name.clone(),
                                c.at.to_rfc3339(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
            Ok(())
        }
        Command::Compact { before, older_than } => {
            let dropped = match (before, older_than) {
                (Some(before), _) => store.compact(Revision(before)).await?,
                (None, Some(age)) => {
                    // Each call looks at a bounded stretch of the log: go on until one drops
                    // nothing.
                    let mut dropped = 0;
                    loop {
                        let n = store.compact_older_than(age).await?;
                        if n == 0 {
                            break dropped;
                        }
                        dropped += n;
                    }
                }
                (None, None) => unreachable!("clap requires --before or --older-than"),
            };
            let info = store.revision().await?;
            match fmt {
                Format::Json => output::print_json(&json!({
                    "dropped": dropped, "compacted_revision": info.compacted.0, "current_revision": info.current.0
                })),
                Format::Table => println!(
                    "dropped {dropped} entries; compacted through revision {}",
                    info.compacted
                ),
            }
            Ok(())
        }
        Command::Session(cmd) => work_cmd::session(store, fmt, cmd).await,
        Command::Process(cmd) => work_cmd::process(store, fmt, cmd).await,
        Command::Work(cmd) => work_cmd::work(store, fmt, ns, cmd).await,
        Command::Backoff(cmd) => work_cmd::backoff(store, fmt, ns, cmd).await,
        Command::History(a) => work_cmd::history(store, fmt, ns, a).await,
        Command::Select(a) => work_cmd::select(store, fmt, a).await,
        Command::Worker(a) => worker::worker(store, &cli.db, a).await,
        Command::Watch(a) => world_cmd::watch(store, ns, namespace_given, a).await,
        Command::Export(a) => world_cmd::export(store, ns, fmt, a).await,
        Command::Collect(a) => world_cmd::collect(store, fmt, a).await,
        Command::Unexport(a) => world_cmd::unexport(store, fmt, a).await,
        Command::Kv(cmd) => world_cmd::kv(store, fmt, cmd).await,
        Command::Map(cmd) => world_cmd::map(store, fmt, cmd).await,
        Command::Deploy(cmd) => world_cmd::deploy(store, fmt, cmd).await,
        Command::Schedule(cmd) => world_cmd::schedule(store, fmt, cmd).await,
        Command::Members => world_cmd::members(store, fmt).await,
        Command::Lease(cmd) => gc_cmd::lease(store, fmt, ns, cmd).await,
        Command::Blob(cmd) => gc_cmd::blob(store, fmt, cmd).await,
        Command::Gc(cmd) => gc_cmd::gc(store, fmt, cmd).await,
        Command::Migrate(cmd) => {
            let status = match cmd {
                MigrateCmd::Status => store.schema_status().await?,
                MigrateCmd::Up => store.migrate().await?,
            };
            print_schema(fmt, &status);
            Ok(())
        }
    }
}

/// A schema status, as `migrate status` and `migrate up` print it.
fn print_schema(fmt: Format, status: &fleetdb::SchemaStatus) {
    match fmt {
        Format::Json => output::print_json(&output::schema(status)),
        Format::Table => {
            println!("database schema version: {}", status.database);
            println!("binary schema version:   {}", status.binary);
            for m in &status.applied {
                println!(
                    "  applied  {:04}_{}  at {}",
                    m.version, m.name, m.applied_at
                );
            }
            for m in &status.pending {
                println!("  pending  {:04}_{}", m.version, m.name);
            }
        }
    }
}

fn object_row(o: &fleetdb::Object) -> Vec<String> {
    vec![
        o.key.kind.clone(),
        o.key.id.clone(),
        output::labels_text(&o.labels),
        o.created_at.to_rfc3339(),
        o.updated_at.to_rfc3339(),
        o.revision.to_string(),
    ]
}

async fn ns_cmd(store: &Store, fmt: Format, cmd: NsCmd) -> Result<(), Error> {
    match cmd {
        NsCmd::Create { name, labels } => {
            let n = store
                .namespace_create(&name, parse_labels(&labels)?)
                .await?;
            match fmt {
                Format::Json => output::print_json(&output::namespace(&n)),
                Format::Table => println!("created namespace {} (revision {})", n.name, n.revision),
            }
        }
        NsCmd::Ls => {
            let mut all = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let page = store.namespace_list(cursor.as_deref(), 1000).await?;
                all.extend(page.items);
                match page.next {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            match fmt {
                Format::Json => {
                    output::print_json(&all.iter().map(output::namespace).collect::<Vec<_>>())
                }
                Format::Table => output::table(
                    &["NAME", "LABELS", "CREATED", "REVISION"],
                    &all.iter()
                        .map(|n| {
                            vec![
                                n.name.clone(),
                                output::labels_text(&n.labels),
                                n.created_at.to_rfc3339(),
                                n.revision.to_string(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
        NsCmd::Get { name } => {
            let n = store
                .namespace_get(&name)
                .await?
                .ok_or_else(|| Error::not_found(format!("namespace {name:?}")))?;
            match fmt {
                Format::Json => output::print_json(&output::namespace(&n)),
                Format::Table => output::table(
                    &["NAME", "LABELS", "CREATED", "REVISION"],
                    &[vec![
                        n.name.clone(),
                        output::labels_text(&n.labels),
                        n.created_at.to_rfc3339(),
                        n.revision.to_string(),
                    ]],
                ),
            }
        }
        NsCmd::Label { name, labels } => {
            let w = store
                .namespace_set_labels(&name, parse_labels(&labels)?)
                .await?;
            match fmt {
                Format::Json => {
                    let mut v = output::namespace(&w.item);
                    v["changed"] = json!(w.changed);
                    output::print_json(&v);
                }
                Format::Table => println!(
                    "{} namespace {} (revision {})",
                    if w.changed { "labelled" } else { "unchanged" },
                    w.item.name,
                    w.item.revision
                ),
            }
        }
        NsCmd::Rm { name } => {
            let r = store.namespace_delete(&name).await?;
            match fmt {
                Format::Json => output::print_json(&json!({"deleted": name, "revision": r.0})),
                Format::Table => println!("deleted namespace {name} (revision {r})"),
            }
        }
    }
    Ok(())
}

async fn object_ls(store: &Store, fmt: Format, ns: &str, args: ObjectLs) -> Result<(), Error> {
    let mut q = ObjectQuery::new(ns).limit(args.limit);
    q.kind = args.kind;
    if let Some(sel) = &args.selector {
        q.labels = fleetdb::parse_label_selector(sel)?;
    }
    if let Some(c) = &args.cursor {
        q.after = Some(ObjectCursor::decode(c)?);
    }
    let mut items = Vec::new();
    let next = loop {
        let page = store.object_list(&q).await?;
        items.extend(page.items);
        match page.next {
            Some(c) if args.all => q.after = Some(ObjectCursor::decode(&c)?),
            other => break other,
        }
    };
    match fmt {
        Format::Json => output::print_json(&json!({
            "items": items.iter().map(output::object).collect::<Vec<_>>(),
            "next": next,
        })),
        Format::Table => {
            output::table(
                &["KIND", "ID", "LABELS", "CREATED", "UPDATED", "REVISION"],
                &items.iter().map(object_row).collect::<Vec<_>>(),
            );
            if let Some(n) = next {
                eprintln!("more: --cursor {n}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_definitions_are_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
