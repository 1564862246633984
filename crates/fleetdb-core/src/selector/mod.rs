//! Selectors: a small text language that selects objects by kind, namespace, labels and tags
//! (docs/selectors.md). The same [`Selector`] drives claims, counts and listings, so a predicate
//! is written once:
//!
//! - [`Selector::parse`] turns text into an AST (never into SQL by concatenation), with errors
//!   that name the byte position, what was expected and what was found;
//! - [`Selector::matches`] is the reference semantics, evaluated against one object in memory;
//! - [`Selector::tag_joins`] and [`Selector::to_sql`] compile it to SQL text for SQLite or
//!   PostgreSQL, with every value as a bound parameter ([`SqlParam`]). The conformance suite
//!   checks that the SQL agrees with `matches`.
//!
//! ```
//! use fleetdb_core::selector::Selector;
//! let s = Selector::parse(
//!     "has(os_install_request) and tag(os_install_request).generation != tag(os_install_report).generation",
//! ).unwrap();
//! assert_eq!(s.tags(), ["os_install_report", "os_install_request"]);
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::error::Error;
use crate::model::Labels;
use crate::time::Timestamp;

mod eval;
mod parse;
mod sql;
pub use sql::CLAIM_LEAD_FILTER;

#[cfg(test)]
mod testgen;
#[cfg(test)]
mod tests;

/// The longest selector text, in bytes.
pub const SELECTOR_BYTES_MAX: usize = 4096;
/// The most predicates (leaves: `has(..)`, `kind = ..`, comparisons, …) in one selector.
pub const SELECTOR_PREDICATES_MAX: usize = 64;
/// The deepest nesting of parentheses and `not` in one selector.
pub const SELECTOR_DEPTH_MAX: usize = 32;
/// The most distinct tags one selector may reference (each is one join in SQL; SQLite allows at
/// most 64 tables in a join).
pub const SELECTOR_TAGS_MAX: usize = 32;

/// A parsed selector. Build it with [`Selector::parse`]; print it with `Display`, which gives the
/// canonical text (it parses back to the same selector).
#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    expr: Expr,
}

/// A selector's syntax tree. `Or` and `And` have at least two operands.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Or(Vec<Expr>),
    And(Vec<Expr>),
    Not(Box<Expr>),
    Pred(Pred),
}

/// `=` or `!=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EqOp {
    Eq,
    Ne,
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// One predicate (a leaf of the tree).
#[derive(Debug, Clone, PartialEq)]
pub enum Pred {
    /// `kind = NAME`, `kind != NAME`.
    Kind { op: EqOp, name: String },
    /// `namespace = NAME`, `namespace != NAME`.
    Namespace { op: EqOp, name: String },
    /// `label(KEY) = "v"` (false when absent), `label(KEY) != "v"` (true when absent).
    Label {
        key: String,
        op: EqOp,
        value: String,
    },
    /// `label(KEY) in ("a", "b")` (false when absent); with `negated`, `not in` (true when absent).
    LabelIn {
        key: String,
        negated: bool,
        values: Vec<String>,
    },
    /// `has_label(KEY)`: the label is present.
    HasLabel { key: String },
    /// `has(TAG)`: the object has the tag.
    Has { tag: String },
    /// `tag(T).a.b CMP (literal | tag(U).c)`.
    Compare {
        left: Field,
        op: CmpOp,
        right: Operand,
    },
    /// `updated(TAG) CMP now ± DURATION`: `offset_ms` is the signed offset from now in
    /// milliseconds (negative for `now - …`).
    Updated {
        tag: String,
        op: CmpOp,
        offset_ms: i64,
    },
}

/// A JSON value inside a tag: `tag(T)` (the whole value) or `tag(T).a.b` (object members).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Field {
    pub tag: String,
    pub path: Vec<String>,
}

/// The right-hand side of a field comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Field(Field),
    Literal(Literal),
}

/// A constant in a selector.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Number(serde_json::Number),
    String(String),
    Bool(bool),
    Null,
}

/// A parse error: where (byte offset into the text), what was expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorError {
    pub position: usize,
    pub expected: String,
    pub found: String,
}

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at {}: expected {}, found {}",
            self.position, self.expected, self.found
        )
    }
}

impl std::error::Error for SelectorError {}

impl SelectorError {
    /// The umbrella error for a selector `text` that failed with this error:
    /// `Error::Invalid { field: "selector", value: text, rule: "at N: expected …, found …" }`.
    /// Texts over [`SELECTOR_BYTES_MAX`] are shown by their first 64 characters.
    pub fn into_error(self, text: &str) -> Error {
        let value = if text.len() > SELECTOR_BYTES_MAX {
            let head: String = text.chars().take(64).collect();
            format!("{head}…")
        } else {
            text.to_string()
        };
        Error::invalid("selector", value, self.to_string())
    }
}

