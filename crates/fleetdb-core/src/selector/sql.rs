//! Selector → SQL text with bound parameters, for SQLite and PostgreSQL.
//!
//! Shape: the objects table is aliased `o`; each tag of `Selector::tags()` is a LEFT JOINed
//! `tags` row `t0`, `t1`, … (NULL columns when the object lacks the tag). Every predicate
//! compiles to an expression that is TRUE or FALSE, never NULL, so `NOT` is exact. Values are
//! only ever parameters; the text holds nothing but keywords, aliases, placeholders and
//! constant type names.

use super::eval::threshold;
use super::{CmpOp, Dialect, EqOp, Expr, Field, Literal, Operand, Pred, SqlParam};
use crate::time::Timestamp;

pub(super) fn tag_joins(
    dialect: Dialect,
    tags: &[String],
    required: &std::collections::BTreeSet<String>,
    params: &mut Vec<SqlParam>,
) -> String {
    joins_except(dialect, tags, required, None, params)
}

/// The joins of every tag but `skip` (the one a FROM clause already starts from), in order.
fn joins_except(
    dialect: Dialect,
    tags: &[String],
    required: &std::collections::BTreeSet<String>,
    skip: Option<usize>,
    params: &mut Vec<SqlParam>,
) -> String {
    let mut out = String::new();
    for (i, tag) in tags.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        let p = push(dialect, params, SqlParam::Text(tag.clone()));
        // A required tag is an inner join (the selector is false without it anyway): the
        // planner may then drive the query from the tags index.
        let join = if required.contains(tag) {
            "JOIN"
        } else {
            "LEFT JOIN"
        };
        out.push_str(&format!(
            " {join} tags t{i} ON t{i}.namespace = o.namespace AND t{i}.kind = o.kind \
             AND t{i}.id = o.id AND t{i}.name = {p}"
        ));
    }
    out
}

pub(super) fn from_clause(
    dialect: Dialect,
    tags: &[String],
    required: &std::collections::BTreeSet<String>,
    params: &mut Vec<SqlParam>,
) -> String {
    let lead = match dialect {
        Dialect::Sqlite => tags.iter().position(|t| required.contains(t)),
        Dialect::Postgres => None,
    };
    let Some(lead) = lead else {
        return format!("objects o{}", tag_joins(dialect, tags, required, params));
    };
    let p = push(dialect, params, SqlParam::Text(tags[lead].clone()));
    let mut out = format!(
        "tags t{lead} CROSS JOIN objects o ON t{lead}.namespace = o.namespace AND t{lead}.kind = o.kind \
         AND t{lead}.id = o.id AND t{lead}.name = {p}"
    );
    out.push_str(&joins_except(dialect, tags, required, Some(lead), params));
    out
}

/// A marker (an SQL comment) inside the leading tag's subquery of [`driven_from_clause`], where
/// a claim may put a condition on that tag's `namespace, kind, id` so that it bounds the index
/// scan itself (a condition outside the subquery only filters what the scan read).
pub const CLAIM_LEAD_FILTER: &str = "/*lead*/";

/// PostgreSQL's FROM clause for a claim: like [`from_clause`] on SQLite, the query starts from
/// the first required tag, here a subquery kept out of the join tree (`OFFSET 0`) that reads
/// that tag's rows in key order from `tags_by_name`; each object is then one primary-key probe.
/// The planner, with statistics from before a queue drained, otherwise starts from `objects`
/// and walks every finished object. `None` when the selector requires no tag.
pub(super) fn driven_from_clause(
    tags: &[String],
    required: &std::collections::BTreeSet<String>,
    params: &mut Vec<SqlParam>,
) -> Option<String> {
    let dialect = Dialect::Postgres;
    let lead = tags.iter().position(|t| required.contains(t))?;
    let p = push(dialect, params, SqlParam::Text(tags[lead].clone()));
    let mut out = format!(
        "(SELECT * FROM tags WHERE name = {p} {CLAIM_LEAD_FILTER} ORDER BY namespace, kind, id OFFSET 0) t{lead} \
         JOIN objects o ON o.namespace = t{lead}.namespace AND o.kind = t{lead}.kind \
         AND o.id = t{lead}.id"
    );
    out.push_str(&joins_except(dialect, tags, required, Some(lead), params));
    Some(out)
}

