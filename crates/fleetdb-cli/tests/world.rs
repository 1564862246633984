//! The World from the CLI, end to end: the real `fleetdb` binary on a temporary SQLite file
//! (and one PostgreSQL test: a `kv set` by the binary reaches a watcher in this process).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

struct Db {
    url: String,
    dir: tempfile::TempDir,
}

fn sqlite_db() -> Db {
    let dir = tempfile::tempdir().unwrap();
    Db {
        url: format!("sqlite://{}/db.sqlite", dir.path().display()),
        dir,
    }
}

fn cmd(db: &Db, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fleetdb"));
    c.current_dir(db.dir.path())
        .env("FLEETDB_DB", &db.url)
        .env_remove("FLEETDB_NAMESPACE")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn run(db: &Db, args: &[&str]) -> Output {
    cmd(db, args).output().expect("run fleetdb")
}

fn ok_json(db: &Db, args: &[&str]) -> Value {
    let mut full = vec!["-o", "json"];
    full.extend_from_slice(args);
    let out = run(db, &full);
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

/// Run a command that must fail: (exit code, stderr).
fn fails(db: &Db, args: &[&str]) -> (i32, String) {
    let out = run(db, args);
    assert!(!out.status.success(), "fleetdb {args:?} should fail");
    assert!(out.stdout.is_empty(), "nothing on stdout when failing");
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fails_with(db: &Db, args: &[&str], code: i32, needle: &str) {
    let (got, err) = fails(db, args);
    assert_eq!(got, code, "{args:?}: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: {err:?} should contain {needle:?}"
    );
}

/// A streaming command running in the background; its stdout lines arrive on a channel.
struct Streaming {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Streaming {
    fn start(db: &Db, args: &[&str]) -> Streaming {
        let mut child = cmd(db, args).spawn().expect("run fleetdb");
        let stdout: ChildStdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Streaming { child, lines }
    }

    /// The next JSON line, within `timeout`.
    fn next(&mut self, timeout: Duration) -> Value {
        let line = self.lines.recv_timeout(timeout).unwrap_or_else(|e| {
            let _ = self.child.kill();
            let out = self.child.stderr.take().map(|mut s| {
                let mut t = String::new();
                let _ = std::io::Read::read_to_string(&mut s, &mut t);
                t
            });
            panic!("no line within {timeout:?} ({e}); stderr: {out:?}")
        });
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
    }

    /// Wait for the process to exit by itself (within `timeout`): its status code.
    fn wait(&mut self, timeout: Duration) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(start.elapsed() < timeout, "did not exit within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ask it to stop as Ctrl-C would.
    fn interrupt(&mut self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const LINE: Duration = Duration::from_secs(10);

#[test]
fn kv_set_get_cas_rm() {
    let db = sqlite_db();
    let set = ok_json(&db, &["kv", "set", "app/config", "v1"]);
    assert_eq!(set["changed"], true);
    assert_eq!(set["key"], "app/config");
    assert_eq!(set["value"], "v1");
    let r1 = set["revision"].as_i64().unwrap();
    assert!(r1 > 0);
    assert_eq!(set["create_revision"], r1);

    let got = ok_json(&db, &["kv", "get", "app/config"]);
    assert_eq!(got["value"], "v1");
    assert_eq!(got["revision"], r1);
    // Table output is the bare value.
    assert_eq!(run(&db, &["kv", "get", "app/config"]).stdout, b"v1\n");

    // The same value changes nothing.
    let same = ok_json(&db, &["kv", "set", "app/config", "v1"]);
    assert_eq!(same["changed"], false);
    assert_eq!(same["revision"], r1);

    // Compare-and-set: the wrong revision is a state error; the right one writes.
    let wrong = (r1 + 100).to_string();
    fails_with(
        &db,
        &["kv", "cas", "app/config", "v2", "--expect-revision", &wrong],
        4,
        "conflict",
    );
    let cas = ok_json(
        &db,
        &[
            "kv",
            "cas",
            "app/config",
            "v2",
            "--expect-revision",
            &r1.to_string(),
        ],
    );
    let r2 = cas["revision"].as_i64().unwrap();
    assert!(r2 > r1);
    assert_eq!(cas["create_revision"], r1);
    // Revision 0: only if absent.
    fails_with(
        &db,
        &["kv", "cas", "app/config", "v3", "--expect-revision", "0"],
        4,
        "conflict",
    );
    let fresh = ok_json(
        &db,
        &["kv", "cas", "app/other", "x", "--expect-revision", "0"],
    );
    assert_eq!(fresh["changed"], true);

    // A TTL shows as an expiry.
    let ttl = ok_json(&db, &["kv", "set", "app/lease", "me", "--ttl", "1h"]);
    assert!(ttl["expires_at"].as_str().unwrap().ends_with('Z'));

    // Listing by prefix, with pagination.
    ok_json(&db, &["kv", "set", "zzz", "other"]);
    let ls = ok_json(&db, &["kv", "ls", "app/"]);
    let keys: Vec<&str> = ls["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, vec!["app/config", "app/lease", "app/other"]);
    let page = ok_json(&db, &["kv", "ls", "app/", "--limit", "2"]);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let next = page["next"].as_str().unwrap().to_string();
    let page2 = ok_json(
        &db,
        &["kv", "ls", "app/", "--limit", "2", "--cursor", &next],
    );
    assert_eq!(page2["items"][0]["key"], "app/other");

    // Delete: a wrong expected revision refuses; then it goes, and get is a clear not-found.
    fails_with(
        &db,
        &[
            "kv",
            "rm",
            "app/config",
            "--expect-revision",
            &r1.to_string(),
        ],
        4,
        "conflict",
    );
    let rm = ok_json(
        &db,
        &[
            "kv",
            "rm",
            "app/config",
            "--expect-revision",
            &r2.to_string(),
        ],
    );
    assert_eq!(rm["deleted"], "app/config");
    assert!(rm["revision"].as_i64().unwrap() > r2);
    fails_with(
        &db,
        &["kv", "get", "app/config"],
        3,
        "key \"app/config\" not found",
    );
    fails_with(&db, &["kv", "rm", "app/config"], 3, "not found");
    let (_, err) = fails(&db, &["-o", "json", "kv", "get", "app/config"]);
    let v: Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(v["error"]["code"], "not_found");

    // Bad input at the edge.
    fails_with(&db, &["kv", "set", "bad key", "x"], 2, "invalid key");
    fails_with(&db, &["kv", "set", "k", "x", "--ttl", "0s"], 2, "ttl");
    fails_with(
        &db,
        &["kv", "cas", "k", "x", "--expect-revision=-1"],
        2,
        "invalid value '-1' for '--expect-revision <EXPECT_REVISION>'",
    );
}

#[test]
fn exports_are_visible_only_to_their_targets() {
    let db = sqlite_db();
    let e = ok_json(
        &db,
        &[
            "export", "--host", "h1", "--kind", "file", "--name", "secret", "--to", "h2", "--data",
            "for h2",
        ],
    );
    assert_eq!(e["changed"][0]["name"], "secret");
    let e = ok_json(
        &db,
        &[
            "export", "--host", "h1", "--kind", "file", "--name", "motd", "--to", "*", "--data",
            "hello",
        ],
    );
    assert_eq!(e["changed"][0]["to"], "*");
    // Exporting the identical record changes nothing, and says so.
    let again = ok_json(
        &db,
        &[
            "export", "--host", "h1", "--kind", "file", "--name", "motd", "--to", "*", "--data",
            "hello",
        ],
    );
    assert_eq!(again["changed"], serde_json::json!([]));
    assert_eq!(again["unchanged"][0]["name"], "motd");

    let names = |host: &str, extra: &[&str]| -> Vec<String> {
        let mut args = vec!["collect", "--host", host];
        args.extend_from_slice(extra);
        ok_json(&db, &args)
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("h2", &[]), vec!["motd", "secret"]);
    assert_eq!(
        names("h3", &[]),
        vec!["motd"],
        "a directed export is invisible to a third host"
    );
    assert_eq!(
        names("h1", &[]),
        vec!["motd", "secret"],
        "the exporter sees its own"
    );
    assert_eq!(names("h2", &["--name", "secret"]), vec!["secret"]);
    assert_eq!(names("h2", &["--from", "h9"]), Vec::<String>::new());
    let one = ok_json(&db, &["collect", "--host", "h2", "--name", "secret"]);
    assert_eq!(one[0]["from"], "h1");
    assert_eq!(one[0]["data"], "for h2");
    assert_eq!(one[0]["data_base64"], "Zm9yIGgy");

    // A watch as h3 does not see the directed export either.
    let mut w = Streaming::start(
        &db,
        &[
            "watch",
            "--world",
            "exports",
            "--host",
            "h3",
            "--max-events",
            "1",
        ],
    );
    let snap = w.next(LINE);
    assert_eq!(snap["type"], "snapshot");
    let ids: Vec<&str> = snap["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["h1/file/motd/*"]);
    assert_eq!(w.wait(LINE), 0);

    let un = ok_json(
        &db,
        &[
            "unexport", "--host", "h1", "--kind", "file", "--name", "secret", "--to", "h2",
        ],
    );
    assert_eq!(un["removed"][0]["name"], "secret");
    assert_eq!(names("h2", &[]), vec!["motd"]);

    // `export sync` replaces the host's whole set.
    let dir = db.dir.path();
    std::fs::write(
        dir.join("set.json"),
        r#"[{"kind": "file", "name": "bin", "to": "h2", "data_base64": "AAEC"}]"#,
    )
    .unwrap();
    let sync = ok_json(
        &db,
        &["export", "sync", "--host", "h1", "--file", "set.json"],
    );
    assert_eq!(sync["changed"][0]["name"], "bin");
    assert_eq!(sync["removed"][0]["name"], "motd");
    let bin = ok_json(&db, &["collect", "--host", "h2"]);
    assert_eq!(bin[0]["data_base64"], "AAEC");

    fails_with(
        &db,
        &[
            "export", "--host", "h1", "--kind", "file", "--name", "x", "--to", "a b", "--data", "x",
        ],
        2,
        "invalid target host \"a b\"",
    );
    fails_with(&db, &["collect", "--host", "bad host"], 2, "invalid host");
}

fn write_file(root: &Path, rel: &str, content: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `--max-events 0` is refused (exit 2) naming the flag, by every streaming command; before,
/// it exited at once, successfully, having printed nothing (`schedule register` registered
/// and left again).
#[test]
fn max_events_zero_is_refused_naming_the_flag() {
    let db = sqlite_db();
    for args in [
        &["watch", "--max-events", "0"][..],
        &["kv", "watch", "--max-events", "0"],
        &["schedule", "watch", "web", "--max-events", "0"],
        &[
            "schedule",
            "register",
            "web",
            "--host",
            "h1",
            "--max-events",
            "0",
        ],
    ] {
        fails_with(
            &db,
            args,
            2,
            "invalid value '0' for '--max-events <MAX_EVENTS>': must be at least 1",
        );
    }
    fails_with(&db, &["schedule", "show", "web"], 3, "not found");
}

/// An out-of-range `--buffer` (every streaming command), worker `--ttl` or worker `--backoff`
/// is refused (exit 2) naming the flag and the value as typed; before: `invalid watch buffer
/// "0"`, `invalid session ttl "0ns"` for `--ttl 0s`, `invalid backoff initial "0ns"` for
/// `--backoff 0s,1m,2`.
#[test]
fn buffer_and_worker_flags_name_the_flag_and_the_value_as_typed() {
    let db = sqlite_db();
    let worker = |flag: &'static str, value: &'static str| {
        vec![
            "worker",
            "--component",
            "c",
            "--process",
            "p",
            "--selector",
            "has(x)",
            flag,
            value,
            "--",
            "true",
        ]
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["watch", "--buffer", "0"],
            "invalid value '0' for '--buffer <BUFFER>': must be between 1 and 1048576",
        ),
        (
            vec!["kv", "watch", "--buffer", "2000000"],
            "invalid value '2000000' for '--buffer <BUFFER>': must be between 1 and 1048576",
        ),
        (
            vec!["schedule", "watch", "web", "--buffer", "0"],
            "invalid value '0' for '--buffer <BUFFER>'",
        ),
        (
            worker("--ttl", "0s"),
            "invalid value '0s' for '--ttl <TTL>': a session TTL must be between 1s and 1h",
        ),
        (
            worker("--ttl", "2h"),
            "invalid value '2h' for '--ttl <TTL>': a session TTL must be between 1s and 1h",
        ),
        (
            worker("--backoff", "0s,1m,2"),
            "invalid value '0s,1m,2' for '--backoff <BACKOFF>': the initial interval \"0s\" must be at least 1s",
        ),
        (
            worker("--backoff", "1s,40d,2"),
            "invalid value '1s,40d,2' for '--backoff <BACKOFF>': the maximum interval \"40d\" must be at least the initial interval and at most 30 days",
        ),
        (
            worker("--backoff", "1s,1m,0.5"),
            "invalid value '1s,1m,0.5' for '--backoff <BACKOFF>': the exponent \"0.5\" must be between 1 and 100",
        ),
    ];
    for (args, needle) in cases {
        fails_with(&db, &args, 2, needle);
    }
    fails_with(&db, &["schedule", "show", "web"], 3, "not found");
}

/// Input over a size limit is reported with its real size (a file) or as "more than" the limit
/// (stdin, read only up to one byte past it); before, both said "is LIMIT+1 bytes".
#[test]
fn over_long_input_reports_its_real_size_or_more_than_the_limit() {
    let db = sqlite_db();
    let max = 1usize << 20;
    // stdin: kv set without a value.
    let mut child = cmd(&db, &["kv", "set", "k"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        // The command stops reading at the limit: a broken pipe is expected.
        let _ = pipe.write_all(&vec![b'x'; 3 * max]);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("value <stdin> is more than 1048576 bytes; the maximum is 1048576"),
        "{err}"
    );
    // A file: its size.
    let file = db.dir.path().join("data.bin");
    std::fs::write(&file, vec![b'x'; 3 * max]).unwrap();
    let file_arg = file.to_str().unwrap();
    fails_with(
        &db,
        &[
            "export",
            "--host",
            "h1",
            "--kind",
            "k",
            "--name",
            "n",
            "--to",
            "*",
            "--data-file",
            file_arg,
        ],
        2,
        &format!("export data file {file_arg} is 3145728 bytes; the maximum is 1048576"),
    );
    fails_with(&db, &["kv", "get", "k"], 3, "not found");
    let out = ok_json(&db, &["collect", "--host", "h1"]);
    assert_eq!(out.as_array().map(Vec::len), Some(0), "{out}");
}

/// `kv ls`, `blob ls`, `deploy ls` and `lease ls` give no `next` cursor when the page that ends
/// the listing is exactly full, as `object ls` and `select` do; before, they gave one, and it
/// led to an empty page.
#[test]
fn listings_give_no_next_after_an_exactly_full_last_page() {
    let db = sqlite_db();
    for k in ["a", "b"] {
        ok_json(&db, &["kv", "set", k, "v"]);
        ok_json(&db, &["lease", "create", &format!("lease-{k}")]);
        let file = db.dir.path().join(k);
        std::fs::write(&file, k).unwrap();
        ok_json(&db, &["blob", "put", file.to_str().unwrap()]);
    }
    ok_json(&db, &["deploy", "add", "1", "--payload", "one"]);
    ok_json(&db, &["deploy", "add", "2", "--payload", "two"]);
    for list in [
        &["kv", "ls"][..],
        &["blob", "ls"],
        &["deploy", "ls"],
        &["lease", "ls"],
    ] {
        let mut args = list.to_vec();
        args.extend(["--limit", "2"]);
        let page = ok_json(&db, &args);
        assert_eq!(
            page["items"].as_array().unwrap().len(),
            2,
            "{list:?}: {page}"
        );
        assert!(page["next"].is_null(), "{list:?}: {page}");
        let mut args = list.to_vec();
        args.extend(["--limit", "1"]);
        let page = ok_json(&db, &args);
        assert_eq!(
            page["items"].as_array().unwrap().len(),
            1,
            "{list:?}: {page}"
        );
        assert!(!page["next"].is_null(), "{list:?}: {page}");
    }
}

/// `collect -o json`'s output can be fed back to `export sync` of the same host: holds printed
/// flat (`{"type": "object", "namespace", "kind", "id"}`) are taken as the nested input shape
/// is, `data` and `data_base64` together are taken when they agree, and the fields collect adds
/// (`revision`, `updated_at`) are ignored; `from` must be the syncing host, and a record with a
/// session or an expiry is refused (its lifetime would be lost). Before, every collected
/// record was refused (unknown field `from`, flat holds).
#[test]
fn collect_output_round_trips_through_export_sync() {
    let db = sqlite_db();
    let blob = db.dir.path().join("held");
    std::fs::write(&blob, b"held").unwrap();
    let digest = ok_json(&db, &["blob", "put", blob.to_str().unwrap()])["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let binary = db.dir.path().join("binary");
    std::fs::write(&binary, [0u8, 159, 146, 150]).unwrap();
    ok_json(&db, &["object", "put", "image", "web"]);
    ok_json(
        &db,
        &[
            "export",
            "--host",
            "h1",
            "--kind",
            "k",
            "--name",
            "text",
            "--to",
            "*",
            "--data",
            "hello",
            "--hold-object",
            "image/web",
            "--hold-blob",
            &digest,
        ],
    );
    ok_json(
        &db,
        &[
            "export",
            "--host",
            "h1",
            "--kind",
            "k",
            "--name",
            "bin",
            "--to",
            "h2",
            "--data-file",
            binary.to_str().unwrap(),
        ],
    );
    let collected = ok_json(&db, &["collect", "--host", "h1", "--from", "h1"]);
    assert_eq!(collected.as_array().unwrap().len(), 2, "{collected}");
    let file = db.dir.path().join("collected.json");
    std::fs::write(&file, collected.to_string()).unwrap();
    let file_arg = file.to_str().unwrap();
    let out = ok_json(&db, &["export", "sync", "--host", "h1", "--file", file_arg]);
    assert_eq!(out["changed"], serde_json::json!([]), "{out}");
    assert_eq!(out["removed"], serde_json::json!([]), "{out}");
    assert_eq!(out["unchanged"].as_array().unwrap().len(), 2, "{out}");
    let again = ok_json(&db, &["collect", "--host", "h1", "--from", "h1"]);
    assert_eq!(again, collected, "nothing rewritten");
    // The nested input shape still works, and the two shapes name the same hold.
    let nested = format!(
        r#"[{{"kind": "k", "name": "text", "to": "*", "data": "hello", "holds": [
            {{"type": "object", "key": {{"namespace": "default", "kind": "image", "id": "web"}}}},
            {{"type": "blob", "digest": "{digest}"}}]}},
           {{"kind": "k", "name": "bin", "to": "h2", "data_base64": "AJ+Slg=="}}]"#
    );
    std::fs::write(&file, nested).unwrap();
    let out = ok_json(&db, &["export", "sync", "--host", "h1", "--file", file_arg]);
    assert_eq!(out["unchanged"].as_array().unwrap().len(), 2, "{out}");
    // Another host's records are not taken as this host's.
    std::fs::write(&file, collected.to_string()).unwrap();
    fails_with(
        &db,
        &["export", "sync", "--host", "h2", "--file", file_arg],
        2,
        "invalid export from \"h1\": a record exported by another host; sync --host h1",
    );
    // Data and data_base64 that disagree are refused.
    let text = collected
        .as_array()
        .unwrap()
        .iter()
        .position(|r| r["name"] == "text")
        .unwrap();
    let mut bad = collected.clone();
    bad[text]["data_base64"] = serde_json::json!("eHl6");
    std::fs::write(&file, bad.to_string()).unwrap();
    fails_with(
        &db,
        &["export", "sync", "--host", "h1", "--file", file_arg],
        2,
        "\"data\" and \"data_base64\" differ",
    );
    // A record with an expiry (or a session) would lose it: refused.
    let mut ttl = collected.clone();
    ttl[0]["expires_at"] = serde_json::json!("2030-01-01T00:00:00.000000Z");
    std::fs::write(&file, ttl.to_string()).unwrap();
    fails_with(
        &db,
        &["export", "sync", "--host", "h1", "--file", file_arg],
        2,
        "expires_at",
    );
    assert_eq!(
        ok_json(&db, &["collect", "--host", "h1", "--from", "h1"]),
        collected
    );
}

/// Every listing's `--limit` out of its range is refused while parsing (exit 2) naming the
/// flag and the value as typed; before, the store's message said `invalid limit "0"` (no flag),
/// `blob ls` in other words than the rest.
#[test]
fn every_listing_limit_names_the_flag() {
    let db = sqlite_db();
    let lists: [&[&str]; 11] = [
        &["object", "ls"],
        &["select", "has(x)"],
        &["history", "--process", "P"],
        &["work", "ls"],
        &["backoff", "ls"],
        &["kv", "ls"],
        &["deploy", "ls"],
        &["lease", "ls"],
        &["blob", "ls"],
        &["changes"],
        &[
            "worker",
            "--component",
            "c",
            "--process",
            "p",
            "--selector",
            "has(x)",
        ],
    ];
    for list in lists {
        let max = if list[0] == "changes" {
            "10000"
        } else {
            "1000"
        };
        let over = if max == "1000" { "1001" } else { "10001" };
        for bad in ["0", over] {
            let mut args = list.to_vec();
            args.extend(["--limit", bad]);
            if list[0] == "worker" {
                args.extend(["--", "true"]);
            }
            fails_with(
                &db,
                &args,
                2,
                &format!(
                    "invalid value '{bad}' for '--limit <LIMIT>': must be a whole number from 1 to {max}"
                ),
            );
        }
    }
}

/// An out-of-range `--ttl` is refused naming the flag and the value as typed, with the bound
/// in the units people type; before: `invalid ttl "691200000ms"` for `--ttl 8d`, `invalid
/// session ttl "0ns"` for `--ttl 0s`.
#[test]
fn ttl_flags_name_the_flag_and_the_value_as_typed() {
    let db = sqlite_db();
    for (args, needle) in [
        (
            &["kv", "set", "k", "x", "--ttl", "8d"][..],
            "invalid value '8d' for '--ttl <TTL>': must be positive and at most a week (7days)",
        ),
        (
            &[
                "kv",
                "cas",
                "k",
                "x",
                "--expect-revision",
                "0",
                "--ttl",
                "0s",
            ],
            "invalid value '0s' for '--ttl <TTL>': must be positive and at most a week",
        ),
        (
            &[
                "export", "--host", "h1", "--kind", "k", "--name", "n", "--to", "*", "--data", "x",
                "--ttl", "8d",
            ],
            "invalid value '8d' for '--ttl <TTL>': must be positive and at most a week",
        ),
        (
            &["schedule", "register", "web", "--host", "h1", "--ttl", "0s"],
            "invalid value '0s' for '--ttl <TTL>': a session TTL must be between 1s and 1h",
        ),
        (
            &["schedule", "register", "web", "--host", "h1", "--ttl", "2h"],
            "invalid value '2h' for '--ttl <TTL>': a session TTL must be between 1s and 1h",
        ),
    ] {
        fails_with(&db, args, 2, needle);
    }
    // A record of `export sync` names its ttl as written too.
    let file = db.dir.path().join("records.json");
    std::fs::write(
        &file,
        r#"[{"kind": "k", "name": "n", "to": "*", "data": "x", "ttl": "8d"}]"#,
    )
    .unwrap();
    fails_with(
        &db,
        &[
            "export",
            "sync",
            "--host",
            "h1",
            "--file",
            file.to_str().unwrap(),
        ],
        2,
        "invalid export ttl \"8d\": must be positive and at most a week",
    );
    let ok = ok_json(&db, &["kv", "set", "k", "x", "--ttl", "7d"]);
    assert!(ok["expires_at"].is_string());
}

/// Another host's export data, a map value, a key's value or a deploy payload holding control
/// characters (a newline, an escape sequence) is shown in a table escaped: each row stays one
/// line and nothing reaches the terminal as a control sequence (before: printed raw).
#[test]
fn world_tables_escape_control_characters() {
    let db = sqlite_db();
    let nasty = "one\ntwo\u{1b}[31mred";
    let shown = "one\\ntwo\\u{1b}[31mred";
    ok_json(
        &db,
        &[
            "export", "--host", "h1", "--kind", "k", "--name", "n", "--to", "*", "--data", nasty,
        ],
    );
    ok_json(&db, &["map", "set", "m", nasty, "--host", "h1"]);
    ok_json(&db, &["kv", "set", "key", nasty]);
    ok_json(&db, &["deploy", "add", "1", "--payload", nasty]);
    for args in [
        &["collect", "--host", "h2"][..],
        &["map", "get", "m"],
        &["kv", "ls"],
        &["deploy", "get", "1"],
    ] {
        let out = run(&db, args);
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(!text.contains('\u{1b}'), "{args:?}: raw escape in {text:?}");
        let line = text
            .lines()
            .find(|l| l.contains("one"))
            .unwrap_or_else(|| panic!("{args:?}: {text:?}"));
        assert!(line.contains(shown), "{args:?}: {line:?}");
    }
}

/// A tree with a setuid, setgid or sticky file is refused (exit 2) naming the file and its
/// mode; nothing is added. Before, the mode was stored and extracted as is.
#[test]
fn deploy_add_refuses_a_setuid_file_in_the_tree() {
    let db = sqlite_db();
    let tree = db.dir.path().join("tree");
    write_file(&tree, "bin/ok", b"fine", 0o755);
    for (mode, shown) in [(0o4755, "4755"), (0o1777, "1777")] {
        write_file(&tree, "bin/su", b"root me", mode);
        fails_with(
            &db,
            &["deploy", "add", "1", "--tree", "tree"],
            2,
            &format!(
                "invalid deploy file mode \"{shown} of bin/su\": must be permission bits only"
            ),
        );
    }
    fails_with(&db, &["deploy", "get", "1"], 3, "deploy 1 not found");
    write_file(&tree, "bin/su", b"root me", 0o755);
    ok_json(&db, &["deploy", "add", "1", "--tree", "tree"]);
}

#[test]
fn deploy_tree_round_trip_and_chain_refusals() {
    use std::os::unix::fs::PermissionsExt;
    let db = sqlite_db();
    let tree = db.dir.path().join("tree");
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    write_file(&tree, "bin/run.sh", b"#!/bin/sh\necho hi\n", 0o755);
    write_file(&tree, "etc/app/config.toml", b"a = 1\n", 0o640);
    write_file(&tree, "data/blob.bin", &binary, 0o600);
    write_file(&tree, "empty", b"", 0o644);
    write_file(&tree, "dup", b"a = 1\n", 0o644); // same content as config.toml: stored once

    let d1 = ok_json(
        &db,
        &[
            "deploy",
            "add",
            "1",
            "--hash",
            "h1",
            "--tree",
            "tree",
            "--payload",
            "release 1",
        ],
    );
    assert_eq!(d1["id"], 1);
    assert_eq!(d1["payload"], "release 1");
    let files = d1["files"].as_array().unwrap();
    let paths: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        vec![
            "bin/run.sh",
            "data/blob.bin",
            "dup",
            "empty",
            "etc/app/config.toml"
        ]
    );
    assert_eq!(files[0]["mode"], 0o755);
    assert_eq!(files[1]["size"], 70_000);
    assert_eq!(files[2]["digest"], files[4]["digest"]);

    // Extract: byte-identical, same modes.
    let got = ok_json(&db, &["deploy", "get", "1", "--extract", "out"]);
    assert_eq!(got["hash"], "h1");
    let out = db.dir.path().join("out");
    for (rel, mode) in [
        ("bin/run.sh", 0o755),
        ("etc/app/config.toml", 0o640),
        ("data/blob.bin", 0o600),
        ("empty", 0o644),
        ("dup", 0o644),
    ] {
        assert_eq!(
            std::fs::read(out.join(rel)).unwrap(),
            std::fs::read(tree.join(rel)).unwrap(),
            "{rel}"
        );
        let m = std::fs::metadata(out.join(rel))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(m, mode, "{rel}");
    }
    // Into an empty directory that exists: the same; nothing of the extraction is left beside.
    std::fs::create_dir(db.dir.path().join("out2")).unwrap();
    ok_json(&db, &["deploy", "get", "1", "--extract", "out2"]);
    assert!(db.dir.path().join("out2/bin/run.sh").exists());
    let leftovers: Vec<_> = std::fs::read_dir(db.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".part-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Extracting into a directory that holds something is refused.
    fails_with(
        &db,
        &["deploy", "get", "1", "--extract", "out"],
        2,
        "empty or new directory",
    );
    fails_with(&db, &["deploy", "get", "9"], 3, "deploy 9 not found");

    // Chain rules: each refusal says which rule failed (exit 4).
    fails_with(
        &db,
        &["deploy", "add", "3", "--payload", "x"],
        4,
        "the previous deploy 2 does not exist",
    );
    fails_with(
        &db,
        &[
            "deploy",
            "add",
            "2",
            "--hash",
            "h2",
            "--parent-hash",
            "nope",
            "--payload",
            "x",
        ],
        4,
        "parent hash \"nope\" does not match the hash of deploy 1",
    );
    fails_with(
        &db,
        &["deploy", "add", "1", "--payload", "x"],
        4,
        "deploy 1 already exists",
    );
    let (_, err) = fails(&db, &["-o", "json", "deploy", "add", "3", "--payload", "x"]);
    let v: Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(v["error"]["code"], "refused");
    fails_with(
        &db,
        &["deploy", "add", "0", "--payload", "x"],
        2,
        "deploy ids start at 1",
    );
    fails_with(&db, &["deploy", "add", "2"], 2, "--payload");

    // Symbolic links are refused, clearly.
    std::os::unix::fs::symlink("bin/run.sh", tree.join("link")).unwrap();
    fails_with(
        &db,
        &["deploy", "add", "2", "--tree", "tree"],
        2,
        "\"link\": is a symbolic link",
    );
    std::fs::remove_file(tree.join("link")).unwrap();

    for id in 2..=4 {
        let (h, p) = (format!("h{id}"), format!("h{}", id - 1));
        ok_json(
            &db,
            &[
                "deploy",
                "add",
                &id.to_string(),
                "--hash",
                &h,
                "--parent-hash",
                &p,
                "--payload",
                "x",
            ],
        );
    }
    let ls = ok_json(&db, &["deploy", "ls"]);
    let ids: Vec<i64> = ls["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    assert_eq!(ls["items"][0]["file_count"], 5);
    let pruned = ok_json(&db, &["deploy", "prune", "--keep", "2"]);
    assert_eq!(pruned["pruned"], 2);
    assert_eq!(pruned["before"], 3);
    let ls = ok_json(&db, &["deploy", "ls"]);
    assert_eq!(ls["items"][0]["id"], 3);
    let pruned = ok_json(&db, &["deploy", "prune", "--before", "100"]);
    assert_eq!(pruned["pruned"], 1, "the newest deploy always stays");
}

#[test]
fn map_set_get_rm() {
    let db = sqlite_db();
    let s = ok_json(&db, &["map", "set", "roles", "leader", "--host", "h1"]);
    assert_eq!(s["changed"], true);
    ok_json(&db, &["map", "set", "roles", "follower", "--host", "h2"]);
    ok_json(&db, &["map", "set", "other", "x", "--host", "h1"]);
    let same = ok_json(&db, &["map", "set", "roles", "leader", "--host", "h1"]);
    assert_eq!(same["changed"], false);
    let m = ok_json(&db, &["map", "get", "roles"]);
    assert_eq!(
        m["values"],
        serde_json::json!({"h1": "leader", "h2": "follower"})
    );
    // The map space is separate from plain keys.
    fails_with(&db, &["kv", "get", "roles/h1"], 3, "not found");
    let rm = ok_json(&db, &["map", "rm", "roles", "--host", "h1"]);
    assert_eq!(rm["deleted"], "roles/h1");
    assert_eq!(
        ok_json(&db, &["map", "get", "roles"])["values"],
        serde_json::json!({"h2": "follower"})
    );
    fails_with(&db, &["map", "rm", "roles", "--host", "h1"], 3, "not found");
    fails_with(
        &db,
        &["map", "set", "roles", "x", "--host", "bad host"],
        2,
        "invalid host",
    );
}

#[test]
fn watch_prints_json_lines() {
    let db = sqlite_db();
    let r1 = ok_json(&db, &["kv", "set", "w/a", "1"])["revision"]
        .as_i64()
        .unwrap();
    ok_json(&db, &["kv", "set", "w/b", "2"]);
    ok_json(&db, &["kv", "set", "x/c", "3"]);
    ok_json(&db, &["object", "put", "machine", "m1"]);

    // Replay from a revision: one JSON line per change, in order, only the prefix.
    let out = run(
        &db,
        &[
            "watch",
            "--world",
            "kv",
            "--prefix",
            "w/",
            "--from-revision",
            "0",
            "--max-events",
            "2",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["type"], "change");
    assert_eq!(lines[0]["id"], "w/a");
    assert_eq!(lines[0]["op"], "put");
    assert_eq!(lines[0]["revision"], r1);
    assert_eq!(lines[0]["new_value"]["value"], "1");
    assert_eq!(lines[1]["id"], "w/b");
    // `kv watch` after a revision skips what came before.
    let out = run(
        &db,
        &[
            "kv",
            "watch",
            "w/",
            "--from-revision",
            &r1.to_string(),
            "--max-events",
            "1",
        ],
    );
    let first: Value =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(first["id"], "w/b");

    // Objects (the default scope): a snapshot first.
    let out = run(&db, &["watch", "--kind", "machine", "--max-events", "1"]);
    let snap: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["items"][0]["id"], "m1");
    assert_eq!(snap["items"][0]["entity"], "object");

    // Live: a snapshot, then a change written by another process, flushed line by line.
    let mut w = Streaming::start(&db, &["kv", "watch", "w/", "--max-events", "3"]);
    let snap = w.next(LINE);
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["items"].as_array().unwrap().len(), 2);
    let set = ok_json(&db, &["kv", "set", "w/live", "now"]);
    ok_json(&db, &["kv", "set", "x/ignored", "no"]);
    let rm = ok_json(&db, &["kv", "rm", "w/a"]);
    let c = w.next(LINE);
    assert_eq!(c["type"], "change");
    assert_eq!(c["id"], "w/live");
    assert_eq!(c["revision"], set["revision"]);
    let d = w.next(LINE);
    assert_eq!(d["op"], "delete");
    assert_eq!(d["revision"], rm["revision"]);
    assert_eq!(w.wait(LINE), 0, "--max-events ends it");

    // Interrupted, a watch exits cleanly.
    let mut w = Streaming::start(&db, &["watch", "--world", "deploys"]);
    assert_eq!(w.next(LINE)["type"], "snapshot");
    w.interrupt();
    assert_eq!(w.wait(LINE), 0);

    // Bad combinations and compacted revisions.
    fails_with(
        &db,
        &["watch", "--world", "map", "--prefix", "x"],
        2,
        "--prefix",
    );
    fails_with(&db, &["watch", "--prefix", "m"], 2, "needs --kind");
    fails_with(
        &db,
        &["watch", "--from-revision=-1"],
        2,
        "invalid value '-1' for '--from-revision",
    );
    ok_json(&db, &["compact", "--before", "3"]);
    fails_with(
        &db,
        &["watch", "--world", "kv", "--from-revision", "1"],
        4,
        "compacted",
    );
}

#[test]
fn schedule_and_members() {
    let db = sqlite_db();
    let mut a = Streaming::start(
        &db,
        &[
            "schedule",
            "register",
            "web",
            "--host",
            "h1",
            "--strategy",
            "alpha",
            "--ttl",
            "5s",
        ],
    );
    let s = a.next(LINE);
    assert_eq!(s["namespace"], "web");
    assert_eq!(s["hosts"], serde_json::json!(["h1"]));
    assert_eq!(s["strategy"], "alpha");

    let show = ok_json(&db, &["schedule", "show", "web"]);
    assert_eq!(show["hosts"], serde_json::json!(["h1"]));
    assert_eq!(show["registrations"][0]["host"], "h1");
    let members = ok_json(&db, &["members"]);
    let m = members.as_array().unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["host"], "h1");
    assert_eq!(m[0]["component"], "fleetdb-schedule");
    assert_eq!(m[0]["alive"], true);

    // A second host joins: the first one prints the new schedule.
    let mut b = Streaming::start(&db, &["schedule", "register", "web", "--host", "h0"]);
    assert_eq!(b.next(LINE)["hosts"], serde_json::json!(["h0", "h1"]));
    assert_eq!(a.next(LINE)["hosts"], serde_json::json!(["h0", "h1"]));
    assert_eq!(ok_json(&db, &["members"]).as_array().unwrap().len(), 2);

    // It leaves (interrupted: its session closes at once): back to one.
    b.interrupt();
    assert_eq!(b.wait(LINE), 0);
    assert_eq!(a.next(LINE)["hosts"], serde_json::json!(["h1"]));
    assert_eq!(ok_json(&db, &["members"]).as_array().unwrap().len(), 1);

    // Its reader goes away (`| head -1`): it stops and leaves, though the schedule does not
    // change again (it used to stay registered until something made it print).
    let mut gone = cmd(&db, &["schedule", "register", "web", "--host", "h7"])
        .spawn()
        .expect("run fleetdb");
    {
        let mut first = String::new();
        BufReader::new(gone.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.contains("h7"), "{first}");
    } // the reader is dropped here
    let until = std::time::Instant::now() + LINE;
    let status = loop {
        if let Some(s) = gone.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < until, "still running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    assert_eq!(ok_json(&db, &["members"]).as_array().unwrap().len(), 1);
    assert_eq!(
        ok_json(&db, &["schedule", "show", "web"])["hosts"],
        serde_json::json!(["h1"])
    );

    fails_with(
        &db,
        &["schedule", "show", "nobody"],
        3,
        "schedule \"nobody\" not found",
    );
    fails_with(
        &db,
        &[
            "schedule",
            "register",
            "web",
            "--host",
            "h2",
            "--strategy",
            "random",
        ],
        2,
        "must be rr or alpha",
    );
    a.interrupt();
    assert_eq!(a.wait(LINE), 0);
    assert!(ok_json(&db, &["members"]).as_array().unwrap().is_empty());
    assert_eq!(
        ok_json(&db, &["schedule", "show", "web"])["hosts"],
        serde_json::json!([])
    );
}

#[test]
fn postgres_watcher_sees_a_kv_set_by_another_process() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let base = fleetdb_postgres::testing::test_url();
    let (url, schema) = rt
        .block_on(fleetdb_postgres::testing::create_schema(&base))
        .unwrap_or_else(|e| panic!("{e}"));
    let store = rt
        .block_on(fleetdb::Store::open_with(
            &url,
            fleetdb::OpenOptions {
                // Far longer than the deadline below: only a NOTIFY wake-up can make it.
                watch_poll_interval: Duration::from_secs(60),
                ..fleetdb::OpenOptions::default()
            },
        ))
        .unwrap();
    let mut watch = rt
        .block_on(
            store.watch(fleetdb::WatchRequest::new(fleetdb::WatchScope::Kv {
                prefix: "cross/".into(),
            })),
        )
        .unwrap();
    match rt.block_on(watch.next_timeout(Duration::from_secs(5))) {
        Some(Ok(fleetdb::WatchEvent::Snapshot { items, .. })) => assert!(items.is_empty()),
        other => panic!("expected the snapshot, got {other:?}"),
    }
    // Let the hub's LISTEN connection settle before the other process writes.
    std::thread::sleep(Duration::from_millis(300));

    let db = Db {
        url: url.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    let set = ok_json(&db, &["kv", "set", "cross/k", "from another process"]);
    let written = Instant::now();
    let ev = rt.block_on(async {
        loop {
            match watch.next_timeout(Duration::from_secs(2)).await {
                Some(Ok(fleetdb::WatchEvent::Progress { .. })) => continue,
                other => return other,
            }
        }
    });
    match ev {
        Some(Ok(fleetdb::WatchEvent::Change(c))) => {
            assert_eq!(c.id, "cross/k");
            assert_eq!(c.revision.0, set["revision"].as_i64().unwrap());
            assert_eq!(
                c.new_value.as_ref().unwrap()["value"],
                "from another process"
            );
        }
        other => panic!("no change within 2 s of the other process's write: {other:?}"),
    }
    assert!(written.elapsed() < Duration::from_secs(2));
    drop(watch);
    drop(store);
    rt.block_on(fleetdb_postgres::testing::drop_schema(&base, &schema))
        .unwrap();
}

/// A negative revision in any revision-taking flag is refused while parsing (exit 2) naming the
/// flag and the value as typed; before: `invalid from revision "-3"`, `invalid expected revision
/// "-1"` (naming a field, after opening the database), and `changes --after=-5` / `compact
/// --before=-5` went to the store.
#[test]
fn negative_revision_flags_name_the_flag() {
    let db = sqlite_db();
    let cases: [(&[&str], &str, &str); 7] = [
        (&["changes", "--after=-5"], "-5", "--after <AFTER>"),
        (&["compact", "--before=-5"], "-5", "--before <BEFORE>"),
        (
            &["watch", "--from-revision=-3"],
            "-3",
            "--from-revision <FROM_REVISION>",
        ),
        (
            &["kv", "watch", "--from-revision=-3"],
            "-3",
            "--from-revision <FROM_REVISION>",
        ),
        (
            &["schedule", "watch", "web", "--from-revision=-3"],
            "-3",
            "--from-revision <FROM_REVISION>",
        ),
        (
            &["kv", "cas", "k", "v", "--expect-revision=-1"],
            "-1",
            "--expect-revision <EXPECT_REVISION>",
        ),
        (
            &["kv", "rm", "k", "--expect-revision=-1"],
            "-1",
            "--expect-revision <EXPECT_REVISION>",
        ),
    ];
    for (args, bad, flag) in cases {
        fails_with(
            &db,
            args,
            2,
            &format!("invalid value '{bad}' for '{flag}': must be a revision"),
        );
    }
    assert!(
        !db.dir.path().join("db.sqlite").exists(),
        "refused before opening the database"
    );
}

/// `deploy prune --before 0` (no deploy has an id lower than 1) is refused naming the flag, as
/// `--keep 0` is; before: it printed "pruned 0 deploy(s) with an id lower than 0".
#[test]
fn deploy_prune_before_zero_is_refused_naming_the_flag() {
    let db = sqlite_db();
    fails_with(
        &db,
        &["deploy", "prune", "--before", "0"],
        2,
        "invalid value '0' for '--before <BEFORE>': must be a deploy id (1 or more)",
    );
    fails_with(
        &db,
        &["deploy", "prune", "--keep", "0"],
        2,
        "invalid value '0' for '--keep <KEEP>': must be at least 1 (the newest deploy always stays)",
    );
    let pruned = ok_json(&db, &["deploy", "prune", "--before", "1"]);
    assert_eq!(pruned["pruned"], 0);
    assert_eq!(pruned["before"], 1);
    // Keeping more deploys than there are is no id 0 either.
    let pruned = ok_json(&db, &["deploy", "prune", "--keep", "5"]);
    assert_eq!(pruned["pruned"], 0);
    assert_eq!(pruned["before"], 1);
}