/// The object a selector is evaluated against by [`Selector::matches`].
#[derive(Debug, Clone, Copy)]
pub struct ObjectView<'a> {
    pub namespace: &'a str,
    pub kind: &'a str,
    pub id: &'a str,
    pub labels: &'a Labels,
    /// Tag name → (value, updated_at).
    pub tags: &'a BTreeMap<String, (serde_json::Value, Timestamp)>,
}

/// The SQL dialect [`Selector::to_sql`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The placeholder of the parameter at `index_1_based`: `?1` (SQLite, numbered so that one
    /// parameter may be used several times) or `$1` (PostgreSQL).
    pub fn placeholder(self, index_1_based: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{index_1_based}"),
            Dialect::Postgres => format!("${index_1_based}"),
        }
    }
}

/// A value bound to a placeholder of the generated SQL. In the PostgreSQL dialect every
/// placeholder carries a cast (`$3::text`, `$4::bigint`), so `Text` binds as TEXT and `Int` as
/// BIGINT; JSON literals are `Text` holding JSON text.
#[derive(Clone, Debug, PartialEq)]
pub enum SqlParam {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Selector {
    /// Parse selector text (grammar in docs/selectors.md). Errors are
    /// `Error::Invalid { field: "selector", value: text, rule: "at N: expected …, found …" }`.
    pub fn parse(text: &str) -> Result<Selector, Error> {
        Self::parse_detailed(text).map_err(|e| e.into_error(text))
    }

    /// Like [`Selector::parse`], with the error's position and parts as fields.
    pub fn parse_detailed(text: &str) -> Result<Selector, SelectorError> {
        parse::parse(text, SELECTOR_BYTES_MAX).map(|expr| Selector { expr })
    }

    /// The syntax tree.
    pub fn expr(&self) -> &Expr {
        &self.expr
    }

    /// The distinct tag names the selector references, sorted. In SQL, tag `tags()[i]` is the
    /// LEFT JOINed row aliased `t{i}`.
    pub fn tags(&self) -> Vec<String> {
        let mut set = BTreeSet::new();
        self.expr.collect_tags(&mut set);
        set.into_iter().map(str::to_string).collect()
    }

    /// The reference semantics: whether one object matches at time `now`. The SQL of
    /// [`Selector::to_sql`] selects exactly the objects for which this is true.
    pub fn matches(&self, obj: &ObjectView<'_>, now: Timestamp) -> bool {
        eval::expr(&self.expr, obj, now)
    }

    /// The parts of the selector `obj` fails at `now`, as canonical text: the top-level `and`
    /// terms it fails, or the whole selector when that is not an `and`. Empty exactly when it
    /// [`matches`](Selector::matches).
    pub fn unmet(&self, obj: &ObjectView<'_>, now: Timestamp) -> Vec<String> {
        match &self.expr {
            Expr::And(terms) => terms
                .iter()
                .filter(|t| !eval::expr(t, obj, now))
                .map(|t| t.to_string())
                .collect(),
            e if !eval::expr(e, obj, now) => vec![e.to_string()],
            _ => Vec::new(),
        }
    }

    /// A SQL boolean expression (never NULL) over the objects table aliased `o` (columns
    /// namespace, kind, id, labels) and, for each tag of [`Selector::tags`], the LEFT JOINed
    /// `tags` row aliased `t0`, `t1`, … (see [`Selector::tag_joins`]). Values are appended to
    /// `params` and referenced by placeholders numbered from `params.len() + 1`; no value is
    /// ever written into the text. Call [`Selector::tag_joins`] first with the same `params`
    /// when the joins precede this expression in the query.
    pub fn to_sql(&self, dialect: Dialect, now: Timestamp, params: &mut Vec<SqlParam>) -> String {
        let tags = self.tags();
        let mut g = sql::Gen::new(dialect, now, &tags, params);
        g.expr(&self.expr)
    }

    /// The LEFT JOIN clauses that bring in the selector's tags, aliased `t0`, `t1`, … in the
    /// order of [`Selector::tags`], each preceded by a space (empty when no tag is referenced):
    /// ` LEFT JOIN tags t0 ON t0.namespace = o.namespace AND t0.kind = o.kind AND t0.id = o.id
    /// AND t0.name = ?1`. Tag names are appended to `params`.
    pub fn tag_joins(&self, dialect: Dialect, params: &mut Vec<SqlParam>) -> String {
        sql::tag_joins(dialect, &self.tags(), &self.required_tags(), params)
    }