/// Append a parameter; returns its placeholder (with a type cast in PostgreSQL, so that the
/// server infers TEXT/BIGINT whatever the context).
fn push(dialect: Dialect, params: &mut Vec<SqlParam>, p: SqlParam) -> String {
    let cast = match (&p, dialect) {
        (_, Dialect::Sqlite) => "",
        (SqlParam::Text(_), Dialect::Postgres) => "::text",
        (SqlParam::Int(_), Dialect::Postgres) => "::bigint",
        (SqlParam::Float(_), Dialect::Postgres) => "::float8",
        (SqlParam::Bool(_), Dialect::Postgres) => "::boolean",
    };
    params.push(p);
    format!("{}{cast}", dialect.placeholder(params.len()))
}

fn sql_op(op: CmpOp) -> &'static str {
    match op {
        CmpOp::Eq => "=",
        CmpOp::Ne => "<>",
        CmpOp::Lt => "<",
        CmpOp::Le => "<=",
        CmpOp::Gt => ">",
        CmpOp::Ge => ">=",
    }
}

pub(super) struct Gen<'p> {
    dialect: Dialect,
    now: Timestamp,
    tags: &'p [String],
    params: &'p mut Vec<SqlParam>,
}

/// A tag field in SQLite: its JSON type and its extracted value (the same path parameter).
struct SqliteField {
    ty: String,
    val: String,
}

impl<'p> Gen<'p> {
    pub(super) fn new(
        dialect: Dialect,
        now: Timestamp,
        tags: &'p [String],
        params: &'p mut Vec<SqlParam>,
    ) -> Self {
        Gen {
            dialect,
            now,
            tags,
            params,
        }
    }

    fn param(&mut self, p: SqlParam) -> String {
        push(self.dialect, self.params, p)
    }

    fn alias(&self, tag: &str) -> String {
        let i = self
            .tags
            .binary_search_by(|t| t.as_str().cmp(tag))
            .expect("every referenced tag is in tags()");
        format!("t{i}")
    }

    pub(super) fn expr(&mut self, e: &Expr) -> String {
        match e {
            Expr::Or(xs) => self.join(xs, " OR "),
            Expr::And(xs) => self.join(xs, " AND "),
            Expr::Not(x) => format!("(NOT {})", self.expr(x)),
            Expr::Pred(p) => self.pred(p),
        }
    }

    fn join(&mut self, xs: &[Expr], sep: &str) -> String {
        let parts: Vec<String> = xs.iter().map(|x| self.expr(x)).collect();
        format!("({})", parts.join(sep))
    }

    fn pred(&mut self, p: &Pred) -> String {
        match p {
            Pred::Kind { op, name } => self.column_eq("o.kind", *op, name),
            Pred::Namespace { op, name } => self.column_eq("o.namespace", *op, name),
            Pred::Label { key, op, value } => {
                let label = self.label(key);
                let v = self.param(SqlParam::Text(value.clone()));
                let is = match (self.dialect, op) {
                    (Dialect::Sqlite, EqOp::Eq) => "IS",
                    (Dialect::Sqlite, EqOp::Ne) => "IS NOT",
                    (Dialect::Postgres, EqOp::Eq) => "IS NOT DISTINCT FROM",
                    (Dialect::Postgres, EqOp::Ne) => "IS DISTINCT FROM",
                };
                format!("({label} {is} {v})")
            }
            Pred::LabelIn {
                key,
                negated,
                values,
            } => {
                let label = self.label(key);
                let vs: Vec<String> = values
                    .iter()
                    .map(|v| self.param(SqlParam::Text(v.clone())))
                    .collect();
                let (not, absent) = if *negated {
                    ("NOT ", "TRUE")
                } else {
                    ("", "FALSE")
                };
                format!("COALESCE({label} {not}IN ({}), {absent})", vs.join(", "))
            }
            Pred::HasLabel { key } => {
                let label = self.label(key);
                format!("({label} IS NOT NULL)")
            }
            Pred::Has { tag } => format!("({}.name IS NOT NULL)", self.alias(tag)),
            Pred::Updated { tag, op, offset_ms } => {
                let t = self.alias(tag);
                let at = self.param(SqlParam::Int(threshold(self.now, *offset_ms)));
                format!("COALESCE({t}.updated_at {} {at}, FALSE)", sql_op(*op))
            }
            Pred::Compare { left, op, right } => match self.dialect {
                Dialect::Sqlite => self.sqlite_compare(left, *op, right),
                Dialect::Postgres => self.pg_compare(left, *op, right),
            },
        }
    }

