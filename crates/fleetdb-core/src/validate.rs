//! Validation at the edge: names, label keys and values, JSON values, sizes. Every rule lives here
//! once; backends never see unvalidated input.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Names of namespaces, kinds, ids and tags: `^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$`.
pub const NAME_RULE: &str = "must match ^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$ (letters and digits, single '.', '_' or '-' between them)";
/// The longest name, in bytes.
pub const NAME_BYTES_MAX: usize = 76;
/// Key plus value of one label, in bytes.
pub const LABEL_BYTES_MAX: usize = 4096;
/// Labels on one object or namespace.
pub const LABELS_PER_OBJECT_MAX: usize = 256;
/// Label keys with this prefix belong to the system.
pub const RESERVED_LABEL_PREFIX: &str = "fleetdb.io/";
/// The rule for label keys.
pub const LABEL_KEY_RULE: &str =
    "must be 1 or more of letters, digits, '.', '_', '-' and '/', starting and ending with a letter or digit";

/// Check a name against [`NAME_RULE`] and [`NAME_BYTES_MAX`]. `field` names what it is ("kind", "id", ...).
pub fn name(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, value, "must not be empty"));
    }
    if value.len() > NAME_BYTES_MAX {
        return Err(Error::invalid(
            field,
            value,
            format!("is {} bytes; the maximum is {NAME_BYTES_MAX}", value.len()),
        ));
    }
    let bytes = value.as_bytes();
    let mut prev_sep = true; // at the start a separator is not allowed either
    for &b in bytes {
        if b.is_ascii_alphanumeric() {
            prev_sep = false;
        } else if matches!(b, b'.' | b'_' | b'-') {
            if prev_sep {
                return Err(Error::invalid(field, value, NAME_RULE));
            }
            prev_sep = true;
        } else {
            return Err(Error::invalid(field, value, NAME_RULE));
        }
    }
    if prev_sep {
        return Err(Error::invalid(field, value, NAME_RULE));
    }
    Ok(())
}

/// Check a label key's syntax (not the reserved prefix: see [`user_label_key`]).
pub fn label_key(key: &str) -> Result<()> {
    let bytes = key.as_bytes();
    let ok_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/');
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return Err(Error::invalid("label key", key, "must not be empty"));
    };
    if !first.is_ascii_alphanumeric()
        || !last.is_ascii_alphanumeric()
        || !bytes.iter().all(|&b| ok_char(b))
    {
        return Err(Error::invalid("label key", key, LABEL_KEY_RULE));
    }
    if key.len() > LABEL_BYTES_MAX {
        return Err(Error::TooLarge {
            field: format!("label key {key:.32?}…"),
            size: key.len(),
            max: LABEL_BYTES_MAX,
        });
    }
    Ok(())
}

/// Check a label key written by a user: syntax, and not under the system's reserved prefix.
pub fn user_label_key(key: &str) -> Result<()> {
    label_key(key)?;
    if key.starts_with(RESERVED_LABEL_PREFIX) {
        return Err(Error::invalid(
            "label key",
            key,
            format!("the prefix {RESERVED_LABEL_PREFIX:?} is reserved for the system"),
        ));
    }
    Ok(())
}

/// Check one label (key and value) written by a user. An empty value is allowed: it deletes the label.
pub fn user_label(key: &str, value: &str) -> Result<()> {
    if key.starts_with(crate::gc::GC_LABEL_PREFIX) {
        // The system's reference labels: users write them, and they must be well formed.
        label_key(key)?;
        if !value.is_empty() {
            crate::gc::parse_gc_label(key, value)?;
        }
    } else {
        user_label_key(key)?;
    }
    let size = key.len() + value.len();
    if size > LABEL_BYTES_MAX {
        return Err(Error::TooLarge {
            field: format!("label {key:?} (key + value)"),
            size,
            max: LABEL_BYTES_MAX,
        });
    }
    if value.contains('\0') {
        return Err(Error::invalid(
            format!("label {key:?} value"),
            value.replace('\0', "\\0"),
            "must not contain NUL characters",
        ));
    }
    Ok(())
}