    /// The whole FROM clause: the objects table `o` and the tag joins. On SQLite, when the
    /// selector requires a tag, the query is forced to start from that tag (`CROSS JOIN` fixes
    /// the join order in SQLite), so it reads the few objects that have it through the
    /// `tags_by_name` index instead of scanning every object (SQLite keeps no statistics unless
    /// ANALYZE runs; PostgreSQL's planner has them and chooses on its own).
    pub fn from_sql(&self, dialect: Dialect, params: &mut Vec<SqlParam>) -> String {
        sql::from_clause(dialect, &self.tags(), &self.required_tags(), params)
    }

    /// PostgreSQL's FROM clause for claims (see `sql::driven_from_clause`): started from the
    /// first required tag when there is one, else `objects o` with the tag joins.
    pub fn claim_from_sql(&self, params: &mut Vec<SqlParam>) -> String {
        let (tags, required) = (self.tags(), self.required_tags());
        match sql::driven_from_clause(&tags, &required, params) {
            Some(from) => from,
            None => format!(
                "objects o{}",
                sql::tag_joins(Dialect::Postgres, &tags, &required, params)
            ),
        }
    }

    /// The alias whose key columns a claim's per-candidate tests should name in
    /// [`Self::claim_from_sql`]: the leading tag's when the query starts from it (the tests then
    /// run on each tag row before its object is looked up), else `o`.
    pub fn claim_key_alias(&self) -> String {
        let required = self.required_tags();
        match self.tags().iter().position(|t| required.contains(t)) {
            Some(i) => format!("t{i}"),
            None => "o".to_string(),
        }
    }

    /// The alias whose `namespace, kind, id` columns to order and page by with [`Self::from_sql`]:
    /// the leading tag's on SQLite (its `tags_by_name` index is already in that order for one
    /// name, so `ORDER BY … LIMIT n` stops after n rows instead of sorting every candidate), else `o`.
    pub fn key_alias(&self, dialect: Dialect) -> String {
        match dialect {
            Dialect::Sqlite => {
                let required = self.required_tags();
                match self.tags().iter().position(|t| required.contains(t)) {
                    Some(i) => format!("t{i}"),
                    None => "o".to_string(),
                }
            }
            Dialect::Postgres => "o".to_string(),
        }
    }

    /// Tags the object must have for the selector to match: those named by a `has(T)`,
    /// `updated(T) …` or a comparison other than `!=` in the top-level conjunction. Their joins
    /// are inner joins, so the database can start from the (selective) tag index instead of
    /// scanning every object.
    pub fn required_tags(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        self.expr.collect_required(&mut out);
        out
    }
}

impl Expr {
    fn collect_required(&self, out: &mut BTreeSet<String>) {
        match self {
            Expr::And(xs) => xs.iter().for_each(|x| x.collect_required(out)),
            Expr::Pred(Pred::Has { tag }) | Expr::Pred(Pred::Updated { tag, .. }) => {
                out.insert(tag.clone());
            }
            // A missing side makes every comparison but `!=` false.
            Expr::Pred(Pred::Compare { left, op, right }) if *op != CmpOp::Ne => {
                out.insert(left.tag.clone());
                if let Operand::Field(f) = right {
                    out.insert(f.tag.clone());
                }
            }
            _ => {}
        }
    }

    fn collect_tags<'a>(&'a self, out: &mut BTreeSet<&'a str>) {
        match self {
            Expr::Or(xs) | Expr::And(xs) => xs.iter().for_each(|x| x.collect_tags(out)),
            Expr::Not(x) => x.collect_tags(out),
            Expr::Pred(p) => match p {
                Pred::Has { tag } | Pred::Updated { tag, .. } => {
                    out.insert(tag);
                }
                Pred::Compare { left, right, .. } => {
                    out.insert(&left.tag);
                    if let Operand::Field(f) = right {
                        out.insert(&f.tag);
                    }
                }
                Pred::Kind { .. }
                | Pred::Namespace { .. }
                | Pred::Label { .. }
                | Pred::LabelIn { .. }
                | Pred::HasLabel { .. } => {}
            },
        }
    }
}

impl std::str::FromStr for Selector {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Selector::parse(s)
    }
}

/// A selector travels as its canonical text.
impl serde::Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The longest canonical text a selector within [`SELECTOR_BYTES_MAX`] can print, with room to
/// spare: printing only adds spaces around operators, quotes and escapes in strings (at most
/// 2× a string), longer duration units (< 2×) and numbers in full (`1e15` →
/// `1000000000000000.0`: 4.5×); it never adds parentheses the input lacked, nor depth,
/// predicates or tags (those limits hold for the canonical text as for the input).
pub const CANONICAL_BYTES_MAX: usize = 8 * SELECTOR_BYTES_MAX;

