//! The selector parser: recursive descent over the text, scanning tokens in context (a name
//! after `kind =`, a label key inside `label(…)`, a duration after `now -`). Every error names
//! the byte position, what was expected there and what was found.

use std::collections::BTreeSet;

use super::{
    CmpOp, EqOp, Expr, Field, Literal, Operand, Pred, SelectorError, SELECTOR_DEPTH_MAX,
    SELECTOR_PREDICATES_MAX, SELECTOR_TAGS_MAX,
};
use crate::error::Error;
use crate::validate;

/// The largest duration offset, in milliseconds (so that it fits in i64 microseconds).
const DURATION_MS_MAX: u64 = (i64::MAX / 1000) as u64;

const PREDICATE_EXPECTED: &str =
    "a predicate (kind, namespace, label, has_label, has, tag, updated), \"not\" or \"(\"";
const CMP_EXPECTED: &str = "a comparison operator (=, !=, <, <=, >, >=)";

type PResult<T> = Result<T, SelectorError>;

/// Parse `text`, at most `bytes_max` long ([`super::SELECTOR_BYTES_MAX`] for a selector given by a user).
pub(super) fn parse(text: &str, bytes_max: usize) -> PResult<Expr> {
    if text.len() > bytes_max {
        return Err(SelectorError {
            position: bytes_max,
            expected: format!("a selector of at most {bytes_max} bytes"),
            found: format!("{} bytes", text.len()),
        });
    }
    let mut p = Parser {
        text,
        pos: 0,
        depth: 0,
        preds: 0,
        tags: BTreeSet::new(),
    };
    let e = p.expr()?;
    p.ws();
    if p.pos < text.len() {
        return Err(p.error(p.pos, "\"and\", \"or\" or end of input"));
    }
    Ok(e)
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
    depth: usize,
    preds: usize,
    tags: BTreeSet<&'a str>,
}

fn is_keyword_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

fn is_label_key_byte(b: u8) -> bool {
    is_name_byte(b) || b == b'/'
}

fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')
}

/// Bytes shown as "found" after a word: the run of characters that could belong to a name, a
/// number or a key.
fn is_word_byte(b: u8) -> bool {
    is_label_key_byte(b) || b == b'+'
}

/// The rule part of a validation error, for "expected …".
fn rule_of(e: Error) -> String {
    match e {
        Error::Invalid { rule, .. } => rule,
        other => other.to_string(),
    }
}