/// Check a label patch (key → value; an empty value deletes the key).
pub fn user_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > LABELS_PER_OBJECT_MAX {
        return Err(Error::invalid(
            "labels",
            format!("{} labels", labels.len()),
            format!("at most {LABELS_PER_OBJECT_MAX} labels per object"),
        ));
    }
    for (k, v) in labels {
        user_label(k, v)?;
    }
    Ok(())
}

/// Check a label patch written on a blob: [`user_labels`], and its references may only be to
/// other blobs (`fleetdb.io/gc.ref.content…`). A blob has no namespace, so a reference from it to
/// an object (`fleetdb.io/gc.ref.<kind>` with another kind) could hold nothing: it is refused
/// rather than accepted and ignored. Removing such a label (an empty value) is allowed.
pub fn blob_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    user_labels(labels)?;
    for (k, v) in labels {
        let Some(rest) = k.strip_prefix(crate::gc::REF_PREFIX) else {
            continue;
        };
        let kind = rest.split(['.', '/']).next().unwrap_or(rest);
        if !v.is_empty() && kind != crate::gc::CONTENT_KIND {
            return Err(Error::invalid(
                format!("blob label {k:?}"),
                v.as_str(),
                format!(
                    "a blob can only reference blobs ({}{}[.<suffix>|/<suffix>]=sha256:…): \
                     blobs have no namespace, so a blob cannot hold an object (kind {kind:?}); \
                     hold the object with a lease, a reference from an object or gc.root",
                    crate::gc::REF_PREFIX,
                    crate::gc::CONTENT_KIND
                ),
            ));
        }
    }
    Ok(())
}

/// Apply a label patch: keys with an empty value are removed, others set. Returns the new label
/// set; fails if it would hold more than [`LABELS_PER_OBJECT_MAX`] labels.
pub fn merge_labels(
    current: &BTreeMap<String, String>,
    patch: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    let mut out = current.clone();
    for (k, v) in patch {
        if v.is_empty() {
            out.remove(k);
        } else {
            out.insert(k.clone(), v.clone());
        }
    }
    if out.len() > LABELS_PER_OBJECT_MAX {
        return Err(Error::invalid(
            "labels",
            format!("{} labels", out.len()),
            format!("at most {LABELS_PER_OBJECT_MAX} labels per object"),
        ));
    }
    Ok(out)
}