/// Reads canonical text (what `Serialize` writes) back: up to [`CANONICAL_BYTES_MAX`], since the
/// canonical text of a selector within the limit may be longer than the limit.
impl<'de> serde::Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse::parse(&text, CANONICAL_BYTES_MAX)
            .map(|expr| Selector { expr })
            .map_err(|e| serde::de::Error::custom(e.into_error(&text)))
    }
}

// ---- canonical text ----

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.expr.fmt(f)
    }
}

impl Expr {
    fn fmt_operand(&self, f: &mut fmt::Formatter<'_>, parens: bool) -> fmt::Result {
        if parens {
            write!(f, "({self})")
        } else {
            write!(f, "{self}")
        }
    }
}

/// Prints canonical selector text: single spaces, parentheses only where the tree needs them.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Or(xs) => {
                for (i, x) in xs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" or ")?;
                    }
                    x.fmt_operand(f, matches!(x, Expr::Or(_)))?;
                }
                Ok(())
            }
            Expr::And(xs) => {
                for (i, x) in xs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" and ")?;
                    }
                    x.fmt_operand(f, matches!(x, Expr::Or(_) | Expr::And(_)))?;
                }
                Ok(())
            }
            Expr::Not(x) => {
                f.write_str("not ")?;
                x.fmt_operand(f, matches!(**x, Expr::Or(_) | Expr::And(_)))
            }
            Expr::Pred(p) => p.fmt(f),
        }
    }
}

impl EqOp {
    pub fn as_str(self) -> &'static str {
        match self {
            EqOp::Eq => "=",
            EqOp::Ne => "!=",
        }
    }
}

impl CmpOp {
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }

    /// Whether `ord` (left compared with right) satisfies this operator.
    pub fn holds(self, ord: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            CmpOp::Eq => ord == Equal,
            CmpOp::Ne => ord != Equal,
            CmpOp::Lt => ord == Less,
            CmpOp::Le => ord != Greater,
            CmpOp::Gt => ord == Greater,
            CmpOp::Ge => ord != Less,
        }
    }
}

impl fmt::Display for EqOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for CmpOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tag({})", self.tag)?;
        for seg in &self.path {
            write!(f, ".{seg}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Field(x) => x.fmt(f),
            Operand::Literal(x) => x.fmt(f),
        }
    }
}

/// Writes a string literal in canonical form: double quotes, escaping `"`, `\` and newline.
fn write_string(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            c => write!(f, "{c}")?,
        }
    }
    f.write_str("\"")
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Number(n) => write!(f, "{n}"),
            Literal::String(s) => write_string(f, s),
            Literal::Bool(b) => write!(f, "{b}"),
            Literal::Null => f.write_str("null"),
        }
    }
}

/// Writes a positive duration in milliseconds as `1d2h3m4s5ms` (zero parts left out).
fn write_duration(f: &mut fmt::Formatter<'_>, mut ms: u64) -> fmt::Result {
    const UNITS: [(&str, u64); 5] = [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ];
    for (unit, size) in UNITS {
        if ms >= size {
            write!(f, "{}{unit}", ms / size)?;
            ms %= size;
        }
    }
    Ok(())
}

impl fmt::Display for Pred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pred::Kind { op, name } => write!(f, "kind {op} {name}"),
            Pred::Namespace { op, name } => write!(f, "namespace {op} {name}"),
            Pred::Label { key, op, value } => {
                write!(f, "label({key}) {op} ")?;
                write_string(f, value)
            }
            Pred::LabelIn {
                key,
                negated,
                values,
            } => {
                write!(f, "label({key}) {}in (", if *negated { "not " } else { "" })?;
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write_string(f, v)?;
                }
                f.write_str(")")
            }
            Pred::HasLabel { key } => write!(f, "has_label({key})"),
            Pred::Has { tag } => write!(f, "has({tag})"),
            Pred::Compare { left, op, right } => write!(f, "{left} {op} {right}"),
            Pred::Updated { tag, op, offset_ms } => {
                write!(f, "updated({tag}) {op} now")?;
                match offset_ms.cmp(&0) {
                    std::cmp::Ordering::Equal => Ok(()),
                    std::cmp::Ordering::Less => {
                        f.write_str(" - ")?;
                        write_duration(f, offset_ms.unsigned_abs())
                    }
                    std::cmp::Ordering::Greater => {
                        f.write_str(" + ")?;
                        write_duration(f, offset_ms.unsigned_abs())
                    }
                }
            }
        }
    }
}
