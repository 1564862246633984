//! Read queries: object listings with label requirements and cursor pagination.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::validate;

/// One label requirement of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum LabelRequirement {
    /// The label is present with this value.
    Eq { key: String, value: String },
    /// The label is absent or has another value.
    NotEq { key: String, value: String },
    /// The label is present (any value).
    Exists { key: String },
    /// The label is absent.
    NotExists { key: String },
}

impl LabelRequirement {
    pub fn key(&self) -> &str {
        match self {
            LabelRequirement::Eq { key, .. }
            | LabelRequirement::NotEq { key, .. }
            | LabelRequirement::Exists { key }
            | LabelRequirement::NotExists { key } => key,
        }
    }

    /// Whether a label set satisfies this requirement (the reference semantics the backends' SQL
    /// must agree with; the conformance suite checks they do).
    pub fn matches(&self, labels: &crate::model::Labels) -> bool {
        match self {
            LabelRequirement::Eq { key, value } => labels.get(key) == Some(value),
            LabelRequirement::NotEq { key, value } => labels.get(key) != Some(value),
            LabelRequirement::Exists { key } => labels.contains_key(key),
            LabelRequirement::NotExists { key } => !labels.contains_key(key),
        }
    }

    pub fn validate(&self) -> Result<()> {
        validate::label_key(self.key())?;
        match self {
            LabelRequirement::Eq { key, value } | LabelRequirement::NotEq { key, value } => {
                if value.is_empty() {
                    return Err(Error::invalid(
                        format!("label selector {key:?}"),
                        value,
                        "a compared value must not be empty (use `KEY` or `!KEY` to test presence)",
                    ));
                }
                if value.contains('\0') {
                    return Err(Error::invalid(
                        format!("label selector {key:?}"),
                        value,
                        "must not contain NUL characters",
                    ));
                }
                if key.len() + value.len() > validate::LABEL_BYTES_MAX {
                    return Err(Error::TooLarge {
                        field: format!("label selector {key:?}"),
                        size: key.len() + value.len(),
                        max: validate::LABEL_BYTES_MAX,
                    });
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// The rule for label selector text.
pub const LABEL_SELECTOR_RULE: &str =
    "must be comma-separated requirements: KEY=VALUE, KEY!=VALUE, KEY (present) or !KEY (absent)";

/// Parse `a=b,c!=d,e,!f` into requirements. Values may not contain commas.
pub fn parse_label_selector(text: &str) -> Result<Vec<LabelRequirement>> {
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(Error::invalid("label selector", text, LABEL_SELECTOR_RULE));
        }
        let req = if let Some((k, v)) = part.split_once("!=") {
            LabelRequirement::NotEq {
                key: k.trim().to_string(),
                value: v.trim().to_string(),
            }
        } else if let Some((k, v)) = part.split_once('=') {
            LabelRequirement::Eq {
                key: k.trim().to_string(),
                value: v.trim().to_string(),
            }
        } else if let Some(k) = part.strip_prefix('!') {
            LabelRequirement::NotExists {
                key: k.trim().to_string(),
            }
        } else {
            LabelRequirement::Exists {
                key: part.to_string(),
            }
        };
        req.validate()?;
        out.push(req);
    }
    Ok(out)
}

/// The largest page a listing returns.
pub const LIST_PAGE_MAX: usize = 1000;
/// The page size when none is given.
pub const LIST_PAGE_DEFAULT: usize = 100;
/// Label requirements in one listing.
pub const LABEL_REQUIREMENTS_MAX: usize = 32;

/// A position in an object listing (ordered by kind, then id), exchanged as an opaque string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectCursor {
    pub kind: String,
    pub id: String,
}

impl ObjectCursor {
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{}\n{}", self.kind, self.id))
    }

    pub fn decode(text: &str) -> Result<Self> {
        let bad = || Error::invalid("cursor", text, "is not a cursor returned by a listing");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| bad())?;
        let s = String::from_utf8(bytes).map_err(|_| bad())?;
        let (kind, id) = s.split_once('\n').ok_or_else(bad)?;
        validate::name("kind", kind).map_err(|_| bad())?;
        validate::name("id", id).map_err(|_| bad())?;
        Ok(ObjectCursor {
            kind: kind.to_string(),
            id: id.to_string(),
        })
    }
}

