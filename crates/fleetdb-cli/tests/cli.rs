//! The CLI end to end: the real `fleetdb` binary, on the embedded default and on PostgreSQL.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

struct Db {
    url: String,
    dir: tempfile::TempDir,
}

fn fleetdb(db: &Db, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetdb"));
    cmd.current_dir(db.dir.path())
        .env_remove("FLEETDB_NAMESPACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if db.url.is_empty() {
        cmd.env_remove("FLEETDB_DB");
    } else {
        cmd.env("FLEETDB_DB", &db.url);
    }
    let mut child = cmd.args(args).spawn().expect("run fleetdb");
    let mut pipe = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        // A command may stop reading early (input over a limit): the rest is not wanted.
        if let Err(e) = pipe.write_all(s.as_bytes()) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn ok_json(db: &Db, args: &[&str]) -> Value {
    let mut full = vec!["-o", "json"];
    full.extend_from_slice(args);
    let out = fleetdb(db, &full, None);
    assert!(
        out.status.success(),
        "fleetdb {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Run a command that must fail: returns (exit code, stderr).
fn fails(db: &Db, args: &[&str], stdin: Option<&str>) -> (i32, String) {
    let out = fleetdb(db, args, stdin);
    assert!(!out.status.success(), "fleetdb {args:?} should fail");
    assert!(out.stdout.is_empty(), "nothing on stdout when failing");
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn revision(db: &Db) -> i64 {
    let changes = ok_json(db, &["changes", "--all-namespaces", "--limit", "10000"]);
    changes
        .as_array()
        .unwrap()
        .last()
        .map(|c| c["revision"].as_i64().unwrap())
        .unwrap_or(0)
}

fn round_trip(db: &Db) {
    let o = ok_json(
        db,
        &[
            "object",
            "put",
            "machine",
            "m1",
            "--label",
            "provider=equinix",
            "--label",
            "rack=r1",
        ],
    );
    assert_eq!(o["labels"]["provider"], "equinix");
    assert_eq!(o["changed"], true);
    let t = ok_json(
        db,
        &[
            "tag",
            "set",
            "machine",
            "m1",
            "provided",
            r#"{"provider_id":"x1"}"#,
        ],
    );
    assert_eq!(t["value"]["provider_id"], "x1");
    // From stdin, both implicit and with `-`.
    let out = fleetdb(
        db,
        &["tag", "set", "machine", "m1", "agent_started"],
        Some(r#"{"at": 1}"#),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = fleetdb(
        db,
        &["tag", "set", "machine", "m1", "hw", "-"],
        Some("[1, 2, 3]\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let got = ok_json(db, &["object", "get", "machine", "m1"]);
    assert_eq!(
        got["labels"],
        serde_json::json!({"provider": "equinix", "rack": "r1"})
    );
    assert_eq!(got["namespace"], "default");
    assert!(got["created_at"].as_str().unwrap().ends_with('Z'));
    let tags = ok_json(db, &["tag", "ls", "machine", "m1"]);
    let names: Vec<&str> = tags
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["agent_started", "hw", "provided"]);
    assert_eq!(
        ok_json(db, &["tag", "get", "machine", "m1", "hw"])["value"],
        serde_json::json!([1, 2, 3])
    );

    // Identical value: unchanged, same revision.
    let again = ok_json(
        db,
        &[
            "tag",
            "set",
            "machine",
            "m1",
            "provided",
            r#"{ "provider_id" : "x1" }"#,
        ],
    );
    assert_eq!(again["changed"], false);
    assert_eq!(again["revision"], t["revision"]);

    // Label patch: empty value deletes.
    let o2 = ok_json(db, &["object", "put", "machine", "m1", "--label", "rack="]);
    assert_eq!(o2["labels"], serde_json::json!({"provider": "equinix"}));

    // Listing with selectors and pagination.
    for i in 2..=5 {
        ok_json(
            db,
            &[
                "object",
                "put",
                "machine",
                &format!("m{i}"),
                "--label",
                "provider=ovh",
            ],
        );
    }
    let page = ok_json(
        db,
        &[
            "object",
            "ls",
            "machine",
            "--selector",
            "provider=ovh",
            "--limit",
            "3",
        ],
    );
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    let next = page["next"].as_str().unwrap().to_string();
    let page2 = ok_json(
        db,
        &[
            "object",
            "ls",
            "machine",
            "--selector",
            "provider=ovh",
            "--limit",
            "3",
            "--cursor",
            &next,
        ],
    );
    assert_eq!(page2["items"].as_array().unwrap().len(), 1);
    assert!(page2["next"].is_null());
    let all = ok_json(db, &["object", "ls", "--all", "--limit", "2"]);
    assert_eq!(all["items"].as_array().unwrap().len(), 5);

    // Namespaces.
    ok_json(db, &["ns", "create", "lab", "--label", "team=infra"]);
    ok_json(db, &["-n", "lab", "object", "put", "switch", "s1"]);
    let (code, err) = fails(db, &["ns", "rm", "lab"], None);
    assert_eq!(code, 4);
    assert!(
        err.contains("namespace \"lab\" is not empty: it still holds 1 object(s): 1 switch"),
        "{err}"
    );
    ok_json(db, &["-n", "lab", "object", "rm", "switch", "s1"]);
    ok_json(db, &["ns", "rm", "lab"]);
    let nss = ok_json(db, &["ns", "ls"]);
    assert_eq!(nss.as_array().unwrap().len(), 1);

    // Table output works too.
    let out = fleetdb(db, &["object", "ls"], None);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("KIND"));

    // Deleting the object deletes its tags.
    ok_json(db, &["object", "rm", "machine", "m1"]);
    let (code, err) = fails(db, &["tag", "get", "machine", "m1", "provided"], None);
    assert_eq!(code, 3);
    assert!(err.contains("object default/machine/m1 not found"), "{err}");
}

fn bad_input_changes_nothing(db: &Db) {
    ok_json(db, &["object", "put", "machine", "keep"]);
    let before = revision(db);
    let big = format!("k={}", "v".repeat(5000));
    let huge_stdin = format!("\"{}\"", "x".repeat(5 << 20));
    let cases: Vec<(Vec<&str>, Option<&str>, i32, &str)> = vec![
        (
            vec!["tag", "set", "machine", "keep", "big"],
            Some(huge_stdin.as_str()),
            2,
            // Read up to one byte over the limit, so its size is not known: not "4194305 bytes".
            "tag \"big\" value (stdin) is more than 4194304 bytes; the maximum is 4194304",
        ),
        (
            vec!["object", "put", "machine", "bad id"],
            None,
            2,
            "invalid id \"bad id\": must match",
        ),
        (
            vec!["object", "put", "ma/chine", "x"],
            None,
            2,
            "invalid kind \"ma/chine\"",
        ),
        (
            vec!["-n", "no such", "object", "ls"],
            None,
            2,
            "invalid namespace \"no such\"",
        ),
        (
            vec!["object", "put", "machine", "keep", "--label", &big],
            None,
            2,
            "is 5001 bytes; the maximum is 4096",
        ),
        (
            vec!["object", "put", "machine", "keep", "--label", "novalue"],
            None,
            2,
            "must be KEY=VALUE",
        ),
        (
            vec![
                "object",
                "put",
                "machine",
                "keep",
                "--label",
                "fleetdb.io/x=1",
            ],
            None,
            2,
            "reserved for the system",
        ),
        (
            vec!["tag", "set", "machine", "keep", "t", "{nope"],
            None,
            2,
            "is not valid JSON",
        ),
        (
            vec!["tag", "set", "machine", "keep", "t"],
            Some("not json"),
            2,
            "is not valid JSON",
        ),
        (
            vec!["tag", "set", "machine", "ghost", "t", "1"],
            None,
            3,
            "object default/machine/ghost not found",
        ),
        (
            vec!["object", "get", "machine", "ghost"],
            None,
            3,
            "not found",
        ),
        (
            vec!["object", "rm", "machine", "ghost"],
            None,
            3,
            "not found",
        ),
        (
            vec!["-n", "nowhere", "object", "put", "machine", "m"],
            None,
            3,
            "namespace \"nowhere\" not found",
        ),
        (
            vec!["object", "ls", "--limit", "0"],
            None,
            2,
            "invalid value '0' for '--limit <LIMIT>': must be a whole number from 1 to 1000",
        ),
        (
            vec!["object", "ls", "--cursor", "zzz"],
            None,
            2,
            "invalid cursor",
        ),
        (
            vec!["object", "ls", "--selector", "a=,b"],
            None,
            2,
            "label selector",
        ),
        // One key given two values: which one was meant is not for the command to guess (the
        // last one was written).
        (
            vec![
                "object", "put", "machine", "keep", "--label", "a=1", "--label", "a=2",
            ],
            None,
            2,
            "invalid --label \"a=2\": the key \"a\" is given twice",
        ),
        // The flag is named (it said `invalid limit "100000"`, after the explain's reads).
        (
            vec![
                "work",
                "explain",
                "machine",
                "keep",
                "--process",
                "P",
                "--history",
                "100000",
            ],
            None,
            2,
            "invalid --history \"100000\"",
        ),
    ];
    for (args, stdin, code, needle) in cases {
        let (got, err) = fails(db, &args, stdin);
        assert_eq!(got, code, "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} should contain {needle:?}"
        );
        assert!(err.starts_with("error: "), "{err}");
    }
    // JSON errors are JSON.
    let (_, err) = fails(
        db,
        &["-o", "json", "object", "get", "machine", "ghost"],
        None,
    );
    let v: Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    assert_eq!(revision(db), before, "bad input wrote something");
}

/// `object import`: JSON lines in transactions of `--batch`; bad input writes nothing and names
/// its line; a refused transaction names its lines and keeps the ones before it.
fn import(db: &Db) {
    let lines = |from: usize, to: usize| -> String {
        (from..to)
            .map(|i| {
                format!(
                    "{{\"kind\": \"machine\", \"id\": \"m{i:04}\", \"labels\": {{\"rack\": \"r{}\"}}, \"tags\": {{\"provided\": {{\"at\": {i}}}}}}}\n\n",
                    i % 3
                )
            })
            .collect()
    };
    let count = |db: &Db| {
        ok_json(
            db,
            &["select", "--count", "kind = machine and has(provided)"],
        )
    };
    let out = fleetdb(
        db,
        &["-o", "json", "object", "import", "--batch", "40"],
        Some(&lines(0, 100)),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["objects"].as_u64(), v["transactions"].as_u64()),
        (Some(100), Some(3))
    );
    assert_eq!(count(db)["count"], 100);
    let m7 = ok_json(db, &["object", "get", "machine", "m0007"]);
    assert_eq!(m7["labels"]["rack"], "r1");
    assert_eq!(
        ok_json(db, &["tag", "get", "machine", "m0007", "provided"])["value"]["at"],
        7
    );

    // Bad input anywhere: nothing is written, the line is named.
    let before = revision(db);
    let bad = format!(
        "{}{{\"kind\": \"machine\", \"id\": \"bad id!\"}}\n",
        lines(100, 110)
    );
    let (code, err) = fails(db, &["object", "import"], Some(&bad));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("line 21"), "{err}");
    // More labels than an object may hold (256), after lines that small transactions would have
    // committed first: refused up front too.
    let many: Vec<String> = (0..257).map(|i| format!("\"l{i}\": \"v\"")).collect();
    let bad = format!(
        "{}{{\"kind\": \"machine\", \"id\": \"m0110\", \"labels\": {{{}}}}}\n",
        lines(100, 110),
        many.join(", ")
    );
    let (code, err) = fails(
        db,
        &["object", "import", "--batch", "2", "--jobs", "1"],
        Some(&bad),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("line 21") && err.contains("at most 256 labels"),
        "{err}"
    );
    assert_eq!(revision(db), before, "the lines before it were not written");
    for bad in [
        "{\"kind\": \"machine\"}\n",
        "{\"kind\": \"machine\", \"id\": \"a\", \"tagz\": {}}\n",
        "{\"kind\": \"machine\", \"id\": \"a\", \"tags\": {\"bad name!\": 1}}\n",
        "{\"kind\": \"machine\", \"id\": \"a\"}\n{\"kind\": \"machine\", \"id\": \"a\"}\n",
        "not json\n",
    ] {
        let (code, err) = fails(db, &["object", "import"], Some(bad));
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("line "), "{bad}: {err}");
    }
    let (code, _) = fails(
        db,
        &["object", "import", "--batch", "0"],
        Some(&lines(0, 1)),
    );
    assert_eq!(code, 2);
    assert_eq!(revision(db), before, "bad input wrote nothing");

    // --create: the transaction holding an existing object fails whole; those before it stay.
    let mixed = format!("{}{}", lines(200, 240), lines(95, 100));
    let (code, err) = fails(
        db,
        &["object", "import", "--create", "--batch", "40"],
        Some(&mixed),
    );
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("lines 81–89") && err.contains("40 objects"),
        "{err}"
    );
    assert_eq!(count(db)["count"], 140);

    // One at a time (--jobs 1): no transaction starts after a refused one, and the report names
    // the lines written and the lines not attempted.
    let three =
        |a: usize, b: usize| format!("{}{}{}", lines(a, a + 40), lines(95, 100), lines(b, b + 40));
    let (code, err) = fails(
        db,
        &[
            "object", "import", "--create", "--batch", "40", "--jobs", "1",
        ],
        Some(&three(300, 400)),
    );
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("lines 81–159 failed")
            && err.contains("40 objects were imported (lines 1–79)")
            && err.contains("lines 161–169 were not attempted"),
        "{err}"
    );
    assert_eq!(count(db)["count"], 180);
    // Several in flight (the default): the report still says exactly what was written.
    let (code, err) = fails(
        db,
        &["object", "import", "--create", "--batch", "40"],
        Some(&three(500, 600)),
    );
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("lines 81–159 failed"), "{err}");
    let imported: u64 = err
        .split(" objects were imported")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert_eq!(count(db)["count"], 180 + imported, "{err}");
    let (code, _) = fails(db, &["object", "import", "--jobs", "0"], Some(&lines(0, 1)));
    assert_eq!(code, 2);
    // Without --create the same input updates the existing objects.
    let before = count(db)["count"].as_u64().unwrap();
    let out = fleetdb(db, &["object", "import"], Some(&mixed));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count(db)["count"], before);
}

