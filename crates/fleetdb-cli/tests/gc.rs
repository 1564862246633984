//! Leases, the content store and the garbage collector from the CLI, end to end: the real
//! `fleetdb` binary on a temporary SQLite file.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use sha2::{Digest, Sha256};

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

fn run_with(db: &Db, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetdb"))
        .current_dir(db.dir.path())
        .env("FLEETDB_DB", &db.url)
        .env_remove("FLEETDB_NAMESPACE")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fleetdb");
    let mut pipe = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        pipe.write_all(s).unwrap();
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn run(db: &Db, args: &[&str]) -> Output {
    run_with(db, args, None)
}

/// Run a command that must succeed: its stdout.
fn ok(db: &Db, args: &[&str]) -> Vec<u8> {
    let out = run(db, args);
    assert!(
        out.status.success(),
        "fleetdb {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn ok_json(db: &Db, args: &[&str]) -> Value {
    let mut full = vec!["-o", "json"];
    full.extend_from_slice(args);
    let stdout = ok(db, &full);
    serde_json::from_slice(&stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&stdout)
        )
    })
}

fn fails_with(db: &Db, args: &[&str], code: i32, needle: &str) {
    let out = run(db, args);
    assert!(!out.status.success(), "fleetdb {args:?} should fail");
    assert!(
        out.stdout.is_empty(),
        "{args:?}: nothing on stdout when failing"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: {err:?} should contain {needle:?}"
    );
}