/// An object listing: one namespace, optionally one kind, label requirements (ANDed), after a
/// cursor, at most `limit` rows, ordered by (kind, id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectQuery {
    pub namespace: String,
    pub kind: Option<String>,
    pub labels: Vec<LabelRequirement>,
    pub after: Option<ObjectCursor>,
    pub limit: usize,
}

impl ObjectQuery {
    pub fn new(namespace: impl Into<String>) -> Self {
        ObjectQuery {
            namespace: namespace.into(),
            kind: None,
            labels: Vec::new(),
            after: None,
            limit: LIST_PAGE_DEFAULT,
        }
    }

    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }

    pub fn label(mut self, req: LabelRequirement) -> Self {
        self.labels.push(req);
        self
    }

    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    pub fn validate(&self) -> Result<()> {
        validate::name("namespace", &self.namespace)?;
        if let Some(k) = &self.kind {
            validate::name("kind", k)?;
        }
        if self.labels.len() > LABEL_REQUIREMENTS_MAX {
            return Err(Error::invalid(
                "label selector",
                format!("{} requirements", self.labels.len()),
                format!("at most {LABEL_REQUIREMENTS_MAX} requirements"),
            ));
        }
        for r in &self.labels {
            r.validate()?;
        }
        if let Some(c) = &self.after {
            // A cursor built by hand is checked as `ObjectCursor::decode` checks one.
            let bad = |_| {
                Error::invalid(
                    "cursor",
                    c.encode(),
                    "is not a cursor returned by a listing",
                )
            };
            validate::name("kind", &c.kind).map_err(bad)?;
            validate::name("id", &c.id).map_err(bad)?;
            if self.kind.as_ref().is_some_and(|k| *k != c.kind) {
                return Err(Error::invalid(
                    "cursor",
                    c.encode(),
                    format!(
                        "is a position among objects of kind {:?}, not of this listing's kind",
                        c.kind
                    ),
                ));
            }
        }
        if self.limit == 0 || self.limit > LIST_PAGE_MAX {
            return Err(Error::invalid(
                "limit",
                self.limit.to_string(),
                format!("must be between 1 and {LIST_PAGE_MAX}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NUL characters are refused at the edge wherever PostgreSQL's text could not hold them:
    /// in tag values arriving as ops, label selector values and change-log id prefixes.
    #[test]
    fn nul_characters_are_refused_at_the_edge() {
        use crate::{Batch, ChangeFilter, Limits, ObjectKey, Op, Timestamp};
        let op = |value: &str| Batch {
            preconditions: Vec::new(),
            ops: vec![Op::TagSet {
                key: ObjectKey::new("default", "machine", "m1").unwrap(),
                name: "t".into(),
                value: value.into(),
            }],
            now: Timestamp(0),
        };
        let limits = Limits::default();
        assert!(op(r#""ok""#).validate(&limits).is_ok());
        assert!(op(r#""a\u0000b""#).validate(&limits).is_err());
        assert!(op(r#"{"k\u0000":1}"#).validate(&limits).is_err());
        let eq = LabelRequirement::Eq {
            key: "k".into(),
            value: "a\0b".into(),
        };
        assert!(eq.validate().is_err());
        let f = ChangeFilter {
            namespace: Some("default".into()),
            kind: Some("machine".into()),
            id_prefix: Some("m\0".into()),
        };
        assert!(f.validate().is_err());
    }

    #[test]
    fn selector_parsing() {
        let r = parse_label_selector("a=b, c!=d,e,!f").unwrap();
        assert_eq!(
            r,
            vec![
                LabelRequirement::Eq {
                    key: "a".into(),
                    value: "b".into()
                },
                LabelRequirement::NotEq {
                    key: "c".into(),
                    value: "d".into()
                },
                LabelRequirement::Exists { key: "e".into() },
                LabelRequirement::NotExists { key: "f".into() },
            ]
        );
        assert!(parse_label_selector("a=b,,c").is_err());
        assert!(parse_label_selector("a=").is_err());
        assert!(parse_label_selector("sp ace").is_err());
    }

    #[test]
    fn cursor_round_trip_and_garbage() {
        let c = ObjectCursor {
            kind: "machine".into(),
            id: "m-1".into(),
        };
        assert_eq!(ObjectCursor::decode(&c.encode()).unwrap(), c);
        assert!(ObjectCursor::decode("!!").is_err());
        assert!(ObjectCursor::decode("bm9uZXdsaW5l").is_err());
    }
}