fn sqlite_db() -> Db {
    Db {
        url: String::new(),
        dir: tempfile::tempdir().unwrap(),
    }
}

#[test]
fn embedded_default_round_trip() {
    let db = sqlite_db();
    round_trip(&db);
    assert!(
        db.dir.path().join("fleetdb-data/fleetdb.sqlite").exists(),
        "the embedded default location"
    );
}

#[test]
fn embedded_default_bad_input() {
    bad_input_changes_nothing(&sqlite_db());
}

#[test]
fn embedded_default_import() {
    import(&sqlite_db());
}

/// `changes` without `--after` lists what the change log holds: after a compaction it starts at
/// the compaction point instead of failing `compacted` over a position the user never gave. An
/// explicit `--after` before that point is still refused (never a silent gap).
#[test]
fn changes_without_after_start_at_the_compaction_point() {
    let db = sqlite_db();
    for id in ["m1", "m2", "m3"] {
        ok_json(&db, &["object", "put", "machine", id]);
    }
    let compacted = ok_json(&db, &["compact", "--before", "3"]);
    assert_eq!(compacted["compacted_revision"], 2);
    let changes = ok_json(&db, &["changes"]);
    let ids: Vec<&str> = changes
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m3"], "{changes}");
    let table = fleetdb(&db, &["changes"], None);
    assert!(table.status.success(), "{table:?}");
    assert!(String::from_utf8_lossy(&table.stdout).contains("default/machine/m3"));
    let (code, err) = fails(&db, &["changes", "--after", "1"], None);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("compacted"), "{err}");
}

