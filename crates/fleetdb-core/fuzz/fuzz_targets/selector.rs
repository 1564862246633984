//! Selector parsing never panics; whatever parses prints canonical text that parses back to the
//! same selector, evaluates, and compiles to SQL for both dialects without panicking.
#![no_main]

use std::collections::BTreeMap;

use fleetdb_core::selector::{Dialect, ObjectView, Selector};
use fleetdb_core::{Labels, Timestamp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(s) = Selector::parse(text) else {
        return;
    };
    let canonical = s.to_string();
    if canonical.len() <= fleetdb_core::selector::SELECTOR_BYTES_MAX {
        let back = Selector::parse(&canonical).expect("canonical text parses");
        assert_eq!(back, s, "{canonical}");
    }
    let labels = Labels::new();
    let mut tags = BTreeMap::new();
    for (i, t) in s.tags().into_iter().enumerate() {
        let v = match i % 3 {
            0 => serde_json::json!({"generation": 1, "a": {"b": "x"}}),
            1 => serde_json::json!(1.5),
            _ => serde_json::json!(null),
        };
        tags.insert(t, (v, Timestamp(i as i64 * 1_000_000)));
    }
    let view = ObjectView {
        namespace: "default",
        kind: "machine",
        id: "m1",
        labels: &labels,
        tags: &tags,
    };
    let _ = s.matches(&view, Timestamp(60_000_000));
    for dialect in [Dialect::Sqlite, Dialect::Postgres] {
        let mut params = Vec::new();
        let _ = s.tag_joins(dialect, &mut params);
        let _ = s.to_sql(dialect, Timestamp(0), &mut params);
    }
});
