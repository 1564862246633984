//! `fleetdb object import`: objects with their labels and tags from JSON lines, in transactions of
//! `--batch` objects (a fleet inventory; on PostgreSQL each transaction is one statement).
//!
//! Every line is read and validated before anything is written, so bad input writes nothing and
//! names its line. Each transaction is atomic; `--jobs` of them are in flight at once, started in
//! line order. One the database refuses (a missing namespace, an object that exists with
//! `--create`) is reported with the lines it held; no transaction starts after it, those in flight
//! finish, and the report names the lines written and the lines not attempted (every object
//! appears once in the input, so transactions never overlap and a re-run in the default mode is
//! safe).

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};

use fleetdb::core::validate;
use fleetdb::{Error, Labels, ObjectKey, Store};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use crate::output::{self, Format};

/// Objects per transaction at most (the store's limit is 10,000 writes per transaction; an
/// object with many tags is many writes).
pub const BATCH_MAX: usize = 5_000;

/// Transactions in flight at most.
pub const JOBS_MAX: usize = 16;

/// What became of one transaction.
enum Outcome {
    Written,
    Failed(Error),
    /// Not started: an earlier transaction had failed.
    NotAttempted,
}

/// The lines of the chunks numbered `picked` (ascending) as ranges, neighbouring chunks merged:
/// "1–79, 121–159".
fn line_ranges(chunks: &[&[Item]], picked: &[usize]) -> String {
    let mut ranges: Vec<(usize, usize, usize)> = Vec::new(); // (first line, last line, last chunk)
    for &i in picked {
        let (Some(first), Some(last)) = (chunks[i].first(), chunks[i].last()) else {
            continue;
        };
        match ranges.last_mut() {
            Some((_, end, at)) if *at + 1 == i => {
                *end = last.line;
                *at = i;
            }
            _ => ranges.push((first.line, last.line, i)),
        }
    }
    ranges
        .iter()
        .map(|(a, b, _)| format!("{a}–{b}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One transaction: the objects of `chunk` with their tags.
async fn write(store: &Store, chunk: &[Item], create: bool) -> Result<(), Error> {
    store
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
        .await
}

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
    /// The content its writes carry ([`fleetdb::core::Op::payload_bytes`]: labels and tag values).
    bytes: usize,
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
        // The whole label set, as the write checks it (the count, then each label), so a line
        // the transaction would refuse is found before anything is written.
        validate::user_labels(&parsed.labels).map_err(|e| at(line, e))?;
        let max = store.limits().tag_value_bytes_max;
        let writes_max = store.limits().txn_ops_max;
        if 1 + parsed.tags.len() > writes_max {
            return Err(at(
                line,
                Error::invalid(
                    "tags",
                    parsed.tags.len().to_string(),
                    format!(
                        "an object and its tags are written in one transaction of at most \
                         {writes_max} writes: at most {} tags",
                        writes_max - 1
                    ),
                ),
            ));
        }
        let mut bytes = fleetdb::core::batch::labels_bytes(&parsed.labels);
        for (name, value) in &parsed.tags {
            validate::name("tag", name).map_err(|e| at(line, e))?;
            bytes += validate::canonical_json(&format!("tag {name:?} value"), value, max)
                .map_err(|e| at(line, e))?
                .len();
        }
        // Written in one transaction, the object and its tags must fit its content limit.
        fleetdb::core::batch::txn_bytes_within(bytes, store.limits()).map_err(|e| at(line, e))?;
        items.push(Item {
            line,
            key,
            labels: parsed.labels,
            tags: parsed.tags.into_iter().collect(),
            bytes,
        });
    }
    Ok(items)
}

/// `items` in line order, cut into transactions of at most `batch` objects, at most
/// `writes_max` writes (an object and each of its tags) and at most `bytes_max` bytes of content
/// (every item fits alone, `read_items` checked), so no transaction of valid lines is refused
/// for its size.
fn chunk(items: &[Item], batch: usize, writes_max: usize, bytes_max: usize) -> Vec<&[Item]> {
    let mut out = Vec::new();
    let (mut start, mut writes, mut bytes) = (0, 0, 0);
    for (i, item) in items.iter().enumerate() {
        let w = 1 + item.tags.len();
        if i > start
            && (i - start == batch || writes + w > writes_max || bytes + item.bytes > bytes_max)
        {
            out.push(&items[start..i]);
            (start, writes, bytes) = (i, 0, 0);
        }
        writes += w;
        bytes += item.bytes;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// Run the import: `file` (`-` or none: stdin), `batch` objects per transaction.
pub async fn import(
    store: &Store,
    fmt: Format,
    namespace: &str,
    file: Option<&str>,
    create: bool,
    batch: usize,
    jobs: usize,
) -> Result<(), Error> {
    if jobs == 0 || jobs > JOBS_MAX {
        return Err(Error::invalid(
            "--jobs",
            jobs.to_string(),
            format!("must be between 1 and {JOBS_MAX}"),
        ));
    }
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
    let limits = store.limits();
    let chunks = chunk(&items, batch, limits.txn_ops_max, limits.txn_bytes_max);
    // Transactions start in line order; after a failure none starts (those in flight finish).
    let failed = std::sync::atomic::AtomicBool::new(false);
    let mut outcomes: Vec<(usize, Outcome)> = futures::stream::iter(chunks.iter().enumerate())
        .map(|(i, chunk)| {
            let failed = &failed;
            async move {
                if failed.load(std::sync::atomic::Ordering::Acquire) {
                    return (i, Outcome::NotAttempted);
                }
                match write(store, chunk, create).await {
                    Ok(()) => (i, Outcome::Written),
                    Err(e) => {
                        failed.store(true, std::sync::atomic::Ordering::Release);
                        (i, Outcome::Failed(e))
                    }
                }
            }
        })
        .buffer_unordered(jobs)
        .collect()
        .await;
    outcomes.sort_by_key(|(i, _)| *i);
    let of = |want: fn(&Outcome) -> bool| -> Vec<usize> {
        outcomes
            .iter()
            .filter(|(_, o)| want(o))
            .map(|(i, _)| *i)
            .collect()
    };
    let done = of(|o| matches!(o, Outcome::Written));
    let written: usize = done.iter().map(|&i| chunks[i].len()).sum();
    if let Some(pos) = outcomes
        .iter()
        .position(|(_, o)| matches!(o, Outcome::Failed(_)))
    {
        let failed = of(|o| matches!(o, Outcome::Failed(_)));
        let skipped = of(|o| matches!(o, Outcome::NotAttempted));
        let mut report = format!(
            "fleetdb: the transaction{} of lines {} failed and wrote nothing; {written} objects were imported",
            if failed.len() > 1 { "s" } else { "" },
            line_ranges(&chunks, &failed)
        );
        if !done.is_empty() {
            report.push_str(&format!(" (lines {})", line_ranges(&chunks, &done)));
        }
        if !skipped.is_empty() {
            report.push_str(&format!(
                "; lines {} were not attempted",
                line_ranges(&chunks, &skipped)
            ));
        }
        eprintln!("{report}");
        if let (_, Outcome::Failed(e)) = outcomes.swap_remove(pos) {
            return Err(e);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    match fmt {
        Format::Json => output::print_json(&json!({
            "objects": written,
            "transactions": chunks.len(),
            "seconds": secs,
        })),
        Format::Table => println!(
            "imported {written} objects in {} transactions ({secs:.2} s)",
            chunks.len()
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(line: usize, tags: usize) -> Item {
        Item {
            line,
            key: ObjectKey::new("default", "machine", format!("m{line}")).unwrap(),
            labels: Labels::new(),
            tags: (0..tags)
                .map(|t| (format!("t{t}"), serde_json::json!(t)))
                .collect(),
            bytes: 100 * tags,
        }
    }

    /// Transactions are cut by objects and by writes: 1,000 bare objects then 1,000 with 15 tags
    /// each (a file whose lines are all valid) never make a transaction of more than 10,000.
    #[test]
    fn chunks_hold_at_most_the_writes_a_transaction_takes() {
        let mut items: Vec<Item> = (0..1000).map(|i| item(i, 0)).collect();
        items.extend((1000..2000).map(|i| item(i, 15)));
        let chunks = chunk(&items, 1000, 10_000, usize::MAX);
        let lines: Vec<usize> = chunks
            .iter()
            .flat_map(|c| c.iter().map(|i| i.line))
            .collect();
        assert_eq!(
            lines,
            (0..2000).collect::<Vec<_>>(),
            "every line once, in order"
        );
        for c in &chunks {
            assert!(c.len() <= 1000);
            let writes: usize = c.iter().map(|i| 1 + i.tags.len()).sum();
            assert!(writes <= 10_000, "{writes}");
        }
        assert_eq!(chunks[0].len(), 1000);
        assert_eq!(chunk(&items[..3], 2, 10_000, usize::MAX).len(), 2);
        assert!(chunk(&[], 10, 10, 10).is_empty());
    }

    /// Transactions are cut by content too: 1,000 objects of 15 tags (1,500 bytes each) under a
    /// limit of 100,000 bytes go 66 to a transaction, every line once and in order.
    #[test]
    fn chunks_hold_at_most_the_bytes_a_transaction_takes() {
        let items: Vec<Item> = (0..1000).map(|i| item(i, 15)).collect();
        let chunks = chunk(&items, 1000, 10_000, 100_000);
        let lines: Vec<usize> = chunks
            .iter()
            .flat_map(|c| c.iter().map(|i| i.line))
            .collect();
        assert_eq!(lines, (0..1000).collect::<Vec<_>>());
        for c in &chunks {
            let bytes: usize = c.iter().map(|i| i.bytes).sum();
            assert!(bytes <= 100_000, "{bytes}");
        }
        assert_eq!(chunks[0].len(), 66);
    }
}
