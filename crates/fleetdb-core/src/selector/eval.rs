//! The reference semantics of selectors, evaluated against one object in memory. The SQL the
//! backends run must select exactly the objects this accepts.

use std::cmp::Ordering;

use serde_json::Value;

use super::{CmpOp, EqOp, Expr, Field, Literal, ObjectView, Operand, Pred};
use crate::time::Timestamp;

pub(super) fn expr(e: &Expr, obj: &ObjectView<'_>, now: Timestamp) -> bool {
    match e {
        Expr::Or(xs) => xs.iter().any(|x| expr(x, obj, now)),
        Expr::And(xs) => xs.iter().all(|x| expr(x, obj, now)),
        Expr::Not(x) => !expr(x, obj, now),
        Expr::Pred(p) => pred(p, obj, now),
    }
}

fn eq_op(op: EqOp, a: &str, b: &str) -> bool {
    match op {
        EqOp::Eq => a == b,
        EqOp::Ne => a != b,
    }
}

/// `now + offset_ms` in microseconds, saturating.
pub(super) fn threshold(now: Timestamp, offset_ms: i64) -> i64 {
    now.as_micros()
        .saturating_add(offset_ms.saturating_mul(1000))
}

fn pred(p: &Pred, obj: &ObjectView<'_>, now: Timestamp) -> bool {
    match p {
        Pred::Kind { op, name } => eq_op(*op, obj.kind, name),
        Pred::Namespace { op, name } => eq_op(*op, obj.namespace, name),
        Pred::Label { key, op, value } => {
            let present = obj.labels.get(key) == Some(value);
            match op {
                EqOp::Eq => present,
                EqOp::Ne => !present,
            }
        }
        Pred::LabelIn {
            key,
            negated,
            values,
        } => {
            let inside = obj.labels.get(key).is_some_and(|v| values.contains(v));
            inside != *negated
        }
        Pred::HasLabel { key } => obj.labels.contains_key(key),
        Pred::Has { tag } => obj.tags.contains_key(tag),
        Pred::Updated { tag, op, offset_ms } => obj
            .tags
            .get(tag)
            .is_some_and(|(_, at)| op.holds(at.as_micros().cmp(&threshold(now, *offset_ms)))),
        Pred::Compare { left, op, right } => {
            let l = field(obj, left);
            let lit;
            let r = match right {
                Operand::Field(f) => field(obj, f),
                Operand::Literal(x) => {
                    lit = literal_value(x);
                    Some(&lit)
                }
            };
            compare(l, *op, r)
        }
    }
}

fn literal_value(l: &Literal) -> Value {
    match l {
        Literal::Number(n) => Value::Number(n.clone()),
        Literal::String(s) => Value::String(s.clone()),
        Literal::Bool(b) => Value::Bool(*b),
        Literal::Null => Value::Null,
    }
}

/// The value of a field, or `None` when it is missing: the tag is absent, or a path segment
/// is not a member of an object (segments never index into arrays).
pub(super) fn field<'v>(obj: &ObjectView<'v>, f: &Field) -> Option<&'v Value> {
    let tags = obj.tags;
    let mut v = &tags.get(&f.tag)?.0;
    for seg in &f.path {
        v = match v {
            Value::Object(m) => m.get(seg)?,
            _ => return None,
        };
    }
    Some(v)
}

/// A comparison with the "missing compares as distinct" rule: with a missing side, `!=` is true
/// and every other operator false.
pub(super) fn compare(a: Option<&Value>, op: CmpOp, b: Option<&Value>) -> bool {
    let (Some(a), Some(b)) = (a, b) else {
        return op == CmpOp::Ne;
    };
    match op {
        CmpOp::Eq => json_eq(a, b),
        CmpOp::Ne => !json_eq(a, b),
        _ => json_order(a, b).is_some_and(|o| op.holds(o)),
    }
}

/// Equality of two present JSON values: numbers numerically (1 = 1.0), strings by bytes,
/// booleans, null = null, objects and arrays by their canonical JSON text (so nested numbers
/// compare by their written form: `{"a":1}` ≠ `{"a":1.0}`). Different types are never equal.
pub(super) fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => num_cmp(x, y) == Some(Ordering::Equal),
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Null, Value::Null) => true,
        (Value::Object(_), Value::Object(_)) | (Value::Array(_), Value::Array(_)) => {
            canonical(a) == canonical(b)
        }
        _ => false,
    }
}

fn canonical(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Order of two present values: only between two numbers or two strings (byte order).
pub(super) fn json_order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => num_cmp(x, y),
        (Value::String(x), Value::String(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        _ => None,
    }
}

/// A JSON number as the databases see it: a 64-bit signed integer when it is written as an
/// integer within range, otherwise a 64-bit float.
enum Num {
    I(i64),
    F(f64),
}

fn num(n: &serde_json::Number) -> Num {
    match n.as_i64() {
        Some(i) => Num::I(i),
        None => Num::F(n.as_f64().unwrap_or(f64::NAN)),
    }
}

/// Exact numeric comparison (an integer and a float compare by their mathematical values).
pub(super) fn num_cmp(a: &serde_json::Number, b: &serde_json::Number) -> Option<Ordering> {
    match (num(a), num(b)) {
        (Num::I(x), Num::I(y)) => Some(x.cmp(&y)),
        (Num::F(x), Num::F(y)) => x.partial_cmp(&y),
        (Num::I(x), Num::F(y)) => int_float_cmp(x, y),
        (Num::F(x), Num::I(y)) => int_float_cmp(y, x).map(Ordering::reverse),
    }
}

/// Compare an i64 with an f64 exactly.
fn int_float_cmp(i: i64, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    // 2^63 is exactly representable; every f64 at or above it is larger than any i64.
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    if f >= TWO_63 {
        return Some(Ordering::Less);
    }
    if f < -TWO_63 {
        return Some(Ordering::Greater);
    }
    let t = f.trunc();
    // In range, so the truncation converts exactly.
    let ti = t as i64;
    match i.cmp(&ti) {
        Ordering::Equal => {
            if f > t {
                Some(Ordering::Less)
            } else if f < t {
                Some(Ordering::Greater)
            } else {
                Some(Ordering::Equal)
            }
        }
        o => Some(o),
    }
}
