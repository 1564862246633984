//! proptest strategies for selectors and objects (tests only). Uses only the public AST, so a
//! backend's tests could reuse it.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::{CmpOp, EqOp, Expr, Field, Labels, Literal, Operand, Pred, Timestamp};
use super::{SELECTOR_DEPTH_MAX, SELECTOR_PREDICATES_MAX, SELECTOR_TAGS_MAX};

/// Kinds, namespaces, label keys and values, tags and paths of the small vocabulary, chosen so
/// that random selectors often hit random objects.
pub const KINDS: [&str; 2] = ["machine", "switch"];
pub const NAMESPACES: [&str; 2] = ["default", "ns1"];
pub const LABEL_KEYS: [&str; 3] = ["a", "b.c/d", "e"];
pub const LABEL_VALUES: [&str; 3] = ["x", "y", "1"];
pub const TAGS: [&str; 3] = ["t1", "t2", "t3"];
pub const SEGMENTS: [&str; 3] = ["g", "h", "0"];
/// Durations of the small vocabulary, in milliseconds.
pub const DURATIONS_MS: [i64; 4] = [0, 600_000, 1_800_000, 3_600_000];
/// Tag ages of the small vocabulary (now - updated_at), in milliseconds; includes the exact
/// boundaries of [`DURATIONS_MS`] and one time in the future.
pub const AGES_MS: [i64; 8] = [
    0, 300_000, 600_000, 1_200_000, 1_800_000, 2_400_000, 7_200_000, -300_000,
];

/// JSON values tags hold in the small vocabulary: every type, numbers that are equal but
/// written differently, nested objects, arrays, and look-alikes across types.
pub fn tag_values() -> Vec<Value> {
    vec![
        json!(1),
        json!(1.0),
        json!(2),
        json!(-1),
        json!(2.5),
        json!(0),
        json!(9007199254740993i64),
        json!(1e20),
        json!("1"),
        json!("a"),
        json!("b"),
        json!(""),
        json!("é"),
        json!(true),
        json!(false),
        json!(null),
        json!({"g": 1}),
        json!({"g": 1.0}),
        json!({"g": 2}),
        json!({"g": "a"}),
        json!({"g": "1"}),
        json!({"g": true}),
        json!({"g": null}),
        json!({"g": {"h": 2}}),
        json!({"g": {"h": "a"}}),
        json!({"g": [1, 2]}),
        json!({"0": 1}),
        json!({"h": 2.5, "g": 1}),
        json!([1, 2]),
        json!([{"g": 1}]),
        json!({}),
        json!([]),
    ]
}

/// Literals of the small vocabulary.
pub fn small_literals() -> Vec<Literal> {
    let n = |v: Value| match v {
        Value::Number(n) => Literal::Number(n),
        _ => unreachable!(),
    };
    vec![
        n(json!(0)),
        n(json!(1)),
        n(json!(1.0)),
        n(json!(2)),
        n(json!(-1)),
        n(json!(2.5)),
        n(json!(9007199254740992i64)),
        n(json!(9007199254740993i64)),
        n(json!(1e20)),
        Literal::String(String::new()),
        Literal::String("a".into()),
        Literal::String("b".into()),
        Literal::String("1".into()),
        Literal::String("é".into()),
        Literal::Bool(true),
        Literal::Bool(false),
        Literal::Null,
    ]
}

fn pick(xs: &'static [&'static str]) -> BoxedStrategy<String> {
    proptest::sample::select(xs)
        .prop_map(str::to_string)
        .boxed()
}

fn eq_op() -> impl Strategy<Value = EqOp> {
    prop_oneof![Just(EqOp::Eq), Just(EqOp::Ne)]
}

fn cmp_op() -> impl Strategy<Value = CmpOp> {
    prop_oneof![
        Just(CmpOp::Eq),
        Just(CmpOp::Ne),
        Just(CmpOp::Lt),
        Just(CmpOp::Le),
        Just(CmpOp::Gt),
        Just(CmpOp::Ge),
    ]
}