/// `compact --older-than D` drops the change-log entries written longer ago than D (here by a
/// store whose clock is two days behind) and keeps the younger ones; `--before` and
/// `--older-than` are one or the other.
#[test]
fn compact_older_than_drops_entries_by_age() {
    let db = sqlite_db();
    let path = db.dir.path().join("db.sqlite");
    let db = Db {
        url: format!("sqlite://{}", path.display()),
        dir: db.dir,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let earlier = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 24 * 3600);
        let store = fleetdb::Store::open_with(
            &db.url,
            fleetdb::OpenOptions {
                clock: Some(std::sync::Arc::new(fleetdb::ManualClock::new(
                    fleetdb::Timestamp::from_system(earlier),
                ))),
                background: false,
                ..fleetdb::OpenOptions::default()
            },
        )
        .await
        .unwrap();
        for id in ["old1", "old2"] {
            let k = fleetdb::ObjectKey::new("default", "machine", id).unwrap();
            store.object_put(&k, fleetdb::Labels::new()).await.unwrap();
        }
    });
    ok_json(&db, &["object", "put", "machine", "new"]);
    let compacted = ok_json(&db, &["compact", "--older-than", "1d"]);
    assert_eq!(compacted["dropped"], 2, "{compacted}");
    assert_eq!(compacted["compacted_revision"], 2, "{compacted}");
    let changes = ok_json(&db, &["changes"]);
    let ids: Vec<&str> = changes
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["new"], "{changes}");
    let again = ok_json(&db, &["compact", "--older-than", "1d"]);
    assert_eq!(again["dropped"], 0, "{again}");
    for args in [
        &["compact"][..],
        &["compact", "--before", "3", "--older-than", "1d"],
    ] {
        let (code, err) = fails(&db, args, None);
        assert_eq!(code, 2, "{args:?}: {err}");
    }
}