fn sha256(bytes: &[u8]) -> String {
    let h = Sha256::digest(bytes);
    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Deterministic bytes that do not compress or repeat at chunk boundaries.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

#[test]
fn blob_put_get_round_trip_ranges_info_ls_rm() {
    let db = sqlite_db();
    // Over 2 MiB and not a multiple of the 1 MiB write chunk or the 4 MiB read chunk.
    let data = pseudo_random(2 * 1024 * 1024 + 123_457);
    let file = write_file(db.dir.path(), "big.bin", &data);
    let digest = sha256(&data);

    // A blob's labels may reference blobs only: refused before anything is uploaded.
    fails_with(
        &db,
        &["blob", "put", &file, "-l", "fleetdb.io/gc.ref.image=i1"],
        2,
        "a blob can only reference blobs",
    );
    assert_eq!(ok_json(&db, &["blob", "ingests"]), serde_json::json!([]));

    // Table output: exactly the digest.
    let out = ok(&db, &["blob", "put", &file]);
    assert_eq!(String::from_utf8(out).unwrap(), format!("{digest}\n"));

    // Whole blob to stdout, byte-identical.
    let got = ok(&db, &["blob", "get", &digest]);
    assert!(got == data, "blob get returned different bytes");
    // To a file.
    let out_path = db.dir.path().join("copy.bin");
    let v = ok_json(
        &db,
        &["blob", "get", &digest, "--out", out_path.to_str().unwrap()],
    );
    assert_eq!(v["bytes"], data.len() as u64);
    assert_eq!(v["digest"], digest);
    assert!(std::fs::read(&out_path).unwrap() == data);
    // A failure (an offset past the end) leaves a file that was there as it was, and no
    // partial file beside it.
    let precious = db.dir.path().join("precious.txt");
    std::fs::write(&precious, b"keep me").unwrap();
    get_out_past_the_end(&db, &digest, &precious, "999999999");
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    let leftovers: Vec<_> = std::fs::read_dir(db.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".part-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A symlink is written through (it stays a link), a device in place.
    let real = db.dir.path().join("real.bin");
    std::fs::write(&real, b"old").unwrap();
    let link = db.dir.path().join("link.bin");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    ok_json(
        &db,
        &["blob", "get", &digest, "--out", link.to_str().unwrap()],
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::read(&real).unwrap() == data);
    ok_json(&db, &["blob", "get", &digest, "--out", "/dev/null"]);

    // Ranged reads: across the 1 MiB boundary, to the end, and past the end (clamped).
    let range = ok(
        &db,
        &[
            "blob", "get", &digest, "--offset", "1048570", "--length", "20",
        ],
    );
    assert_eq!(range, &data[1_048_570..1_048_590]);
    let tail = ok(&db, &["blob", "get", &digest, "--offset", "2097152"]);
    assert_eq!(tail, &data[2_097_152..]);
    let clamped = ok(
        &db,
        &[
            "blob",
            "get",
            &digest,
            "--offset",
            &(data.len() - 5).to_string(),
            "--length",
            "1000",
        ],
    );
    assert_eq!(clamped, &data[data.len() - 5..]);
    let empty = ok(
        &db,
        &["blob", "get", &digest, "--offset", &data.len().to_string()],
    );
    assert!(empty.is_empty());
    fails_with(
        &db,
        &[
            "blob",
            "get",
            &digest,
            "--offset",
            &(data.len() + 1).to_string(),
        ],
        2,
        "offset",
    );

    // From stdin, with labels; JSON output is the blob's info.
    let small = b"hello, content store\n";
    let out = run_with(
        &db,
        &["-o", "json", "blob", "put", "-", "--label", "team=infra"],
        Some(small),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    let small_digest = sha256(small);
    assert_eq!(info["digest"], small_digest);
    assert_eq!(info["size"], small.len() as u64);
    assert_eq!(info["labels"]["team"], "infra");
    for field in ["created_at", "updated_at", "revision"] {
        assert!(!info[field].is_null(), "blob info lacks {field}: {info}");
    }

    // info and ls.
    let info = ok_json(&db, &["blob", "info", &digest]);
    assert_eq!(info["size"], data.len() as u64);
    assert_eq!(info["digest"], digest);
    let ls = ok_json(&db, &["blob", "ls"]);
    let mut listed: Vec<&str> = ls["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["digest"].as_str().unwrap())
        .collect();
    listed.sort();
    let mut want = vec![digest.as_str(), small_digest.as_str()];
    want.sort();
    assert_eq!(listed, want);
    assert!(ls["next"].is_null());
    let page = ok_json(&db, &["blob", "ls", "--limit", "1"]);
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["next"], page["items"][0]["digest"]);
    let all = ok_json(&db, &["blob", "ls", "--limit", "1", "--all"]);
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    assert_eq!(ok_json(&db, &["blob", "ingests"]), serde_json::json!([]));

    // rm, then everything about it is not found.
    let v = ok_json(&db, &["blob", "rm", &digest]);
    assert_eq!(v["deleted"], digest);
    fails_with(&db, &["blob", "info", &digest], 3, "not found");
    fails_with(&db, &["blob", "get", &digest], 3, "not found");
    let missing = db.dir.path().join("missing.bin");
    fails_with(
        &db,
        &["blob", "get", &digest, "--out", missing.to_str().unwrap()],
        3,
        "not found",
    );
    assert!(!missing.exists(), "no file is left for a missing blob");
    fails_with(&db, &["blob", "rm", &digest], 3, "not found");

    // Bad input.
    fails_with(&db, &["blob", "info", "sha256:00"], 2, "invalid");
    fails_with(&db, &["blob", "get", "md5:abc"], 2, "invalid");
    fails_with(&db, &["blob", "put", "no-such-file"], 2, "cannot open");
}

#[test]
fn leases_create_list_show_and_hold_blobs() {
    let db = sqlite_db();
    let l1 = ok_json(
        &db,
        &[
            "lease",
            "create",
            "l1",
            "--expire-in",
            "10m",
            "--label",
            "team=a",
            "-l",
            "env=prod",
        ],
    );
    assert_eq!(l1["id"], "l1");
    assert_eq!(l1["labels"]["team"], "a");
    assert_eq!(l1["labels"]["env"], "prod");
    assert_eq!(l1["flat"], false);
    assert_eq!(l1["alive"], true);
    assert!(l1["expires_at"].is_string(), "{l1}");
    assert!(l1["expires_at"].as_str() > l1["created_at"].as_str());
    let generated = ok_json(&db, &["lease", "create"]);
    let gen_id = generated["id"].as_str().unwrap().to_string();
    assert!(gen_id.starts_with("lease-"), "{gen_id}");
    assert!(generated["expires_at"].is_null());
    let l2 = ok_json(&db, &["lease", "create", "l2", "--flat", "-l", "team=b"]);
    assert_eq!(l2["flat"], true);

    let ids = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["id"].as_str().unwrap().to_string())
            .collect()
    };
    let all = ok_json(&db, &["lease", "ls"]);
    assert_eq!(ids(&all), ["l1".into(), "l2".into(), gen_id.clone()]);
    assert_eq!(
        ids(&ok_json(&db, &["lease", "ls", "--selector", "team=a"])),
        ["l1"]
    );
    assert_eq!(
        ids(&ok_json(&db, &["lease", "ls", "-l", "team,env!=prod"])),
        ["l2"]
    );
    assert_eq!(
        ids(&ok_json(&db, &["lease", "ls", "-l", "!team"])),
        [gen_id.as_str()]
    );
    let page = ok_json(&db, &["lease", "ls", "--limit", "2"]);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["next"], "l2");
    let rest = ok_json(&db, &["lease", "ls", "--limit", "2", "--cursor", "l2"]);
    assert_eq!(ids(&rest), [gen_id.as_str()]);
    assert!(rest["next"].is_null());
    let filtered = ok_json(&db, &["lease", "ls", "-l", "team", "--limit", "1", "--all"]);
    assert_eq!(ids(&filtered), ["l1", "l2"]);

    fails_with(&db, &["lease", "create", "l1"], 4, "already exists");
    fails_with(
        &db,
        &["lease", "create", "x", "--expire-in", "0s"],
        2,
        "expiry",
    );
    fails_with(&db, &["lease", "create", "x", "--expire-in", "soon"], 2, "");
    fails_with(
        &db,
        &["lease", "create", "x", "--expire-in", "500000000years"],
        2,
        "at most",
    );
    fails_with(&db, &["lease", "ls", "-l", "a=b,,"], 2, "selector");
    fails_with(&db, &["lease", "show", "nope"], 3, "not found");

    // A blob put under a lease is held by it.
    let data = pseudo_random(300_000);
    let file = write_file(db.dir.path(), "b.bin", &data);
    let digest = String::from_utf8(ok(&db, &["blob", "put", &file, "--lease", "l1"]))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(digest, sha256(&data));
    let shown = ok_json(&db, &["lease", "show", "l1"]);
    assert_eq!(
        shown["resources"],
        serde_json::json!([{"type": "blob", "digest": digest}])
    );
    fails_with(
        &db,
        &["blob", "put", &file, "--lease", "nope"],
        3,
        "not found",
    );

    // Objects: added in the -n namespace; adding twice changes nothing.
    ok(&db, &["ns", "create", "lab"]);
    ok(&db, &["-n", "lab", "object", "put", "machine", "m1"]);
    let added = ok_json(
        &db,
        &["-n", "lab", "lease", "add", "l2", "--object", "machine/m1"],
    );
    assert_eq!(added["changed"], true);
    assert_eq!(
        added["resource"],
        serde_json::json!({"type": "object", "namespace": "lab", "kind": "machine", "id": "m1"})
    );
    let again = ok_json(
        &db,
        &["-n", "lab", "lease", "add", "l2", "--object", "machine/m1"],
    );
    assert_eq!(again["changed"], false);
    let blob_added = ok_json(&db, &["lease", "add", "l2", "--blob", &digest]);
    assert_eq!(blob_added["changed"], true);
    let shown = ok_json(&db, &["lease", "show", "l2"]);
    assert_eq!(shown["resources"].as_array().unwrap().len(), 2);
    let removed = ok_json(&db, &["lease", "remove", "l2", "--blob", &digest]);
    assert_eq!(removed["changed"], true);
    let removed = ok_json(&db, &["lease", "remove", "l2", "--blob", &digest]);
    assert_eq!(removed["changed"], false);
    let shown = ok_json(&db, &["lease", "show", "l2"]);
    assert_eq!(shown["resources"][0]["namespace"], "lab");
    assert_eq!(shown["resources"].as_array().unwrap().len(), 1);
    fails_with(
        &db,
        &["lease", "add", "l2", "--object", "machine"],
        2,
        "KIND/ID",
    );
    fails_with(
        &db,
        &["lease", "add", "l2", "--blob", "sha256:zz"],
        2,
        "invalid",
    );
    fails_with(&db, &["lease", "add", "l2"], 2, "--object");
    fails_with(
        &db,
        &["lease", "add", "l2", "--object", "a/b", "--blob", &digest],
        2,
        "cannot be used with",
    );
    fails_with(
        &db,
        &["lease", "add", "nope", "--blob", &digest],
        3,
        "not found",
    );

    // A collection keeps the leased blob; deleting the lease with --sync collects it and
    // reports the run.
    let stats = ok_json(&db, &["gc", "run"]);
    assert_eq!(stats["swept_blobs"], 0);
    ok_json(&db, &["blob", "info", &digest]);
    let rm = ok_json(&db, &["lease", "rm", "l1", "--sync"]);
    assert_eq!(rm["deleted"], "l1");
    assert_eq!(rm["gc"]["swept_blobs"], 1);
    assert_eq!(rm["gc"]["bytes_freed"], data.len() as u64);
    fails_with(&db, &["blob", "info", &digest], 3, "not found");
    fails_with(&db, &["lease", "show", "l1"], 3, "not found");
    // Without --sync: no stats.
    let rm = ok_json(&db, &["lease", "rm", &gen_id]);
    assert!(rm["gc"].is_null());
    fails_with(&db, &["lease", "rm", "l1"], 3, "not found");
    // Table output of --sync prints the stats.
    let table = String::from_utf8(ok(&db, &["lease", "rm", "l2", "--sync"])).unwrap();
    assert!(table.contains("deleted lease l2"), "{table}");
    assert!(table.contains("swept objects:"), "{table}");
}