/// Parse `k=v` label arguments (CLI and config), validating each.
pub fn parse_label_arg(arg: &str) -> Result<(String, String)> {
    let Some((k, v)) = arg.split_once('=') else {
        return Err(Error::invalid(
            "label",
            arg,
            "must be KEY=VALUE (an empty VALUE deletes the label)",
        ));
    };
    user_label(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

/// Most arrays and objects a JSON value may nest inside each other: the most JSON text can nest
/// and still be read back (serde_json's parser stops at 128 levels).
pub const JSON_DEPTH_MAX: usize = 127;

/// Whether `value` nests arrays and objects more than `max` levels deep. Iterative (a stack of
/// one iterator per level): a recursive walk of a value a million levels deep would overflow
/// the thread's stack, which aborts the process.
fn nests_deeper_than(value: &serde_json::Value, max: usize) -> bool {
    use serde_json::Value;
    enum Level<'a> {
        Array(std::slice::Iter<'a, Value>),
        Object(serde_json::map::Values<'a>),
    }
    fn level(v: &Value) -> Option<Level<'_>> {
        match v {
            Value::Array(a) => Some(Level::Array(a.iter())),
            Value::Object(o) => Some(Level::Object(o.values())),
            _ => None,
        }
    }
    let mut stack: Vec<Level<'_>> = level(value).into_iter().collect();
    if stack.len() > max {
        return true;
    }
    while let Some(top) = stack.last_mut() {
        let next = match top {
            Level::Array(items) => items.next(),
            Level::Object(values) => values.next(),
        };
        match next {
            None => {
                stack.pop();
            }
            Some(child) => {
                if let Some(inner) = level(child) {
                    if stack.len() >= max {
                        return true;
                    }
                    stack.push(inner);
                }
            }
        }
    }
    false
}

/// Serialize a JSON value canonically (object keys sorted, no whitespace) and check its size
/// and nesting ([`JSON_DEPTH_MAX`]). Two values that are equal as JSON have the same canonical
/// text, which is what makes "set to the identical value" detectable as a no-op.
pub fn canonical_json(field: &str, value: &serde_json::Value, max: usize) -> Result<String> {
    // Checked first: serializing (and the NUL check) recurse as deep as the value nests.
    if nests_deeper_than(value, JSON_DEPTH_MAX) {
        return Err(Error::invalid(
            field,
            "<value>",
            format!("nests arrays and objects more than {JSON_DEPTH_MAX} levels deep"),
        ));
    }
    // serde_json's default map is a BTreeMap, so keys come out sorted.
    let text = serde_json::to_string(value)
        .map_err(|e| Error::invalid(field, "<value>", e.to_string()))?;
    if has_nul(value) {
        // PostgreSQL's jsonb (used by selectors) cannot hold NUL, so neither backend stores it.
        return Err(Error::invalid(
            field,
            "<value>",
            "must not contain NUL characters (\\u0000)",
        ));
    }
    if text.len() > max {
        return Err(Error::TooLarge {
            field: field.to_string(),
            size: text.len(),
            max,
        });
    }
    Ok(text)
}

/// Whether a JSON value holds a NUL character anywhere (strings or object keys).
pub(crate) fn has_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(has_nul),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Parse JSON text given by a user, naming the field and the position of the error.
pub fn parse_json(field: &str, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| {
        let shown: String = text.chars().take(64).collect();
        Error::invalid(field, shown, format!("is not valid JSON: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        for ok in ["a", "default", "m1", "a.b-c_d", "0", "A9.z"] {
            name("id", ok).unwrap();
        }
        for bad in ["", "-a", "a-", "a..b", "a b", "a/b", "é", ".", "a._b"] {
            let err = name("id", bad).unwrap_err();
            assert!(matches!(err, Error::Invalid { .. }), "{bad:?}: {err}");
        }
        name("id", &"a".repeat(76)).unwrap();
        let err = name("id", &"a".repeat(77)).unwrap_err();
        assert!(
            err.to_string().contains("77 bytes; the maximum is 76"),
            "{err}"
        );
    }

    #[test]
    fn uuids_are_names() {
        name("id", &uuid::Uuid::new_v4().to_string()).unwrap();
    }

    #[test]
    fn labels() {
        user_label("provider", "equinix").unwrap();
        user_label("a.b/c-d_e", "").unwrap();
        let err = user_label("fleetdb.io/owner", "x").unwrap_err();
        assert!(err.to_string().contains("reserved for the system"), "{err}");
        // gc labels are the system's vocabulary that users write, checked for form.
        user_label("fleetdb.io/gc.root", "x").unwrap();
        user_label("fleetdb.io/gc.ref.layer", "l1").unwrap();
        assert!(user_label("fleetdb.io/gc.ref.layer", "not an id").is_err());
        let err = user_label("k", &"v".repeat(4096)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "label \"k\" (key + value) is 4097 bytes; the maximum is 4096"
        );
        user_label("k", &"v".repeat(4095)).unwrap();
        assert!(user_label("/k", "v").is_err());
        assert!(user_label("k v", "v").is_err());
        assert!(user_label("k", "a\0b").is_err());
    }

    #[test]
    fn blob_references_are_to_blobs_only() {
        let l = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let digest = format!("sha256:{}", "a".repeat(64));
        blob_labels(&l(&[("fleetdb.io/gc.ref.content", &digest)])).unwrap();
        blob_labels(&l(&[("fleetdb.io/gc.ref.content.layer-1", &digest)])).unwrap();
        blob_labels(&l(&[("fleetdb.io/gc.ref.content/0", &digest)])).unwrap();
        blob_labels(&l(&[("fleetdb.io/gc.root", "true"), ("a", "b")])).unwrap();
        // Removing an old one is fine.
        blob_labels(&l(&[("fleetdb.io/gc.ref.image", "")])).unwrap();
        for key in [
            "fleetdb.io/gc.ref.image",
            "fleetdb.io/gc.ref.image.x",
            "fleetdb.io/gc.ref.image/x",
            "fleetdb.io/gc.ref.contents",
        ] {
            let err = blob_labels(&l(&[(key, "i1")])).unwrap_err();
            assert!(matches!(err, Error::Invalid { .. }), "{key}: {err}");
            assert!(
                err.to_string().contains("a blob can only reference blobs"),
                "{err}"
            );
        }
        // The same labels are fine on objects.
        user_labels(&l(&[("fleetdb.io/gc.ref.image", "i1")])).unwrap();
        // Malformed labels are still refused as such.
        assert!(blob_labels(&l(&[("fleetdb.io/gc.ref.content", "i1")])).is_err());
    }

    #[test]
    fn merge() {
        let cur: BTreeMap<_, _> =
            [("a".to_string(), "1".to_string()), ("b".into(), "2".into())].into();
        let patch: BTreeMap<_, _> =
            [("a".to_string(), "".to_string()), ("c".into(), "3".into())].into();
        let out = merge_labels(&cur, &patch).unwrap();
        assert_eq!(
            out,
            [("b".to_string(), "2".to_string()), ("c".into(), "3".into())].into()
        );
    }

    #[test]
    fn canonical_json_limits_nesting_without_recursing() {
        let nest = |depth: usize, object: bool| {
            let mut v = serde_json::json!("x");
            for _ in 0..depth {
                v = if object {
                    serde_json::json!({ "k": v })
                } else {
                    serde_json::json!([0, v, 1])
                };
            }
            v
        };
        for object in [false, true] {
            let ok = nest(JSON_DEPTH_MAX, object);
            let text = canonical_json("v", &ok, 1 << 20).unwrap();
            assert_eq!(parse_json("v", &text).unwrap(), ok, "reads back");
            let err = canonical_json("v", &nest(JSON_DEPTH_MAX + 1, object), 1 << 20).unwrap_err();
            assert!(err.to_string().contains("127 levels"), "{err}");
        }
        // Wide, not deep: fine.
        let wide = serde_json::Value::Array(vec![serde_json::json!([[1]]); 10_000]);
        assert!(canonical_json("v", &wide, 1 << 20).is_ok());
    }

    #[test]
    fn canonical_json_sorts_keys_and_limits_size() {
        let v: serde_json::Value = serde_json::from_str(r#"{ "b": 1, "a": [1, 2] }"#).unwrap();
        assert_eq!(
            canonical_json("v", &v, 100).unwrap(),
            r#"{"a":[1,2],"b":1}"#
        );
        let err = canonical_json("tag value", &v, 5).unwrap_err();
        assert_eq!(err.to_string(), "tag value is 17 bytes; the maximum is 5");
        let err = parse_json("tag value", "{nope").unwrap_err();
        assert!(
            err.to_string()
                .contains("is not valid JSON: key must be a string at line 1 column 2"),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn name_check_never_panics_and_matches_rule(s in "\\PC{0,80}") {
            let ok = name("n", &s).is_ok();
            let re_ok = !s.is_empty() && s.len() <= NAME_BYTES_MAX
                && s.split(['.', '_', '-']).all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()));
            prop_assert_eq!(ok, re_ok);
        }

        #[test]
        fn label_check_never_panics(k in "\\PC{0,40}", v in "\\PC{0,40}") {
            let _ = user_label(&k, &v);
        }
    }
}