impl<'a> Parser<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek_byte(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek_byte(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// A description of what is at `pos`, for "found …".
    fn found(&self, pos: usize) -> String {
        let rest = &self.text[pos..];
        let Some(&first) = rest.as_bytes().first() else {
            return "end of input".to_string();
        };
        let shown: &str = if is_word_byte(first) {
            let n = rest.bytes().take_while(|&b| is_word_byte(b)).count();
            &rest[..n]
        } else if rest.starts_with("!=") || rest.starts_with("<=") || rest.starts_with(">=") {
            &rest[..2]
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            &rest[..c.len_utf8()]
        };
        if shown.chars().count() > 40 {
            let head: String = shown.chars().take(40).collect();
            format!("{head:?}…")
        } else {
            format!("{shown:?}")
        }
    }

    fn error(&self, pos: usize, expected: impl Into<String>) -> SelectorError {
        SelectorError {
            position: pos,
            expected: expected.into(),
            found: self.found(pos),
        }
    }

    /// After whitespace: the run of keyword characters at the cursor (not consumed).
    fn peek_word(&mut self) -> &'a str {
        self.ws();
        let rest = &self.text[self.pos..];
        let n = rest.bytes().take_while(|&b| is_keyword_byte(b)).count();
        &rest[..n]
    }

    /// Consume the keyword `w` if it is next.
    fn eat_word(&mut self, w: &str) -> bool {
        if self.peek_word() == w {
            self.pos += w.len();
            true
        } else {
            false
        }
    }

    fn expect_word(&mut self, w: &str) -> PResult<()> {
        if self.eat_word(w) {
            Ok(())
        } else {
            Err(self.error(self.pos, format!("{w:?}")))
        }
    }

    fn eat_byte(&mut self, b: u8) -> bool {
        self.ws();
        if self.peek_byte() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_byte(&mut self, b: u8) -> PResult<()> {
        if self.eat_byte(b) {
            Ok(())
        } else {
            Err(self.error(self.pos, format!("\"{}\"", b as char)))
        }
    }

    /// Scan the run of bytes satisfying `ok` (after whitespace); returns (start, text).
    fn scan(&mut self, ok: fn(u8) -> bool) -> (usize, &'a str) {
        self.ws();
        let start = self.pos;
        let n = self.text[start..].bytes().take_while(|&b| ok(b)).count();
        self.pos += n;
        (start, &self.text[start..start + n])
    }

    // ---- grammar ----

    fn enter(&mut self, pos: usize) -> PResult<()> {
        if self.depth >= SELECTOR_DEPTH_MAX {
            return Err(self.error(
                pos,
                format!("at most {SELECTOR_DEPTH_MAX} levels of nested parentheses and \"not\""),
            ));
        }
        self.depth += 1;
        Ok(())
    }

    /// expr := and_ { "or" and_ }
    fn expr(&mut self) -> PResult<Expr> {
        let first = self.and()?;
        if self.peek_word() != "or" {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.eat_word("or") {
            items.push(self.and()?);
        }
        Ok(Expr::Or(items))
    }

    /// and_ := unary { "and" unary }
    fn and(&mut self) -> PResult<Expr> {
        let first = self.unary()?;
        if self.peek_word() != "and" {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.eat_word("and") {
            items.push(self.unary()?);
        }
        Ok(Expr::And(items))
    }

    /// unary := "not" unary | "(" expr ")" | pred
    fn unary(&mut self) -> PResult<Expr> {
        self.ws();
        let start = self.pos;
        if self.eat_word("not") {
            self.enter(start)?;
            let inner = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(inner)));
        }
        if self.peek_byte() == Some(b'(') {
            self.enter(start)?;
            self.pos += 1;
            let inner = self.expr()?;
            self.ws();
            if !self.eat_byte(b')') {
                return Err(self.error(self.pos, "\"and\", \"or\" or \")\""));
            }
            self.depth -= 1;
            return Ok(inner);
        }
        self.pred().map(Expr::Pred)
    }

    fn pred(&mut self) -> PResult<Pred> {
        let word = self.peek_word();
        let start = self.pos;
        let known = matches!(
            word,
            "kind" | "namespace" | "label" | "has_label" | "has" | "tag" | "updated"
        );
        if !known {
            return Err(self.error(start, PREDICATE_EXPECTED));
        }
        if self.preds >= SELECTOR_PREDICATES_MAX {
            return Err(self.error(
                start,
                format!("at most {SELECTOR_PREDICATES_MAX} predicates"),
            ));
        }
        self.preds += 1;
        self.pos += word.len();
        Ok(match word {
            "kind" => {
                let op = self.eq_op()?;
                let name = self.name("kind")?;
                Pred::Kind { op, name }
            }
            "namespace" => {
                let op = self.eq_op()?;
                let name = self.name("namespace")?;
                Pred::Namespace { op, name }
            }
            "label" => {
                let key = self.paren_label_key()?;
                if self.eat_word("not") {
                    self.expect_word("in")?;
                    let values = self.string_list()?;
                    Pred::LabelIn {
                        key,
                        negated: true,
                        values,
                    }
                } else if self.eat_word("in") {
                    let values = self.string_list()?;
                    Pred::LabelIn {
                        key,
                        negated: false,
                        values,
                    }
                } else {
                    let op = self.try_eq_op().ok_or_else(|| {
                        self.error(self.pos, "\"=\", \"!=\", \"in\" or \"not in\"")
                    })?;
                    let value = self.label_value()?;
                    Pred::Label { key, op, value }
                }
            }
            "has_label" => Pred::HasLabel {
                key: self.paren_label_key()?,
            },
            "has" => {
                self.expect_byte(b'(')?;
                let tag = self.tag_name()?;
                self.expect_byte(b')')?;
                Pred::Has { tag }
            }
            "tag" => {
                let left = self.field_after_keyword()?;
                let op = self.cmp_op()?;
                let right = self.operand()?;
                Pred::Compare { left, op, right }
            }
            "updated" => {
                self.expect_byte(b'(')?;
                let tag = self.tag_name()?;
                self.expect_byte(b')')?;
                let op = self.cmp_op()?;
                self.expect_word("now")?;
                let offset_ms = if self.eat_byte(b'-') {
                    -self.duration()?
                } else if self.eat_byte(b'+') {
                    self.duration()?
                } else {
                    0
                };
                Pred::Updated { tag, op, offset_ms }
            }
            _ => unreachable!("checked above"),
        })
    }

    fn try_eq_op(&mut self) -> Option<EqOp> {
        self.ws();
        let rest = &self.text[self.pos..];
        if rest.starts_with("!=") {
            self.pos += 2;
            Some(EqOp::Ne)
        } else if rest.starts_with('=') {
            self.pos += 1;
            Some(EqOp::Eq)
        } else {
            None
        }
    }

    fn eq_op(&mut self) -> PResult<EqOp> {
        self.try_eq_op()
            .ok_or_else(|| self.error(self.pos, "\"=\" or \"!=\""))
    }

    fn cmp_op(&mut self) -> PResult<CmpOp> {
        self.ws();
        let rest = &self.text[self.pos..];
        let (op, n) = if rest.starts_with("!=") {
            (CmpOp::Ne, 2)
        } else if rest.starts_with("<=") {
            (CmpOp::Le, 2)
        } else if rest.starts_with(">=") {
            (CmpOp::Ge, 2)
        } else if rest.starts_with('=') {
            (CmpOp::Eq, 1)
        } else if rest.starts_with('<') {
            (CmpOp::Lt, 1)
        } else if rest.starts_with('>') {
            (CmpOp::Gt, 1)
        } else {
            return Err(self.error(self.pos, CMP_EXPECTED));
        };
        self.pos += n;
        Ok(op)
    }

    /// A NAME (kind, namespace, tag) following the name rule.
    fn name(&mut self, what: &str) -> PResult<String> {
        let (start, s) = self.scan(is_name_byte);
        if s.is_empty() {
            return Err(self.error(start, format!("a {what}")));
        }
        validate::name(what, s)
            .map_err(|e| self.error(start, format!("a {what} that {}", rule_of(e))))?;
        Ok(s.to_string())
    }

    /// A tag name; counts distinct tags against [`SELECTOR_TAGS_MAX`].
    fn tag_name(&mut self) -> PResult<String> {
        self.ws();
        let start = self.pos;
        let name = self.name("tag name")?;
        let name_ref = &self.text[start..start + name.len()];
        if !self.tags.contains(name_ref) {
            if self.tags.len() >= SELECTOR_TAGS_MAX {
                return Err(self.error(
                    start,
                    format!("at most {SELECTOR_TAGS_MAX} distinct tags (this is one more)"),
                ));
            }
            self.tags.insert(name_ref);
        }
        Ok(name)
    }

    /// `( LABELKEY )`
    fn paren_label_key(&mut self) -> PResult<String> {
        self.expect_byte(b'(')?;
        let (start, s) = self.scan(is_label_key_byte);
        if s.is_empty() {
            return Err(self.error(start, "a label key"));
        }
        validate::label_key(s)
            .map_err(|e| self.error(start, format!("a label key that {}", rule_of(e))))?;
        self.expect_byte(b')')?;
        Ok(s.to_string())
    }

    /// A label value: a non-empty string.
    fn label_value(&mut self) -> PResult<String> {
        self.ws();
        let start = self.pos;
        if !matches!(self.peek_byte(), Some(b'"' | b'\'')) {
            return Err(self.error(start, "a label value (a quoted string)"));
        }
        let s = self.string()?;
        if s.is_empty() {
            return Err(SelectorError {
                position: start,
                expected: "a non-empty label value (labels are never empty; use has_label(KEY) to test presence)".to_string(),
                found: "\"\"".to_string(),
            });
        }
        Ok(s)
    }

    /// `( STRING { , STRING } )`
    fn string_list(&mut self) -> PResult<Vec<String>> {
        self.expect_byte(b'(')?;
        let mut out = vec![self.label_value()?];
        loop {
            if self.eat_byte(b',') {
                out.push(self.label_value()?);
            } else if self.eat_byte(b')') {
                return Ok(out);
            } else {
                return Err(self.error(self.pos, "\",\" or \")\""));
            }
        }
    }

    /// A quoted string at the cursor: `"…"` with `\"`, `\\`, `\n` escapes, or `'…'` with
    /// `\'`, `\\`, `\n` escapes.
    fn string(&mut self) -> PResult<String> {
        let quote = self.bytes()[self.pos];
        self.pos += 1;
        let mut out = String::new();
        loop {
            let rest = &self.text[self.pos..];
            let Some(c) = rest.chars().next() else {
                return Err(self.error(
                    self.pos,
                    format!("a closing {:?}", (quote as char).to_string()),
                ));
            };
            if c as u32 == u32::from(quote) {
                self.pos += 1;
                return Ok(out);
            }
            match c {
                '\\' => {
                    let esc = rest[1..].chars().next();
                    let ch = match esc {
                        Some('\\') => '\\',
                        Some('n') => '\n',
                        Some(q) if q as u32 == u32::from(quote) => q,
                        _ => {
                            let q = quote as char;
                            return Err(
                                self.error(self.pos, format!("an escape (\\{q}, \\\\ or \\n)"))
                            );
                        }
                    };
                    out.push(ch);
                    self.pos += 2;
                }
                '\0' => return Err(self.error(self.pos, "a character other than NUL")),
                c => {
                    out.push(c);
                    self.pos += c.len_utf8();
                }
            }
        }
    }

    /// After the keyword `tag`: `( TAG ) { . PATHSEG }`.
    fn field_after_keyword(&mut self) -> PResult<Field> {
        self.expect_byte(b'(')?;
        let tag = self.tag_name()?;
        self.expect_byte(b')')?;
        let mut path = Vec::new();
        while self.eat_byte(b'.') {
            let (start, seg) = self.scan(is_path_byte);
            if seg.is_empty() {
                return Err(self.error(start, "a path segment ([A-Za-z0-9_-]+)"));
            }
            path.push(seg.to_string());
        }
        Ok(Field { tag, path })
    }

    /// The right side of a comparison: a literal or a field.
    fn operand(&mut self) -> PResult<Operand> {
        self.ws();
        let start = self.pos;
        match self.peek_byte() {
            Some(b'"' | b'\'') => return Ok(Operand::Literal(Literal::String(self.string()?))),
            Some(b'-' | b'0'..=b'9') => return Ok(Operand::Literal(self.number()?)),
            _ => {}
        }
        let lit = match self.peek_word() {
            "true" => Literal::Bool(true),
            "false" => Literal::Bool(false),
            "null" => Literal::Null,
            "tag" => {
                self.pos += 3;
                return Ok(Operand::Field(self.field_after_keyword()?));
            }
            _ => {
                return Err(self.error(
                    start,
                    "a value (a number, a string, true, false or null) or tag(…)",
                ))
            }
        };
        self.pos += self.peek_word().len();
        Ok(Operand::Literal(lit))
    }

    /// A JSON number.
    fn number(&mut self) -> PResult<Literal> {
        let (start, s) =
            self.scan(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-'));
        let bad = |p: &Self, what: &str| SelectorError {
            position: start,
            expected: what.to_string(),
            found: p.found(start),
        };
        if !is_json_number(s) {
            return Err(bad(self, "a number (JSON syntax, e.g. 3, -1, 2.5, 1e6)"));
        }
        let integral = !s.contains(['.', 'e', 'E']);
        let n = if let (true, Ok(u)) = (integral, s.parse::<u64>()) {
            serde_json::Number::from(u)
        } else if let (true, Ok(i)) = (integral, s.parse::<i64>()) {
            serde_json::Number::from(i)
        } else {
            let f: f64 = s
                .parse()
                .map_err(|_| bad(self, "a number (JSON syntax, e.g. 3, -1, 2.5, 1e6)"))?;
            serde_json::Number::from_f64(f)
                .ok_or_else(|| bad(self, "a number within the range of a 64-bit float"))?
        };
        Ok(Literal::Number(n))
    }

    /// A duration after `now -`/`now +`: one or more `<digits><unit>`, units ms, s, m, h, d.
    /// Returns milliseconds.
    fn duration(&mut self) -> PResult<i64> {
        self.ws();
        let start = self.pos;
        let mut total: u64 = 0;
        let too_big = |p: &Self| SelectorError {
            position: start,
            expected: format!("a duration of at most {DURATION_MS_MAX}ms"),
            found: p.found(start),
        };
        loop {
            let digits_at = self.pos;
            let n = self.text[digits_at..]
                .bytes()
                .take_while(u8::is_ascii_digit)
                .count();
            if n == 0 {
                if digits_at == start {
                    return Err(
                        self.error(digits_at, "a duration (e.g. 30m, 10s, 1h30m, 250ms, 2d)")
                    );
                }
                break;
            }
            let value: u64 = self.text[digits_at..digits_at + n]
                .parse()
                .map_err(|_| too_big(self))?;
            self.pos += n;
            let unit_at = self.pos;
            let u = self.text[unit_at..]
                .bytes()
                .take_while(u8::is_ascii_alphabetic)
                .count();
            let size: u64 = match &self.text[unit_at..unit_at + u] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(self.error(unit_at, "a duration unit (ms, s, m, h or d)")),
            };
            self.pos += u;
            total = value
                .checked_mul(size)
                .and_then(|v| total.checked_add(v))
                .filter(|&v| v <= DURATION_MS_MAX)
                .ok_or_else(|| too_big(self))?;
        }
        if self.peek_byte().is_some_and(is_word_byte) {
            return Err(self.error(self.pos, "a duration unit (ms, s, m, h or d)"));
        }
        Ok(total as i64)
    }
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let st = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - st
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}