#[test]
fn gc_run_removes_unreferenced_collectable_objects_only() {
    let db = sqlite_db();
    let k = ok_json(&db, &["gc", "kind", "image", "--collectable"]);
    assert_eq!(
        k,
        serde_json::json!({"kind": "image", "collectable": true, "changed": true})
    );
    let k = ok_json(&db, &["gc", "kind", "image", "--collectable"]);
    assert_eq!(k["changed"], false);
    ok_json(&db, &["gc", "kind", "machine", "--not-collectable"]);
    let kinds = ok_json(&db, &["gc", "kinds"]);
    let kinds = kinds.as_array().unwrap();
    assert_eq!(kinds.len(), 2);
    assert_eq!(kinds[0]["kind"], "image");
    assert_eq!(kinds[0]["collectable"], true);
    assert_eq!(kinds[1]["kind"], "machine");
    assert_eq!(kinds[1]["collectable"], false);
    assert!(kinds[0]["declared_at"].is_string());
    fails_with(&db, &["gc", "kind", "image"], 2, "--collectable");
    fails_with(
        &db,
        &["gc", "kind", "image", "--collectable", "--not-collectable"],
        2,
        "cannot be used with",
    );
    fails_with(
        &db,
        &["gc", "kind", "bad kind!", "--collectable"],
        2,
        "invalid",
    );

    for id in ["referenced", "garbage", "rooted", "chained"] {
        ok(&db, &["object", "put", "image", id]);
    }
    ok(
        &db,
        &[
            "object",
            "put",
            "image",
            "referenced",
            "-l",
            "fleetdb.io/gc.ref.image.base=chained",
        ],
    );
    ok(
        &db,
        &[
            "object",
            "put",
            "machine",
            "m1",
            "-l",
            "fleetdb.io/gc.ref.image=referenced",
        ],
    );
    ok(
        &db,
        &[
            "object",
            "put",
            "image",
            "rooted",
            "-l",
            "fleetdb.io/gc.root=true",
        ],
    );

    // Malformed gc labels are refused when written, naming the label.
    fails_with(
        &db,
        &[
            "object",
            "put",
            "machine",
            "m2",
            "-l",
            "fleetdb.io/gc.ref.image=bad id!",
        ],
        2,
        "fleetdb.io/gc.ref.image",
    );
    fails_with(
        &db,
        &[
            "object",
            "put",
            "machine",
            "m2",
            "-l",
            "fleetdb.io/gc.bogus=x",
        ],
        2,
        "gc",
    );
    fails_with(
        &db,
        &[
            "object",
            "put",
            "machine",
            "m2",
            "-l",
            "fleetdb.io/gc.expire=tomorrow",
        ],
        2,
        "RFC 3339",
    );
    fails_with(&db, &["object", "get", "machine", "m2"], 3, "not found");

    let stats = ok_json(&db, &["gc", "run"]);
    for field in [
        "started_at",
        "trigger",
        "marked",
        "swept_objects",
        "swept_blobs",
        "expired_leases",
        "bytes_freed",
        "spared",
        "orphans_removed",
        "mark_ms",
        "sweep_ms",
        "writers_blocked_ms",
        "writers_blocked_max_ms",
        "collector_errors",
    ] {
        assert!(stats.get(field).is_some(), "gc run lacks {field}: {stats}");
    }
    assert_eq!(stats["swept_objects"], 1, "{stats}");
    assert_eq!(stats["swept_blobs"], 0);
    assert_eq!(stats["collector_errors"], serde_json::json!([]));
    fails_with(&db, &["object", "get", "image", "garbage"], 3, "not found");
    for (kind, id) in [
        ("image", "referenced"),
        ("image", "chained"),
        ("image", "rooted"),
        ("machine", "m1"),
    ] {
        ok_json(&db, &["object", "get", kind, id]);
    }

    // Dropping the reference makes the chain garbage; a non-collectable kind stays.
    ok(&db, &["object", "rm", "machine", "m1"]);
    ok(&db, &["object", "put", "machine", "lonely"]);
    let table = String::from_utf8(ok(&db, &["gc", "run"])).unwrap();
    assert!(table.contains("swept objects:     2"), "{table}");
    assert!(table.contains("writers blocked:"), "{table}");
    fails_with(
        &db,
        &["object", "get", "image", "referenced"],
        3,
        "not found",
    );
    fails_with(&db, &["object", "get", "image", "chained"], 3, "not found");
    ok_json(&db, &["object", "get", "image", "rooted"]);
    ok_json(&db, &["object", "get", "machine", "lonely"]);
}

