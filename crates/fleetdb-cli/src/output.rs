//! Output: a table for people, JSON for tools. The JSON shapes here are a stable interface
//! (documented in docs/cli.md): fields are only ever added, never renamed or removed.

use fleetdb::{Change, Namespace, Object, SchemaStatus, Tag};
use serde::Serialize;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub fn namespace(n: &Namespace) -> Value {
    json!({
        "name": n.name,
        "labels": n.labels,
        "created_at": n.created_at.to_rfc3339(),
        "updated_at": n.updated_at.to_rfc3339(),
        "revision": n.revision.0,
    })
}

pub fn object(o: &Object) -> Value {
    json!({
        "namespace": o.key.namespace,
        "kind": o.key.kind,
        "id": o.key.id,
        "labels": o.labels,
        "created_at": o.created_at.to_rfc3339(),
        "updated_at": o.updated_at.to_rfc3339(),
        "revision": o.revision.0,
    })
}

pub fn tag(t: &Tag) -> Value {
    json!({
        "namespace": t.object.namespace,
        "kind": t.object.kind,
        "id": t.object.id,
        "name": t.name,
        "value": t.value,
        "updated_at": t.updated_at.to_rfc3339(),
        "revision": t.revision.0,
    })
}

pub fn change(c: &Change) -> Value {
    json!({
        "revision": c.revision.0,
        "namespace": c.namespace,
        "kind": c.kind,
        "id": c.id,
        "entity": c.entity.as_str(),
        "name": c.name,
        "op": c.op.as_str(),
        "old_value": c.old_value,
        "new_value": c.new_value,
        "at": c.at.to_rfc3339(),
    })
}

pub fn schema(s: &SchemaStatus) -> Value {
    json!({
        "database_version": s.database,
        "binary_version": s.binary,
        "up_to_date": s.database == s.binary,
        "applied": s.applied.iter().map(|m| json!({
            "version": m.version, "name": m.name, "applied_at": m.applied_at.to_rfc3339()
        })).collect::<Vec<_>>(),
        "pending": s.pending.iter().map(|m| json!({"version": m.version, "name": m.name})).collect::<Vec<_>>(),
    })
}

pub fn labels_text(labels: &fleetdb::Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={}", one_line(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Text from outside (a failure cause: the tail of a command's stderr) as one line for a table
/// or a message: control characters escaped (`\n`, `\t`, `\r`, `\u{1b}`), so a row stays one
/// line and nothing of it reaches the terminal as a control sequence.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out
}

/// Print rows as aligned columns under a header. Every cell goes through [`one_line`]: values
/// anyone wrote (key-values, export data, labels, causes) keep a row on one line and send no
/// control character to the terminal.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| one_line(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

pub fn print_json<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    );
}

/// One page of a listing: `{"items": […], "next": …}` as JSON, or a table with a hint on stderr
/// for the next page (`more: <flag> <next>`).
pub fn print_page<T, N: Serialize + std::fmt::Display>(
    fmt: Format,
    items: &[T],
    next: Option<N>,
    json_of: impl Fn(&T) -> serde_json::Value,
    header: &[&str],
    row_of: impl Fn(&T) -> Vec<String>,
    next_flag: &str,
) {
    match fmt {
        Format::Json => print_json(&serde_json::json!({
            "items": items.iter().map(json_of).collect::<Vec<_>>(),
            "next": next,
        })),
        Format::Table => {
            table(header, &items.iter().map(row_of).collect::<Vec<_>>());
            if let Some(n) = next {
                eprintln!("more: {next_flag} {n}");
            }
        }
    }
}

/// `--limit` of a listing: a page of 1 to [`LIST_PAGE_MAX`](fleetdb::core::query::LIST_PAGE_MAX)
/// rows, checked while parsing so that the message names the flag and the value as typed.
pub fn page_limit(s: &str) -> Result<usize, String> {
    bounded_count(s, fleetdb::core::query::LIST_PAGE_MAX)
}

/// `changes --limit`: 1 to [`CHANGES_PAGE_MAX`](fleetdb::CHANGES_PAGE_MAX) entries.
pub fn changes_limit(s: &str) -> Result<usize, String> {
    bounded_count(s, fleetdb::CHANGES_PAGE_MAX)
}

/// A revision flag (`changes --after`, `compact --before`, `--from-revision`): a whole number,
/// 0 or more, checked while parsing so that the message names the flag and the value as typed.
pub fn revision(s: &str) -> Result<i64, String> {
    at_least(s, 0, "must be a revision (a whole number, 0 or more)")
}

/// `--expect-revision`: 0 (the key must be absent) or the key's revision.
pub fn expected_revision(s: &str) -> Result<i64, String> {
    at_least(s, 0, "must be a revision (a whole number; 0: absent)")
}

/// A whole number of at least `min` (`rule` says what the flag takes otherwise), checked while
/// parsing so that the message names the flag and the value as typed.
pub fn at_least<T: std::str::FromStr + PartialOrd>(
    s: &str,
    min: T,
    rule: &str,
) -> Result<T, String> {
    match s.parse::<T>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(rule.to_string()),
    }
}

/// A whole number from 1 to `max`.
pub fn bounded_count(s: &str, max: usize) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number from 1 to {max}")),
    }
}