#[test]
fn migrate_status_writes_nothing_and_up_migrates() {
    let db = Db {
        url: "sqlite://fresh/db.sqlite".into(),
        dir: tempfile::tempdir().unwrap(),
    };
    let s = ok_json(&db, &["migrate", "status"]);
    assert_eq!(s["database_version"], 0);
    assert_eq!(s["up_to_date"], false);
    assert_eq!(
        s["pending"].as_array().unwrap().len() as u64,
        s["binary_version"].as_u64().unwrap()
    );
    let s = ok_json(&db, &["migrate", "up"]);
    assert_eq!(s["up_to_date"], true);
    assert!(s["pending"].as_array().unwrap().is_empty());
}

fn pg_base() -> String {
    std::env::var("FLEETDB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn pg_db(rt: &tokio::runtime::Runtime) -> (Db, String) {
    let (url, schema) = rt
        .block_on(fleetdb_postgres::testing::create_schema(&pg_base()))
        .unwrap_or_else(|e| panic!("{e}"));
    (
        Db {
            url,
            dir: tempfile::tempdir().unwrap(),
        },
        schema,
    )
}

/// A server setting that voids what a claim promises is said on every command, on stderr (a
/// JSON line with `-o json`), and the command still runs.
#[test]
fn postgres_commits_that_a_crash_may_undo_are_warned_of() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut db, schema) = pg_db(&rt);
    let url = db.url.clone();
    db.url = format!("{url}%20-c%20synchronous_commit%3Doff");
    let out = fleetdb(&db, &["ns", "ls"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(
            "warning: PostgreSQL commits FleetDB's transactions with synchronous_commit = off"
        ),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("default"));
    let out = fleetdb(&db, &["-o", "json", "ns", "ls"], None);
    assert!(out.status.success());
    let line: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert!(line["warning"]
        .as_str()
        .unwrap()
        .contains("synchronous_commit = off"));
    // The server's own setting (on): nothing said.
    db.url = url;
    let out = fleetdb(&db, &["ns", "ls"], None);
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("synchronous_commit"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rt.block_on(fleetdb_postgres::testing::drop_schema(&pg_base(), &schema))
        .unwrap();
}

#[test]
fn postgres_round_trip_and_bad_input() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (db, schema) = pg_db(&rt);
    round_trip(&db);
    bad_input_changes_nothing(&db);
    import(&db);
    assert!(
        !db.dir.path().join("fleetdb-data").exists(),
        "nothing embedded was created"
    );
    rt.block_on(fleetdb_postgres::testing::drop_schema(&pg_base(), &schema))
        .unwrap();
}