#[test]
fn gc_status_json_shape() {
    let db = sqlite_db();
    ok_json(&db, &["gc", "kind", "image", "--collectable"]);
    ok_json(&db, &["lease", "create", "a", "--expire-in", "1h"]);
    ok_json(&db, &["lease", "create", "b"]);
    let s = ok_json(&db, &["gc", "status"]);
    let obj = s.as_object().unwrap();
    for field in [
        "runs",
        "last",
        "deletions_since",
        "mutations_since",
        "next_deadline",
        "kinds",
        "leases",
        "expired_leases",
        "ingests",
    ] {
        assert!(obj.contains_key(field), "gc status lacks {field}: {s}");
    }
    assert!(s["runs"].is_u64());
    assert!(s["last"].is_null(), "no run in this process: {s}");
    assert_eq!(s["leases"], 2);
    assert_eq!(s["expired_leases"], 0);
    assert_eq!(s["ingests"], 0);
    assert_eq!(s["kinds"][0]["kind"], "image");
    assert_eq!(s["kinds"][0]["collectable"], true);
    let table = String::from_utf8(ok(&db, &["gc", "status"])).unwrap();
    assert!(table.contains("collectable kinds: image"), "{table}");
    assert!(table.contains("2 live"), "{table}");
    assert_eq!(s["recent"], serde_json::json!([]), "no run yet: {s}");

    // Runs by other processes (here: two earlier `gc run` invocations) are recorded in the
    // store and shown newest first.
    ok_json(&db, &["object", "put", "image", "garbage"]);
    let first = ok_json(&db, &["gc", "run"]);
    assert_eq!(first["swept_objects"], 1);
    let second = ok_json(&db, &["gc", "run"]);
    let s = ok_json(&db, &["gc", "status"]);
    let recent = s["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 2, "{s}");
    assert_eq!(recent[0]["started_at"], second["started_at"]);
    assert_eq!(recent[1]["swept_objects"], 1);
    assert_eq!(recent[1]["trigger"], "explicit");
    assert!(s["last"].is_null(), "this process ran none: {s}");
    let table = String::from_utf8(ok(&db, &["gc", "status"])).unwrap();
    assert!(table.contains("last run (any process):"), "{table}");
    assert!(table.contains("earlier runs:"), "{table}");
}

#[test]
fn exports_hold_blobs_and_objects_alive() {
    let db = sqlite_db();
    let file = write_file(db.dir.path(), "held.bin", b"held by an export");
    let held = String::from_utf8(ok(&db, &["blob", "put", &file]))
        .unwrap()
        .trim()
        .to_string();
    let loose_file = write_file(db.dir.path(), "loose.bin", b"nobody holds me");
    let loose = String::from_utf8(ok(&db, &["blob", "put", &loose_file]))
        .unwrap()
        .trim()
        .to_string();
    ok(&db, &["gc", "kind", "image", "--collectable"]);
    ok(&db, &["object", "put", "image", "web"]);
    let export = [
        "export", "--host", "h1", "--kind", "image", "--name", "web", "--to", "*", "--data", "v2",
    ];
    let mut args = export.to_vec();
    args.extend(["--hold-blob", &held, "--hold-object", "image/web"]);
    let out = ok_json(&db, &args);
    assert_eq!(out["changed"].as_array().unwrap().len(), 1, "{out}");
    let seen = ok_json(&db, &["collect", "--host", "h2"]);
    let holds = &seen[0]["holds"];
    assert_eq!(holds.as_array().unwrap().len(), 2, "{seen}");
    assert!(holds
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["type"] == "blob" && h["digest"] == held.as_str()));

    ok(&db, &["gc", "run"]);
    ok(&db, &["blob", "info", &held]);
    ok(&db, &["object", "get", "image", "web"]);
    fails_with(&db, &["blob", "info", &loose], 3, "not found");

    // Holding what does not exist fails and writes nothing; a malformed hold is invalid.
    let mut missing = export.to_vec();
    missing[6] = "other";
    missing.extend(["--hold-blob", &loose]);
    fails_with(&db, &missing, 3, "held by export");
    let mut bad = export.to_vec();
    bad.extend(["--hold-object", "no-slash"]);
    fails_with(&db, &bad, 2, "KIND/ID");
    let seen = ok_json(&db, &["collect", "--host", "h2"]);
    assert_eq!(seen.as_array().unwrap().len(), 1);

    ok(
        &db,
        &[
            "unexport", "--host", "h1", "--kind", "image", "--name", "web", "--to", "*",
        ],
    );
    ok(&db, &["gc", "run"]);
    fails_with(&db, &["blob", "info", &held], 3, "not found");
    fails_with(&db, &["object", "get", "image", "web"], 3, "not found");
}

