//! The README's example: `cargo run -p fleetdb --example quickstart`.
use fleetdb::{ObjectKey, ObjectQuery, Store};
use serde_json::json;

#[tokio::main]
async fn main() -> fleetdb::Result<()> {
    // The embedded default would be Store::open(""): ./fleetdb-data/fleetdb.sqlite.
    let store = Store::open("sqlite::memory:").await?;

    // An object with labels, and typed facts about it as tags.
    let m1 = ObjectKey::new("default", "machine", "m1")?;
    store
        .object_put(&m1, [("provider".into(), "equinix".into())].into())
        .await?;
    store
        .tag_set(&m1, "provided", &json!({"provider_id": "x1"}))
        .await?;

    // Several reads and writes, atomically. The closure may run more than once: no side effects.
    let generation = store
        .txn(|tx| {
            let m1 = m1.clone();
            async move {
                let next = match tx.tag_get(&m1, "os_install_request").await? {
                    Some(t) => t.value["generation"].as_i64().unwrap_or(0) + 1,
                    None => 1,
                };
                tx.tag_set(&m1, "os_install_request", &json!({ "generation": next }))?;
                Ok(next)
            }
        })
        .await?;

    let equinix = store
        .object_list(&ObjectQuery::new("default").kind("machine").label(
            fleetdb::LabelRequirement::Eq {
                key: "provider".into(),
                value: "equinix".into(),
            },
        ))
        .await?;
    let changes = store
        .changes(fleetdb::Revision(0), &Default::default(), 100)
        .await?;
    println!(
        "generation {generation}; {} equinix machine(s); {} changes, last at revision {}",
        equinix.items.len(),
        changes.len(),
        changes.last().map(|c| c.revision.0).unwrap_or(0)
    );
    Ok(())
}