/// A reader of stdout that goes away (`fleetdb … | head`) ends the command quietly (status
/// 141, as SIGPIPE would), not with a panic.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fleetdb"));
        c.current_dir(dir.path())
            .env_remove("FLEETDB_NAMESPACE")
            .env_remove("FLEETDB_DB")
            .stdin(Stdio::null());
        c
    };
    assert!(cmd()
        .args(["object", "put", "machine", "m1"])
        .output()
        .unwrap()
        .status
        .success());
    let mut child = cmd()
        .args(["-o", "json", "object", "ls", "--all"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before anything was written
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}

/// `fleetdb worker` of `process` in the background, its command a long `sleep`: it holds up to
/// `limit` claims until killed (on drop; its command dies with it).
struct Holder(std::process::Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hold(db: &Db, component: &str, process: &str, limit: &str) -> Holder {
    hold_running(db, component, process, limit, &["sleep", "60"])
}

/// [`hold`] with the worker running `command`.
fn hold_running(db: &Db, component: &str, process: &str, limit: &str, command: &[&str]) -> Holder {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetdb"));
    cmd.current_dir(db.dir.path())
        .env_remove("FLEETDB_NAMESPACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if db.url.is_empty() {
        cmd.env_remove("FLEETDB_DB");
    } else {
        cmd.env("FLEETDB_DB", &db.url);
    }
    cmd.args([
        "worker",
        "--component",
        component,
        "--process",
        process,
        "--selector",
        "kind = machine",
        "--limit",
        limit,
        "--concurrency",
        limit,
        "--",
    ]);
    cmd.args(command);
    Holder(cmd.spawn().expect("run fleetdb worker"))
}

/// `work ls` (of `process`, if given): the JSON array.
fn claims(db: &Db, process: Option<&str>) -> Vec<Value> {
    let mut args = vec!["work", "ls"];
    args.extend(process.map(|p| ["--process", p]).into_iter().flatten());
    ok_json(db, &args).as_array().unwrap().clone()
}

/// Waits until `process` has `n` claims, at most 20 s.
fn wait_for_claims(db: &Db, process: &str, n: usize) -> Vec<Value> {
    let start = std::time::Instant::now();
    loop {
        let held = claims(db, Some(process));
        if held.len() == n {
            return held;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "timed out waiting for {n} claim(s) of {process}: {held:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `session ls`, `session show ID` (the session and the claims it holds) and `session close ID`
/// (an operator's: the session is gone from `session ls` and its claim released with a
/// `Canceled` history row, cause "session closed"); an unknown id exits 3.
#[test]
fn session_show_and_close_release_the_claim() {
    let db = sqlite_db();
    ok_json(&db, &["process", "define", "Install"]);
    ok_json(&db, &["object", "put", "machine", "m1"]);
    // A command line with a newline and a terminal escape: its runtime info shows on one line,
    // escaped (before: raw, a row spread over lines and the escape reached the terminal).
    let script = "sleep 60 # \u{1b}[2J\nend";
    let _holder = hold_running(&db, "holder", "Install", "1", &["sh", "-c", script]);
    let held = wait_for_claims(&db, "Install", 1);
    let token = held[0]["token"].as_i64().unwrap();

    let sessions = ok_json(&db, &["session", "ls"]);
    assert_eq!(sessions.as_array().unwrap().len(), 1, "{sessions}");
    let s = &sessions[0];
    let id = s["id"].as_str().unwrap().to_string();
    assert_eq!(
        (&s["component"], &s["alive"], &s["ttl_ms"]),
        (&"holder".into(), &true.into(), &10_000.into()),
        "{s}"
    );
    assert_eq!(held[0]["session_id"], id.as_str());

    let show = ok_json(&db, &["session", "show", &id]);
    for field in [
        "id",
        "component",
        "host",
        "runtime_info",
        "ttl_ms",
        "created_at",
    ] {
        assert_eq!(show[field], s[field], "{field}: {show}");
    }
    assert!(show["runtime_info"]
        .as_str()
        .unwrap()
        .starts_with("fleetdb worker pid "));
    let work = show["work"].as_array().unwrap();
    assert_eq!(work.len(), 1, "{show}");
    assert_eq!(
        (&work[0]["kind"], &work[0]["id"], &work[0]["process"]),
        (&"machine".into(), &"m1".into(), &"Install".into())
    );
    assert_eq!(
        (&work[0]["session_id"], &work[0]["token"]),
        (&id.as_str().into(), &token.into())
    );
    let table = fleetdb(&db, &["session", "show", &id], None);
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        !table.contains('\u{1b}')
            && table.contains("runtime info: fleetdb worker pid ")
            && table.contains("# \\u{1b}[2J\\nend\n"),
        "{table}"
    );
    assert!(
        table.starts_with(&format!("id:           {id}\n"))
            && table.contains(&format!(
                "work:         Install default/machine/m1 (token {token})"
            )),
        "{table}"
    );

    let closed = ok_json(&db, &["session", "close", &id]);
    assert_eq!(
        (&closed["closed"], &closed["released"]),
        (&id.as_str().into(), &1.into())
    );
    let after = ok_json(&db, &["session", "ls"]);
    assert!(
        after
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["id"] != id.as_str()),
        "a closed session is not listed: {after}"
    );
    assert!(claims(&db, None).is_empty(), "its claim is released");
    let h = ok_json(&db, &["history", "machine", "m1"]);
    let last = &h["items"][0];
    assert_eq!(
        (&last["event"], &last["cause"], &last["process"]),
        (
            &"Canceled".into(),
            &"session closed".into(),
            &"Install".into()
        ),
        "{h}"
    );
    assert_eq!(
        (&last["session_id"], &last["token"]),
        (&id.as_str().into(), &token.into())
    );
    assert_eq!(h["items"][1]["event"], "Started", "{h}");
    assert_eq!(
        ok_json(&db, &["process", "ls"])[0]["active_work"],
        0,
        "no claim held"
    );
    assert!(
        ok_json(&db, &["backoff", "ls"])
            .as_array()
            .unwrap()
            .is_empty(),
        "a close is not the object's failure"
    );

    // Gone: show and close say so (exit 3).
    for cmd in ["show", "close"] {
        let (code, err) = fails(&db, &["session", cmd, &id], None);
        assert_eq!(code, 3, "session {cmd}: {err}");
        assert!(
            err.contains(&format!("session {id} not found")),
            "session {cmd}: {err}"
        );
    }
    let (code, err) = fails(&db, &["-o", "json", "session", "show", "no-such"], None);
    assert_eq!(code, 3);
    let v: Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(v["error"]["code"], "not_found");
}

/// `process define NAME --conflicts A,B`: `process ls` shows the conflicts (JSON and table), a
/// claim of A keeps the object from the conflicting process, and a conflict with an undeclared
/// process is refused (exit 2, naming it) and writes nothing. `work ls --process P` lists only
/// P's claims.
#[test]
fn process_conflicts_and_work_ls_by_process() {
    let db = sqlite_db();
    ok_json(&db, &["process", "define", "Install"]);
    ok_json(&db, &["process", "define", "Wipe"]);
    let p = ok_json(
        &db,
        &[
            "process",
            "define",
            "Provision",
            "--conflicts",
            "Install,Wipe",
        ],
    );
    assert_eq!(p[0]["conflicts"], serde_json::json!(["Install", "Wipe"]));
    let conflicts = |db: &Db| -> Vec<(String, Value)> {
        ok_json(db, &["process", "ls"])
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["conflicts"].clone(),
                )
            })
            .collect()
    };
    let want = vec![
        ("Install".to_string(), serde_json::json!([])),
        (
            "Provision".to_string(),
            serde_json::json!(["Install", "Wipe"]),
        ),
        ("Wipe".to_string(), serde_json::json!([])),
    ];
    assert_eq!(conflicts(&db), want);
    let table = fleetdb(&db, &["process", "ls"], None);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.starts_with(&["Provision", "Install,Wipe", "active"])
        }),
        "{table}"
    );

    // A conflict with an undeclared process: refused, nothing written (a new process is not
    // declared, an existing one keeps its conflicts).
    for name in ["Reimage", "Provision"] {
        let (code, err) = fails(
            &db,
            &["process", "define", name, "--conflicts", "Install,Nope"],
            None,
        );
        assert_eq!(code, 2, "{name}: {err}");
        assert!(
            err.starts_with("error: ")
                && err.contains("conflicting process \"Nope\"")
                && err.contains("not declared"),
            "{name}: {err}"
        );
    }
    let (_, err) = fails(
        &db,
        &[
            "-o",
            "json",
            "process",
            "define",
            "Reimage",
            "--conflicts",
            "Nope",
        ],
        None,
    );
    let v: Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(v["error"]["code"], "invalid");
    assert_eq!(conflicts(&db), want);

    // Claims of two processes at once: Install holds two machines, Wipe one.
    for m in ["m1", "m2", "m3"] {
        ok_json(&db, &["object", "put", "machine", m]);
    }
    let _install = hold(&db, "installer", "Install", "2");
    let _wipe = hold(&db, "wiper", "Wipe", "1");
    let install = wait_for_claims(&db, "Install", 2);
    let wipe = wait_for_claims(&db, "Wipe", 1);
    assert!(
        install.iter().all(|w| w["process"] == "Install"),
        "{install:?}"
    );
    assert_ne!(install[0]["id"], install[1]["id"]);
    assert_eq!(
        install[0]["session_id"], install[1]["session_id"],
        "one worker's session"
    );
    assert_eq!(wipe[0]["process"], "Wipe");
    assert_ne!(wipe[0]["session_id"], install[0]["session_id"]);
    assert!(claims(&db, Some("Provision")).is_empty());
    let all = claims(&db, None);
    assert_eq!(all.len(), 3, "{all:?}");
    let by_process = |p: &str| {
        all.iter()
            .filter(|w| w["process"] == p)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(by_process("Install"), install);
    assert_eq!(by_process("Wipe"), wipe);
    let table = fleetdb(&db, &["work", "ls", "--process", "Wipe"], None);
    let table = String::from_utf8_lossy(&table.stdout);
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert!(
        rows.len() == 1 && rows[0].starts_with("Wipe "),
        "only Wipe's claim: {table}"
    );

    // The conflict holds: an object Install holds cannot go to Provision; a free one can.
    let taken = install[0]["id"].as_str().unwrap();
    let e = ok_json(
        &db,
        &[
            "work",
            "explain",
            "machine",
            taken,
            "--process",
            "Provision",
        ],
    );
    assert_eq!(e["claimable"], false, "{e}");
    assert!(
        e["blockers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b.as_str().unwrap().contains("held for process Install")),
        "{e}"
    );
    let free = ["m1", "m2", "m3"]
        .into_iter()
        .find(|m| all.iter().all(|w| w["id"] != *m))
        .expect("one machine is free");
    let e = ok_json(
        &db,
        &["work", "explain", "machine", free, "--process", "Provision"],
    );
    assert_eq!(e["claimable"], true, "{e}");
    // More history than a page holds: bad input up front (before: after the explanation, as a
    // `limit` error).
    let (code, err) = fails(
        &db,
        &[
            "work",
            "explain",
            "machine",
            free,
            "--process",
            "Provision",
            "--history",
            "1001",
        ],
        None,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--history"), "{err}");
}

/// `work explain --selector` (the in-memory reference) and `select` / `worker` (the
/// SQL) must agree on which objects a selector matches (docs/selectors.md: they agree for all
/// floats). On the embedded database a tag holding the float 1e-300 is said to match
/// `tag(x) = 1e-300` and to be claimable, yet `select` finds nothing and a worker never claims it.
#[test]
fn explain_select_and_worker_agree_on_a_float_tag() {
    let db = sqlite_db();
    ok_json(&db, &["object", "put", "machine", "m1"]);
    ok_json(&db, &["tag", "set", "machine", "m1", "x", "1e-300"]);
    ok_json(&db, &["process", "define", "P"]);
    let selector = "tag(x) = 1e-300";
    let e = ok_json(
        &db,
        &[
            "work",
            "explain",
            "machine",
            "m1",
            "--process",
            "P",
            "--selector",
            selector,
        ],
    );
    assert_eq!(e["selector"]["matches"], true, "{e}");
    assert_eq!(e["claimable"], true, "{e}");
    let count = ok_json(&db, &["select", selector, "--count"]);
    assert_eq!(
        count["count"], 1,
        "work explain says m1 matches `{selector}` and is claimable; select counts {count}"
    );
    let out = fleetdb(
        &db,
        &[
            "worker",
            "--component",
            "c",
            "--process",
            "P",
            "--selector",
            selector,
            "--once",
            "--",
            "true",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let history = ok_json(&db, &["history", "machine", "m1"]);
    assert!(
        history["items"].as_array().is_some_and(|h| !h.is_empty()),
        "the worker claims and finishes m1: {history}"
    );
}

/// A failure's cause is the tail of a command's stderr: several lines, maybe with terminal
/// escape sequences. The tables of `backoff ls`, `history` and `work explain` keep one line per
/// row and write no control character of the cause to the operator's terminal (JSON keeps the
/// cause as it is).
#[test]
fn causes_with_newlines_and_escapes_keep_tables_one_row_a_line() {
    let db = sqlite_db();
    ok_json(&db, &["process", "define", "Install"]);
    ok_json(&db, &["object", "put", "machine", "m1"]);
    ok_json(&db, &["tag", "set", "machine", "m1", "todo", "{}"]);
    let out = fleetdb(
        &db,
        &[
            "worker",
            "--component",
            "w",
            "--process",
            "Install",
            "--selector",
            "has(todo)",
            "--backoff",
            "1h,1h,1",
            "--once",
            "--",
            "sh",
            "-c",
            "printf 'disk gone\\n\\033[2J\\033[31mred\\033[0m\\nlast line\\n' >&2; exit 3",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = ok_json(&db, &["backoff", "ls"]);
    let cause = json[0]["cause"].as_str().unwrap().to_string();
    assert!(cause.contains("disk gone\n\u{1b}[2J"), "{cause:?}");
    let table = |args: &[&str]| -> String {
        let out = fleetdb(&db, args, None);
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    for (args, rows) in [
        (&["backoff", "ls"][..], 1),
        (&["history", "machine", "m1"][..], 2),
    ] {
        let text = table(args);
        assert_eq!(text.lines().count(), 1 + rows, "{args:?}:\n{text}");
        assert!(
            !text.contains('\u{1b}'),
            "{args:?} wrote an escape:\n{text}"
        );
        assert!(text.contains("disk gone\\n"), "{args:?}:\n{text}");
    }
    let text = table(&["work", "explain", "machine", "m1", "--process", "Install"]);
    assert!(!text.contains('\u{1b}'), "explain wrote an escape:\n{text}");
    assert!(
        text.lines().all(|l| !l.starts_with("last line")),
        "explain broke a cause over lines:\n{text}"
    );
}

/// Values written by anyone (key-values, export data, map values, label values) may hold
/// newlines and terminal escape sequences: every table keeps one line per row and writes no
/// control character to the operator's terminal (JSON, and `kv get`'s bare value, keep them).
#[test]
fn values_with_newlines_and_escapes_keep_tables_one_row_a_line() {
    let db = sqlite_db();
    let nasty = "first\n\u{1b}[2J\u{1b}[31mred\rlast";
    ok_json(
        &db,
        &[
            "object",
            "put",
            "machine",
            "m1",
            "-l",
            &format!("note={nasty}"),
        ],
    );
    let out = fleetdb(&db, &["kv", "set", "k1"], Some(nasty));
    assert!(out.status.success(), "{out:?}");
    ok_json(
        &db,
        &[
            "export", "--host", "h1", "--kind", "file", "--name", "motd", "--to", "h2", "--data",
            nasty,
        ],
    );
    ok_json(&db, &["map", "set", "m", nasty, "--host", "h1"]);
    let json = ok_json(&db, &["kv", "get", "k1"]);
    assert_eq!(json["value"], nasty, "JSON keeps the value as it is");
    for args in [
        &["kv", "ls"][..],
        &["object", "ls"][..],
        &["select", "kind = machine"][..],
        &["collect", "--host", "h2"][..],
        &["map", "get", "m"][..],
    ] {
        let out = fleetdb(&db, args, None);
        assert!(out.status.success(), "{args:?}: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.lines().count(), 2, "{args:?}:\n{text}");
        assert!(
            !text.contains('\u{1b}'),
            "{args:?} wrote an escape:\n{text}"
        );
        assert!(
            !text.contains('\r'),
            "{args:?} wrote a carriage return:\n{text}"
        );
        assert!(text.contains("first\\n"), "{args:?}:\n{text}");
    }
    ok_json(
        &db,
        &["lease", "create", "L", "-l", &format!("note={nasty}")],
    );
    let out = fleetdb(&db, &["lease", "show", "L"], None);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains('\u{1b}') && !text.contains('\r'),
        "lease show:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("labels:") && l.ends_with("red\\rlast")),
        "lease show:\n{text}"
    );
}