#[test]
fn blob_get_out_through_a_symlink_with_a_bad_offset_leaves_the_target_untouched() {
    // A symlink is written through in place, but a request refused before any byte is read
    // (an offset past the end) must not truncate the file it points at.
    let db = sqlite_db();
    let src = write_file(db.dir.path(), "src.bin", b"hello\n");
    let digest = String::from_utf8(ok(&db, &["blob", "put", &src]))
        .unwrap()
        .trim()
        .to_string();
    let real = db.dir.path().join("precious.txt");
    std::fs::write(&real, b"precious\n").unwrap();
    let link = db.dir.path().join("link.txt");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    get_out_past_the_end(&db, &digest, &link, "100");
    assert_eq!(std::fs::read(&real).unwrap(), b"precious\n");
}

#[test]
fn blob_put_to_an_expired_lease_is_refused_before_reading_the_input() {
    // The lease is checked before uploading: an expired one is refused at once (exit 4), not
    // after the whole input was read and stored (here stdin never ends).
    let db = sqlite_db();
    ok(&db, &["lease", "create", "short", "--expire-in", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetdb"))
        .current_dir(db.dir.path())
        .env("FLEETDB_DB", &db.url)
        .env_remove("FLEETDB_NAMESPACE")
        .args(["blob", "put", "-", "--lease", "short"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fleetdb");
    let _stdin_kept_open = child.stdin.take().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let Some(status) = status else {
        child.kill().unwrap();
        child.wait().unwrap();
        panic!("blob put to an expired lease waited for its input instead of refusing");
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(4), "{err}");
    assert!(err.contains("expired"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn lease_create_with_an_expiry_out_of_range_names_the_flag_and_the_value_given() {
    // The message names --expire-in and the value as typed (not a normalized number of
    // seconds), and does not suggest an expiry "none" the flag does not take.
    let db = sqlite_db();
    for bad in ["99999999999d", "0s", "3651days"] {
        let out = run(&db, &["lease", "create", "l1", "--expire-in", bad]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("--expire-in"), "{bad}: {err}");
        assert!(err.contains(bad), "{bad}: {err}");
        assert!(!err.contains("without expiry: none"), "{bad}: {err}");
    }
    let ls = ok_json(&db, &["lease", "ls"]);
    assert_eq!(ls["items"], serde_json::json!([]));
    ok(&db, &["lease", "create", "l1", "--expire-in", "3650days"]);
}

/// `blob get DIGEST --out OUT --offset OFFSET` with an offset past the blob's end: refused, exit 2.
fn get_out_past_the_end(db: &Db, digest: &str, out: &std::path::Path, offset: &str) {
    let out = out.to_str().unwrap();
    fails_with(
        db,
        &["blob", "get", digest, "--out", out, "--offset", offset],
        2,
        "offset",
    );
}

/// Start `blob put - <extra>` fed `sent` through a pipe kept open, wait until the upload holds
/// all of it, then kill the process (SIGKILL: nothing of it runs after). The upload it left.
fn blob_put_killed_midway(db: &Db, extra: &[&str], sent: &[u8]) -> Value {
    let mut args = vec!["blob", "put", "-"];
    args.extend_from_slice(extra);
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetdb"))
        .current_dir(db.dir.path())
        .env("FLEETDB_DB", &db.url)
        .env_remove("FLEETDB_NAMESPACE")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run fleetdb");
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(sent).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let ingest = loop {
        let v = ok_json(db, &["blob", "ingests"]);
        if let Some(i) = v.as_array().and_then(|a| a.first()) {
            if i["offset"] == sent.len() as u64 {
                break i.clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the upload never held what was sent: {v}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    drop(pipe);
    ingest
}

/// Seconds from `a` to `b`, two RFC 3339 times of the CLI's JSON (same day or the next).
fn seconds_between(a: &Value, b: &Value) -> f64 {
    let secs = |v: &Value| {
        let t = v.as_str().unwrap();
        let time = &t[t.find('T').unwrap() + 1..t.len() - 1];
        let p: Vec<f64> = time.split(':').map(|x| x.parse().unwrap()).collect();
        p[0] * 3600.0 + p[1] * 60.0 + p[2]
    };
    (secs(b) - secs(a)).rem_euclid(86_400.0)
}

// A `blob put` killed midway left an upload nobody could resume (its reference was random and
// unknown) that held its bytes for 24 hours. Now `--ref REF` names the upload: the same command
// run again resumes it (the bytes received are read from the input, not sent again; the commit
// checks the whole upload's digest); an input shorter than what was received is refused, the
// upload kept. Without `--ref` the upload lives 10 minutes after its last write, and the first
// collection after that removes it.
#[test]
fn a_blob_put_killed_midway_resumes_by_its_ref_or_is_reclaimed_soon() {
    let db = sqlite_db();
    let data = pseudo_random(5 << 20);

    let left = blob_put_killed_midway(&db, &["--ref", "nightly/image"], &data[..3 << 20]);
    assert_eq!(left["reference"], "nightly/image");
    let out = run_with(
        &db,
        &["blob", "put", "-", "--ref", "nightly/image"],
        Some(&data[..1 << 20]),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("fewer than the 3145728"), "{err}");
    assert_eq!(
        ok_json(&db, &["blob", "ingests"])[0]["offset"],
        3 << 20,
        "a refused resume keeps the upload"
    );
    let out = run_with(
        &db,
        &["-o", "json", "blob", "put", "-", "--ref", "nightly/image"],
        Some(&data),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["digest"], sha256(&data));
    assert_eq!(ok(&db, &["blob", "get", &sha256(&data)]), data);
    assert_eq!(ok_json(&db, &["blob", "ingests"]), serde_json::json!([]));

    // A put that fails before sending anything leaves nothing, named or not.
    for extra in [&["--ref", "folder"][..], &[]] {
        let mut args = vec!["blob", "put", "."];
        args.extend_from_slice(extra);
        fails_with(&db, &args, 2, "is a folder");
    }
    let empty = run_with(&db, &["blob", "put", "-", "--ref", "reads-nothing"], None);
    assert!(empty.status.success(), "an empty input is an empty blob");
    assert_eq!(ok_json(&db, &["blob", "ingests"]), serde_json::json!([]));

    let left = blob_put_killed_midway(&db, &[], &data[..2 << 20]);
    let ttl = seconds_between(&left["updated_at"], &left["expires_at"]);
    assert!(
        (ttl - 600.0).abs() < 1.0,
        "an unnamed upload lives {ttl} s: {left}"
    );
    // The first collection after its expiry (a store whose clock is 11 minutes ahead) takes it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(11 * 60);
        let store = fleetdb::Store::open_with(
            &db.url,
            fleetdb::OpenOptions {
                clock: Some(std::sync::Arc::new(fleetdb::ManualClock::new(
                    fleetdb::Timestamp::from_system(later),
                ))),
                background: false,
                ..fleetdb::OpenOptions::default()
            },
        )
        .await
        .unwrap();
        store.gc_run().await.unwrap();
        assert!(store.ingest_list().await.unwrap().is_empty());
    });
    let ingest_files = std::fs::read_dir(db.dir.path().join("ingest"))
        .unwrap()
        .count();
    assert_eq!(ingest_files, 0, "the upload's bytes were removed");
}
