#![cfg(feature = "postgres")]
//! PostgreSQL writes batches of object puts, tag sets and object deletes as one or two statements
//! (`fleetdb-postgres/src/fused.rs`); SQLite applies every op on its own (`apply_batch`). The same
//! random batches, on the same clock, must leave both with the same outcome, the same objects
//! and tags and the same change log (revision numbers aside: PostgreSQL's have gaps).

use std::sync::Arc;
use std::time::Duration;

use fleetdb::{ChangeFilter, Error, Labels, ObjectKey, ObjectQuery, OpenOptions, Revision, Store};
use fleetdb_conformance::START;
use serde_json::json;

/// A deterministic generator (xorshift64*), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Debug, Clone)]
enum Step {
    Put {
        key: ObjectKey,
        create: bool,
        labels: Labels,
    },
    Tag {
        key: ObjectKey,
        name: String,
        value: serde_json::Value,
    },
    Delete {
        key: ObjectKey,
    },
}

fn random_key(rng: &mut Rng) -> ObjectKey {
    let ns = if rng.below(40) == 0 {
        "nowhere"
    } else {
        "default"
    };
    let kind = ["machine", "switch"][rng.below(2)];
    ObjectKey::new(ns, kind, format!("o{}", rng.below(10))).unwrap()
}

fn random_value(rng: &mut Rng) -> serde_json::Value {
    [
        json!(1),
        json!("a"),
        json!({"g": 2}),
        json!([1, 2]),
        json!(null),
    ][rng.below(5)]
    .clone()
}

/// A batch: mostly groups of a put and tag sets of its object (the fused shapes), sometimes
/// tag sets only, sometimes anything (a tag before its put, a key twice).
fn random_batch(rng: &mut Rng) -> Vec<Step> {
    let mut steps = Vec::new();
    match rng.below(5) {
        4 => {
            for _ in 0..2 + rng.below(3) {
                steps.push(Step::Delete {
                    key: random_key(rng),
                });
            }
        }
        0 => {
            for _ in 0..2 + rng.below(4) {
                let key = random_key(rng);
                let name = ["a", "b", "c"][rng.below(3)].to_string();
                steps.push(Step::Tag {
                    key,
                    name,
                    value: random_value(rng),
                });
            }
        }
        _ => {
            for _ in 0..1 + rng.below(5) {
                let key = random_key(rng);
                let mut labels = Labels::new();
                for _ in 0..rng.below(3) {
                    let k = ["l", "m", "n"][rng.below(3)].to_string();
                    let v = ["", "x", "y"][rng.below(3)].to_string();
                    labels.insert(k, v);
                }
                steps.push(Step::Put {
                    key: key.clone(),
                    create: rng.below(3) == 0,
                    labels,
                });
                for name in ["a", "b", "c"] {
                    if rng.below(2) == 0 {
                        steps.push(Step::Tag {
                            key: key.clone(),
                            name: name.to_string(),
                            value: random_value(rng),
                        });
                    }
                }
            }
            if rng.below(8) == 0 {
                let i = rng.below(steps.len());
                let j = rng.below(steps.len());
                steps.swap(i, j);
            }
        }
    }
    steps
}

async fn apply(store: &Store, steps: &[Step]) -> Result<(), String> {
    let steps = steps.to_vec();
    store
        .txn(move |tx| {
            let steps = steps.clone();
            async move {
                for s in &steps {
                    match s {
                        Step::Put {
                            key,
                            create: true,
                            labels,
                        } => tx.object_create(key, labels.clone())?,
                        Step::Put { key, labels, .. } => tx.object_put(key, labels.clone())?,
                        Step::Tag { key, name, value } => tx.tag_set(key, name, value)?,
                        Step::Delete { key } => tx.object_delete(key)?,
                    }
                }
                Ok(())
            }
        })
        .await
        .map_err(|e| match e {
            Error::AlreadyExists { what } => format!("AlreadyExists {what}"),
            Error::NotFound { what } => format!("NotFound {what}"),
            other => format!("{other:?}"),
        })
}

type State = (Vec<String>, Vec<String>);

/// Every object and tag (with times), and the change log without revision numbers.
async fn state(store: &Store) -> State {
    let mut rows = Vec::new();
    let objects = store
        .object_list(&ObjectQuery::new("default").limit(1000))
        .await
        .unwrap();
    for o in objects.items {
        rows.push(format!(
            "{} {:?} {} {}",
            o.key, o.labels, o.created_at.0, o.updated_at.0
        ));
        for t in store.tag_list(&o.key).await.unwrap() {
            rows.push(format!(
                "  {} {} = {} at {}",
                o.key, t.name, t.value, t.updated_at.0
            ));
        }
    }
    let changes = store
        .changes(Revision(0), &ChangeFilter::default(), 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|c| {
            format!(
                "{}/{}/{} {:?} {:?} {} {:?} -> {:?} at {}",
                c.namespace, c.kind, c.id, c.entity, c.op, c.name, c.old_value, c.new_value, c.at.0
            )
        })
        .collect();
    (rows, changes)
}

async fn open(url: &str, clock: &fleetdb::ManualClock) -> Store {
    Store::open_with(
        url,
        OpenOptions {
            clock: Some(Arc::new(clock.clone())),
            background: false,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("opening {url}: {e}"))
}

#[tokio::test]
async fn bulk_batches_agree_with_the_general_path() {
    let base = std::env::var("FLEETDB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let (pg_url, schema) = fleetdb_postgres::testing::create_schema(&base)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let clock = fleetdb::ManualClock::new(START);
    let pg = open(&pg_url, &clock).await;
    let sqlite = open("sqlite::memory:", &clock).await;
    // FLEETDB_TEST_SEED replays or explores other sequences.
    let seed = std::env::var("FLEETDB_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_F1EE_7DB0_0001u64);
    let mut rng = Rng(seed | 1);
    let mut outcomes = [0usize; 2];
    for round in 0..200 {
        clock.advance(Duration::from_secs(1));
        let steps = random_batch(&mut rng);
        let (a, b) = (apply(&sqlite, &steps).await, apply(&pg, &steps).await);
        assert_eq!(a, b, "round {round}: {steps:?}");
        outcomes[usize::from(a.is_err())] += 1;
        if round % 10 == 9 {
            assert_eq!(
                state(&sqlite).await,
                state(&pg).await,
                "after round {round}"
            );
        }
    }
    assert_eq!(state(&sqlite).await, state(&pg).await);
    // Both outcomes were exercised.
    eprintln!(
        "seed {seed}: {} batches committed, {} refused",
        outcomes[0], outcomes[1]
    );
    assert!(outcomes[0] > 30 && outcomes[1] > 10, "{outcomes:?}");
    drop(pg);
    fleetdb_postgres::testing::drop_schema(&base, &schema)
        .await
        .unwrap();
}