struct Vocab {
    kind: BoxedStrategy<String>,
    namespace: BoxedStrategy<String>,
    label_key: BoxedStrategy<String>,
    label_value: BoxedStrategy<String>,
    tag: BoxedStrategy<String>,
    segment: BoxedStrategy<String>,
    literal: BoxedStrategy<Literal>,
    offset_ms: BoxedStrategy<i64>,
}

fn small_vocab() -> Vocab {
    Vocab {
        kind: pick(&KINDS),
        namespace: pick(&NAMESPACES),
        label_key: pick(&LABEL_KEYS),
        label_value: pick(&LABEL_VALUES),
        tag: pick(&TAGS),
        segment: pick(&SEGMENTS),
        literal: proptest::sample::select(small_literals()).boxed(),
        offset_ms: (proptest::sample::select(&DURATIONS_MS[..]), any::<bool>())
            .prop_map(|(d, plus)| if plus { d } else { -d })
            .boxed(),
    }
}

fn wide_vocab() -> Vocab {
    let name = "[A-Za-z0-9]{1,5}([._-][A-Za-z0-9]{1,3}){0,2}";
    let string = "[\\PC\"'\\\\\n]{0,8}";
    let number = prop_oneof![
        any::<i64>().prop_map(serde_json::Number::from),
        any::<u64>().prop_map(serde_json::Number::from),
        any::<f64>().prop_filter_map("finite", serde_json::Number::from_f64),
        (-1000i64..1000, 0u32..6).prop_map(|(m, e)| {
            serde_json::Number::from_f64(m as f64 / 10f64.powi(e as i32)).unwrap()
        }),
    ];
    let max_ms = i64::MAX / 1000;
    Vocab {
        kind: name.boxed(),
        namespace: name.boxed(),
        label_key: "[A-Za-z0-9]([A-Za-z0-9./_-]{0,8}[A-Za-z0-9])?".boxed(),
        label_value: "[\\PC\"'\\\\\n]{1,8}".boxed(),
        // A small pool so that selectors stay under the distinct-tag limit.
        tag: "[a-d]([._-]?[0-9]){0,1}".boxed(),
        segment: "[A-Za-z0-9_-]{1,6}".boxed(),
        literal: prop_oneof![
            number.prop_map(Literal::Number),
            string.prop_map(Literal::String),
            any::<bool>().prop_map(Literal::Bool),
            Just(Literal::Null),
        ]
        .boxed(),
        offset_ms: prop_oneof![
            Just(0i64),
            -max_ms..=max_ms,
            (-100i64..100).prop_map(|m| m * 60_000),
        ]
        .boxed(),
    }
}

fn arb_pred(v: Vocab) -> BoxedStrategy<Pred> {
    let field = (
        v.tag.clone(),
        proptest::collection::vec(v.segment.clone(), 0..3),
    )
        .prop_map(|(tag, path)| Field { tag, path });
    let operand = prop_oneof![
        3 => v.literal.clone().prop_map(Operand::Literal),
        1 => field.clone().prop_map(Operand::Field),
    ];
    prop_oneof![
        1 => (eq_op(), v.kind.clone()).prop_map(|(op, name)| Pred::Kind { op, name }),
        1 => (eq_op(), v.namespace.clone()).prop_map(|(op, name)| Pred::Namespace { op, name }),
        1 => (v.label_key.clone(), eq_op(), v.label_value.clone())
            .prop_map(|(key, op, value)| Pred::Label { key, op, value }),
        1 => (
            v.label_key.clone(),
            any::<bool>(),
            proptest::collection::vec(v.label_value.clone(), 1..4)
        )
            .prop_map(|(key, negated, values)| Pred::LabelIn {
                key,
                negated,
                values
            }),
        1 => v.label_key.clone().prop_map(|key| Pred::HasLabel { key }),
        2 => v.tag.clone().prop_map(|tag| Pred::Has { tag }),
        4 => (field, cmp_op(), operand).prop_map(|(left, op, right)| Pred::Compare {
            left,
            op,
            right
        }),
        2 => (v.tag.clone(), cmp_op(), v.offset_ms.clone()).prop_map(|(tag, op, offset_ms)| {
            Pred::Updated { tag, op, offset_ms }
        }),
    ]
    .boxed()
}

