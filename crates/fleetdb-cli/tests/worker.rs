//! `fleetdb worker` with real processes: a worker killed with SIGKILL while it holds a claim
//! loses it at its session's deadline; another worker then gets the object, and the history shows
//! the `Expired` row. Real processes run on real time, so this test waits (about 2 s) for a TTL.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn fleetdb(url: &str, dir: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fleetdb"));
    c.current_dir(dir)
        .env("FLEETDB_DB", url)
        .env_remove("FLEETDB_NAMESPACE");
    c
}

fn run(url: &str, dir: &std::path::Path, args: &[&str]) -> Output {
    let out = fleetdb(url, dir).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "fleetdb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(url: &str, dir: &std::path::Path, args: &[&str]) -> Value {
    let mut full = vec!["-o", "json"];
    full.extend_from_slice(args);
    serde_json::from_slice(&run(url, dir, &full).stdout).unwrap()
}

fn events(url: &str, dir: &std::path::Path) -> Vec<(String, String)> {
    let h = json(url, dir, &["history", "machine", "m1"]);
    let mut v: Vec<(String, String)> = h["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["component"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.reverse();
    v
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn crash_and_take_over(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(url, d, &["process", "define", "Provision"]);
    run(url, d, &["object", "put", "machine", "m1"]);
    run(url, d, &["tag", "set", "machine", "m1", "ready", "true"]);

    // Worker A claims m1 and runs a long command; we kill A itself with SIGKILL.
    let a = fleetdb(url, d)
        .args([
            "worker",
            "--component",
            "crashy",
            "--process",
            "Provision",
            "--selector",
            "has(ready)",
            "--ttl",
            "1s",
            "--",
            "sleep",
            "3",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut a = Killed(a);
    wait_for("worker A to claim m1", Duration::from_secs(20), || {
        json(url, d, &["work", "ls"]).as_array().unwrap().len() == 1
    });
    let held = json(url, d, &["work", "ls"]);
    let a_token = held[0]["token"].as_i64().unwrap();
    a.0.kill().unwrap(); // SIGKILL: no cleanup, no close, no cancel
    a.0.wait().unwrap();
    let killed_at = Instant::now();

    // Worker B, started right away, cannot take it before A's deadline; it gets it after the TTL.
    let b = fleetdb(url, d)
        .args([
            "worker", "--component", "rescuer", "--process", "Provision", "--selector", "has(ready)", "--ttl", "5s", "--",
            "sh", "-c", "test \"$FLEETDB_ID\" = m1 && test \"$FLEETDB_KIND\" = machine && test -n \"$FLEETDB_TOKEN\"",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut b = Killed(b);
    wait_for("worker B to finish m1", Duration::from_secs(30), || {
        events(url, d)
            .iter()
            .any(|(e, c)| e == "Finished" && c == "rescuer")
    });
    assert!(
        killed_at.elapsed() >= Duration::from_millis(500),
        "taken over before A's deadline could pass"
    );
    let _ = b.0.kill();
    let _ = b.0.wait();
    // The selector still matches after a finish, so B may have gone round again: the story
    // is in the first four events.
    let ev: Vec<(String, String)> = events(url, d).into_iter().take(4).collect();
    assert_eq!(
        ev,
        vec![
            ("Started".to_string(), "crashy".to_string()),
            ("Expired".to_string(), "crashy".to_string()),
            ("Started".to_string(), "rescuer".to_string()),
            ("Finished".to_string(), "rescuer".to_string()),
        ]
    );
    let h = json(url, d, &["history", "machine", "m1"]);
    let tokens: Vec<i64> = h["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["token"].as_i64().unwrap())
        .collect();
    assert!(
        tokens[0] > a_token,
        "the new claim has a newer fencing token"
    );
}

#[test]
fn killed_worker_loses_its_claim_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/db.sqlite", dir.path().display());
    crash_and_take_over(&url);
}

#[test]
fn killed_worker_loses_its_claim_postgres() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let base = fleetdb_postgres::testing::test_url();
    let (url, schema) = rt
        .block_on(fleetdb_postgres::testing::create_schema(&base))
        .unwrap_or_else(|e| panic!("{e}"));
    crash_and_take_over(&url);
    rt.block_on(fleetdb_postgres::testing::drop_schema(&base, &schema))
        .unwrap();
}

#[test]
fn worker_failure_records_the_cause_and_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let url = format!("sqlite://{}/db.sqlite", d.display());
    run(&url, d, &["process", "define", "Install"]);
    run(&url, d, &["object", "put", "machine", "m1"]);
    run(
        &url,
        d,
        &[
            "worker",
            "--component",
            "w",
            "--process",
            "Install",
            "--selector",
            "kind = machine",
            "--once",
            "--backoff",
            "60s,10m,2",
            "--",
            "sh",
            "-c",
            "echo 'disk not found' >&2; exit 3",
        ],
    );
    let h = json(&url, d, &["history", "machine", "m1"]);
    let last = &h["items"][0];
    assert_eq!(last["event"], "Failed");
    assert!(
        last["cause"].as_str().unwrap().contains("disk not found"),
        "{last}"
    );
    let b = json(&url, d, &["backoff", "ls"]);
    assert_eq!(b.as_array().unwrap().len(), 1);
    assert_eq!(b[0]["last_interval_s"], 60);
    // In backoff: a second --once run claims nothing.
    run(
        &url,
        d,
        &[
            "worker",
            "--component",
            "w",
            "--process",
            "Install",
            "--selector",
            "kind = machine",
            "--once",
            "--",
            "true",
        ],
    );
    assert_eq!(
        json(&url, d, &["history", "machine", "m1"])["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    run(&url, d, &["backoff", "clear", "machine", "m1", "Install"]);
    run(
        &url,
        d,
        &[
            "worker",
            "--component",
            "w",
            "--process",
            "Install",
            "--selector",
            "kind = machine",
            "--once",
            "--",
            "true",
        ],
    );
    assert_eq!(
        json(&url, d, &["history", "machine", "m1"])["items"][0]["event"],
        "Finished"
    );
    // Operator views.
    assert_eq!(
        json(&url, d, &["select", "--count", "kind = machine"])["count"],
        1
    );
    assert_eq!(
        json(&url, d, &["select", "kind = machine"])["items"][0]["id"],
        "m1"
    );
    let err = fleetdb(&url, d)
        .args(["select", "kind = "])
        .output()
        .unwrap();
    assert_eq!(err.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&err.stderr).contains("selector"));
    assert_eq!(json(&url, d, &["process", "ls"])[0]["name"], "Install");
    assert!(
        json(&url, d, &["session", "ls"])
            .as_array()
            .unwrap()
            .is_empty(),
        "workers close their sessions"
    );
    let h = json(
        &url,
        d,
        &["history", "--process", "Install", "--limit", "2"],
    );
    assert_eq!(h["items"].as_array().unwrap().len(), 2);
    assert!(h["next"].is_string());
}