    fn column_eq(&mut self, column: &str, op: EqOp, value: &str) -> String {
        let v = self.param(SqlParam::Text(value.to_string()));
        let op = match op {
            EqOp::Eq => "=",
            EqOp::Ne => "<>",
        };
        format!("({column} {op} {v})")
    }

    /// A label's value (TEXT) or NULL when absent.
    fn label(&mut self, key: &str) -> String {
        match self.dialect {
            // Keys are validated to [A-Za-z0-9._/-], so the quoted path is safe.
            Dialect::Sqlite => {
                let path = self.param(SqlParam::Text(format!("$.\"{key}\"")));
                format!("json_extract(o.labels, {path})")
            }
            Dialect::Postgres => {
                let k = self.param(SqlParam::Text(key.to_string()));
                format!("(o.labels::jsonb ->> {k})")
            }
        }
    }

    // ---- SQLite ----

    fn sqlite_field(&mut self, f: &Field) -> SqliteField {
        let t = self.alias(&f.tag);
        // Segments are validated to [A-Za-z0-9_-]+, so the quoted path is safe.
        let mut path = String::from("$");
        for seg in &f.path {
            path.push_str(&format!(".\"{seg}\""));
        }
        let p = self.param(SqlParam::Text(path));
        SqliteField {
            ty: format!("json_type({t}.value, {p})"),
            val: format!("json_extract({t}.value, {p})"),
        }
    }

    fn sqlite_compare(&mut self, left: &Field, op: CmpOp, right: &Operand) -> String {
        if op == CmpOp::Ne {
            return format!("(NOT {})", self.sqlite_compare(left, CmpOp::Eq, right));
        }
        if never_ordered(op, right) {
            return "FALSE".to_string();
        }
        let a = self.sqlite_field(left);
        let o = sql_op(op);
        const NUM: &str = "IN ('integer', 'real')";
        match right {
            Operand::Literal(lit) => match lit {
                Literal::Number(n) => {
                    // A float literal goes in as its JSON text, read by SQLite's own
                    // text-to-double conversion, as the tag's value is (`json_extract`): that
                    // conversion is not exactly rounded (1e-300 reads as a neighbour), so an
                    // exact f64 would differ from the same number read from the tag. Equal
                    // texts (both canonical, serde_json's shortest form) give equal doubles.
                    let p = match n.as_i64() {
                        Some(i) => self.param(SqlParam::Int(i)),
                        None => {
                            let text = self.param(SqlParam::Text(n.to_string()));
                            format!("json_extract({text}, '$')")
                        }
                    };
                    format!(
                        "(CASE WHEN {} {NUM} THEN {} {o} {p} ELSE FALSE END)",
                        a.ty, a.val
                    )
                }
                Literal::String(s) => {
                    let p = self.param(SqlParam::Text(s.clone()));
                    format!(
                        "(CASE WHEN {} = 'text' THEN {} {o} {p} ELSE FALSE END)",
                        a.ty, a.val
                    )
                }
                // `op` is `=` here: ordering against true/false/null is never_ordered.
                Literal::Bool(b) => format!("COALESCE({} = '{b}', FALSE)", a.ty),
                Literal::Null => format!("COALESCE({} = 'null', FALSE)", a.ty),
            },
            Operand::Field(g) => {
                let b = self.sqlite_field(g);
                let (ta, va, tb, vb) = (&a.ty, &a.val, &b.ty, &b.val);
                if op == CmpOp::Eq {
                    format!(
                        "(CASE WHEN {ta} IS NULL OR {tb} IS NULL THEN FALSE \
                         WHEN {ta} {NUM} AND {tb} {NUM} THEN {va} = {vb} \
                         WHEN {ta} <> {tb} THEN FALSE \
                         WHEN {ta} IN ('true', 'false', 'null') THEN TRUE \
                         ELSE {va} = {vb} END)"
                    )
                } else {
                    format!(
                        "(CASE WHEN {ta} {NUM} AND {tb} {NUM} THEN {va} {o} {vb} \
                         WHEN {ta} = 'text' AND {tb} = 'text' THEN {va} {o} {vb} \
                         ELSE FALSE END)"
                    )
                }
            }
        }
    }