/// Nesting of parentheses and `not` as the canonical text writes it.
fn depth(e: &Expr, parent_needs_parens: bool) -> usize {
    match e {
        Expr::Pred(_) => 0,
        Expr::Not(x) => 1 + depth(x, true),
        Expr::Or(xs) | Expr::And(xs) => {
            usize::from(parent_needs_parens) + xs.iter().map(|x| depth(x, true)).max().unwrap_or(0)
        }
    }
}

fn tag_names<'e>(e: &'e Expr, out: &mut std::collections::BTreeSet<&'e str>) {
    match e {
        Expr::Pred(Pred::Has { tag } | Pred::Updated { tag, .. }) => {
            out.insert(tag);
        }
        Expr::Pred(Pred::Compare { left, right, .. }) => {
            out.insert(&left.tag);
            if let Operand::Field(f) = right {
                out.insert(&f.tag);
            }
        }
        Expr::Pred(_) => {}
        Expr::Not(x) => tag_names(x, out),
        Expr::Or(xs) | Expr::And(xs) => xs.iter().for_each(|x| tag_names(x, out)),
    }
}

fn count_preds(e: &Expr) -> usize {
    match e {
        Expr::Pred(_) => 1,
        Expr::Not(x) => count_preds(x),
        Expr::Or(xs) | Expr::And(xs) => xs.iter().map(count_preds).sum(),
    }
}

fn arb_expr_with(v: Vocab) -> impl Strategy<Value = Expr> {
    let leaf = arb_pred(v).prop_map(Expr::Pred);
    leaf.prop_recursive(5, 48, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 2..4).prop_map(Expr::Or),
            proptest::collection::vec(inner.clone(), 2..4).prop_map(Expr::And),
            inner.prop_map(|x| Expr::Not(Box::new(x))),
        ]
    })
    .prop_filter("within the selector limits", |e| {
        let mut tags = std::collections::BTreeSet::new();
        tag_names(e, &mut tags);
        count_preds(e) <= SELECTOR_PREDICATES_MAX
            && depth(e, false) <= SELECTOR_DEPTH_MAX
            && tags.len() <= SELECTOR_TAGS_MAX
    })
}

/// Selectors over the small vocabulary (for checking SQL against the reference).
pub fn arb_small_expr() -> impl Strategy<Value = Expr> {
    arb_expr_with(small_vocab())
}

/// Selectors over a wide vocabulary (for the text round trip).
pub fn arb_wide_expr() -> impl Strategy<Value = Expr> {
    arb_expr_with(wide_vocab())
}

/// An object of the small vocabulary.
#[derive(Debug, Clone)]
pub struct TestObject {
    pub namespace: String,
    pub kind: String,
    pub id: String,
    pub labels: Labels,
    pub tags: BTreeMap<String, (Value, Timestamp)>,
}

impl TestObject {
    pub fn view(&self) -> super::ObjectView<'_> {
        super::ObjectView {
            namespace: &self.namespace,
            kind: &self.kind,
            id: &self.id,
            labels: &self.labels,
            tags: &self.tags,
        }
    }
}

/// Up to `max` objects with ids `o0`, `o1`, …, tag times relative to `now`.
pub fn arb_objects(now: Timestamp, max: usize) -> impl Strategy<Value = Vec<TestObject>> {
    let tag = (
        proptest::sample::select(tag_values()),
        proptest::sample::select(&AGES_MS[..]),
    );
    let object = (
        pick(&NAMESPACES),
        pick(&KINDS),
        proptest::collection::btree_map(pick(&LABEL_KEYS), pick(&LABEL_VALUES), 0..3),
        proptest::collection::btree_map(pick(&TAGS), tag, 0..4),
    );
    proptest::collection::vec(object, 0..=max).prop_map(move |objs| {
        objs.into_iter()
            .enumerate()
            .map(|(i, (namespace, kind, labels, tags))| TestObject {
                namespace,
                kind,
                id: format!("o{i}"),
                labels,
                tags: tags
                    .into_iter()
                    .map(|(name, (v, age_ms))| {
                        (name, (v, Timestamp(now.as_micros() - age_ms * 1000)))
                    })
                    .collect(),
            })
            .collect()
    })
}
