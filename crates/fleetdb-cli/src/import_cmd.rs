//! `fleetdb object import`: objects with their labels and tags from JSON lines, in transactions of
//! `--batch` objects (a fleet inventory; on PostgreSQL each transaction is one statement).
//!
//! Every line is read and validated before anything is written, so bad input writes nothing and
//! names its line. Each transaction is atomic; one the database refuses (a missing namespace, an
//! object that exists with `--create`) is reported with the lines it held, after the ones before
//! it committed.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};

use fleetdb::core::validate;
use fleetdb::{Error, Labels, ObjectKey, Store};
use serde::Deserialize;
use serde_json::json;

use crate::output::{self, Format};

/// Objects per transaction at most (the store's limit is 10,000 writes per transaction; an
/// object with many tags is many writes).
pub const BATCH_MAX: usize = 5_000;

/// One input line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    kind: String,
    id: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    tags: BTreeMap<String, serde_json::Value>,
}

/// A validated line: its number, key, labels and tags.
struct Item {
    line: usize,
    key: ObjectKey,
    labels: Labels,
    tags: Vec<(String, serde_json::Value)>,
}

fn at(line: usize, e: Error) -> Error {
    Error::invalid(format!("line {line}"), String::new(), e.to_string())
}

/// Read and validate every line of `input` (blank lines are skipped).
fn read_items(
    input: impl BufRead,
    namespace: &str,
    store: &Store,
    create: bool,
) -> Result<Vec<Item>, Error> {
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    for (i, text) in input.lines().enumerate() {
        let line = i + 1;
        let text = text
            .map_err(|e| Error::invalid(format!("line {line}"), "", format!("cannot read: {e}")))?;
        if text.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(&text).map_err(|e| {
            Error::invalid(
                format!("line {line}"),
                text.chars().take(64).collect::<String>(),
                format!(
                    "expected {{\"kind\": …, \"id\": …, \"labels\": {{…}}, \"tags\": {{…}}}}: {e}"
                ),
            )
        })?;
        let key = ObjectKey::new(namespace, &parsed.kind, &parsed.id).map_err(|e| at(line, e))?;
        if !seen.insert(key.clone()) {
            return Err(at(
                line,
                Error::invalid(
                    "object",
                    key.to_string(),
                    "appears more than once in the input",
                ),
            ));
        }
        // A created object's labels are the patch applied to none: an empty value means nothing.
        if create && parsed.labels.values().any(String::is_empty) {
            return Err(at(
                line,
                Error::invalid(
                    "labels",
                    key.to_string(),
                    "an empty label value deletes a label; a new object has none",
                ),
            ));
        }
        for (k, v) in &parsed.labels {
            if v.is_empty() {
                validate::user_label_key(k).map_err(|e| at(line, e))?;
            } else {
                validate::user_label(k, v).map_err(|e| at(line, e))?;
            }
        }
        let max = store.limits().tag_value_bytes_max;
        for (name, value) in &parsed.tags {
            validate::name("tag", name).map_err(|e| at(line, e))?;
            validate::canonical_json(&format!("tag {name:?} value"), value, max)
                .map_err(|e| at(line, e))?;
        }
        items.push(Item {
            line,
            key,
            labels: parsed.labels,
            tags: parsed.tags.into_iter().collect(),
        });
    }
    Ok(items)
}

/// Run the import: `file` (`-` or none: stdin), `batch` objects per transaction.
pub async fn import(
    store: &Store,
    fmt: Format,
    namespace: &str,
    file: Option<&str>,
    create: bool,
    batch: usize,
) -> Result<(), Error> {
    if batch == 0 || batch > BATCH_MAX {
        return Err(Error::invalid(
            "--batch",
            batch.to_string(),
            format!("must be between 1 and {BATCH_MAX}"),
        ));
    }
    let items = match file {
        None | Some("-") => read_items(std::io::stdin().lock(), namespace, store, create)?,
        Some(path) => {
            let f = std::fs::File::open(path)
                .map_err(|e| Error::invalid("file", path, format!("cannot open: {e}")))?;
            read_items(BufReader::new(f), namespace, store, create)?
        }
    };
    let started = std::time::Instant::now();
    let mut written = 0usize;
    for chunk in items.chunks(batch) {
        let r = store
            .txn(|tx| async move {
                for item in chunk {
                    if create {
                        tx.object_create(&item.key, item.labels.clone())?;
                    } else {
                        tx.object_put(&item.key, item.labels.clone())?;
                    }
                    for (name, value) in &item.tags {
                        tx.tag_set(&item.key, name, value)?;
                    }
                }
                Ok(())
            })
            .await;
        if let Err(e) = r {
            let (first, last) = (chunk[0].line, chunk[chunk.len() - 1].line);
            eprintln!(
                "fleetdb: the transaction of lines {first}–{last} failed and wrote nothing; \
                 the {written} objects before them were imported"
            );
            return Err(e);
        }
        written += chunk.len();
    }
    let secs = started.elapsed().as_secs_f64();
    match fmt {
        Format::Json => output::print_json(&json!({
            "objects": written,
            "transactions": items.len().div_ceil(batch),
            "seconds": secs,
        })),
        Format::Table => println!(
            "imported {written} objects in {} transactions ({secs:.2} s)",
            items.len().div_ceil(batch)
        ),
    }
    Ok(())
}