    // ---- PostgreSQL ----

    /// A tag field as jsonb, SQL NULL when missing. Path segments only select object members
    /// (strict jsonpath: never array elements; errors are silenced into "no value").
    fn pg_field(&mut self, f: &Field) -> String {
        let t = self.alias(&f.tag);
        if f.path.is_empty() {
            return format!("({t}.value::jsonb)");
        }
        // Segments are validated to [A-Za-z0-9_-]+, so the quoted jsonpath is safe.
        let mut path = String::from("strict $");
        for seg in &f.path {
            path.push_str(&format!(".\"{seg}\""));
        }
        let p = self.param(SqlParam::Text(path));
        format!("jsonb_path_query_first({t}.value::jsonb, ({p})::jsonpath, '{{}}'::jsonb, TRUE)")
    }

    fn pg_compare(&mut self, left: &Field, op: CmpOp, right: &Operand) -> String {
        if op == CmpOp::Ne {
            return format!("(NOT {})", self.pg_compare(left, CmpOp::Eq, right));
        }
        if never_ordered(op, right) {
            return "FALSE".to_string();
        }
        let x = self.pg_field(left);
        let o = sql_op(op);
        match right {
            Operand::Literal(lit) => match (lit, op) {
                (Literal::Bool(_) | Literal::Null, CmpOp::Eq) => {
                    format!("COALESCE({x} = '{lit}'::jsonb, FALSE)")
                }
                (Literal::Bool(_) | Literal::Null, _) => unreachable!("never_ordered"),
                (Literal::Number(_) | Literal::String(_), CmpOp::Eq) => {
                    let json = serde_json::to_string(&literal_json(lit)).unwrap_or_default();
                    let p = self.param(SqlParam::Text(json));
                    format!("COALESCE({x} = ({p})::jsonb, FALSE)")
                }
                (Literal::Number(n), _) => {
                    let p = self.param(SqlParam::Text(n.to_string()));
                    format!(
                        "(CASE WHEN jsonb_typeof({x}) = 'number' \
                         THEN ({x})::numeric {o} ({p})::numeric ELSE FALSE END)"
                    )
                }
                (Literal::String(s), _) => {
                    let p = self.param(SqlParam::Text(s.clone()));
                    format!(
                        "(CASE WHEN jsonb_typeof({x}) = 'string' \
                         THEN ({x} #>> '{{}}') COLLATE \"C\" {o} ({p}) COLLATE \"C\" ELSE FALSE END)"
                    )
                }
            },
            Operand::Field(g) => {
                let y = self.pg_field(g);
                if op == CmpOp::Eq {
                    // Objects and arrays compare by their text (as SQLite and the reference
                    // do); scalars by jsonb equality (type-aware, numbers numerically).
                    format!(
                        "COALESCE(CASE WHEN jsonb_typeof({x}) IN ('object', 'array') \
                         THEN ({x})::text = ({y})::text ELSE {x} = {y} END, FALSE)"
                    )
                } else {
                    format!(
                        "(CASE WHEN jsonb_typeof({x}) = 'number' AND jsonb_typeof({y}) = 'number' \
                         THEN ({x})::numeric {o} ({y})::numeric \
                         WHEN jsonb_typeof({x}) = 'string' AND jsonb_typeof({y}) = 'string' \
                         THEN ({x} #>> '{{}}') COLLATE \"C\" {o} ({y} #>> '{{}}') COLLATE \"C\" \
                         ELSE FALSE END)"
                    )
                }
            }
        }
    }
}

/// An ordering (`<`, `<=`, `>`, `>=`) against true, false or null: always false. Decided before
/// any parameter is pushed, because every pushed parameter must appear in the text (SQLite
/// counts parameters by the highest number used; PostgreSQL must infer each one's type).
fn never_ordered(op: CmpOp, right: &Operand) -> bool {
    !matches!(op, CmpOp::Eq | CmpOp::Ne)
        && matches!(right, Operand::Literal(Literal::Bool(_) | Literal::Null))
}

fn literal_json(l: &Literal) -> serde_json::Value {
    match l {
        Literal::Number(n) => serde_json::Value::Number(n.clone()),
        Literal::String(s) => serde_json::Value::String(s.clone()),
        Literal::Bool(b) => serde_json::Value::Bool(*b),
        Literal::Null => serde_json::Value::Null,
    }
}
