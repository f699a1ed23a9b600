//! The `s4db` command line, run as a real process against a moto S3 server
//! (and against the embedded `--local-store` backend), checked with the real
//! Python `s4db` package where the format matters.

mod common;

use base64::Engine as _;
use common::{noise, Moto, Py};
use serde_json::{json, Value as Json};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// ------------------------------------------------------------------ helpers

/// What one run of the binary did.
struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stdout = String::from_utf8_lossy(&self.stdout);
        let shown: String = stdout.chars().take(2000).collect();
        let more = if shown.len() < stdout.len() {
            " [...]"
        } else {
            ""
        };
        write!(
            f,
            "exit {}\n--- stdout ---\n{shown}{more}\n--- stderr ---\n{}",
            self.code, self.stderr
        )
    }
}

impl Run {
    /// Asserts exit 0.
    #[track_caller]
    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "s4db failed: {self:?}");
        self
    }

    /// Asserts exit 0 and an empty stderr (no progress bar, no chatter).
    #[track_caller]
    fn ok_quiet(self) -> Run {
        let run = self.ok();
        assert_eq!(run.stderr, "", "expected a quiet stderr: {run:?}");
        run
    }

    fn text(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("stdout is UTF-8")
    }

    #[track_caller]
    fn json(&self) -> Json {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Asserts exit 2 with exactly one line on stderr, and returns that line.
    #[track_caller]
    fn error_line(&self) -> &str {
        assert_eq!(self.code, 2, "expected exit 2: {self:?}");
        assert!(
            self.stderr.ends_with('\n') && self.stderr.trim_end().lines().count() == 1,
            "expected exactly one line on stderr: {self:?}"
        );
        self.stderr.trim_end()
    }
}

/// Runs `cmd` with `args`, feeding `stdin` from a thread (large inputs cannot deadlock).
fn exec(mut cmd: Command, args: &[&str], stdin: &[u8]) -> Run {
    cmd.args(args)
        .env_remove("S4DB_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn s4db");
    let mut child_stdin = child.stdin.take().expect("piped stdin");
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = child_stdin.write_all(&input); // s4db may exit without reading it
    });
    let out = child.wait_with_output().expect("wait for s4db");
    writer.join().expect("stdin writer");
    Run {
        code: out.status.code().expect("s4db was killed by a signal"),
        stdout: out.stdout,
        stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
    }
}

/// The binary with the test AWS environment pointed at moto (and S3, not the local store).
/// The harness points the AWS config files at a path that does not exist, which
/// the SDK warns about: stderr must stay clean of such warnings.
fn cli(moto: &Moto) -> Command {
    let mut cmd = common::s4db_cli(moto);
    cmd.env_remove("S4DB_LOCAL_STORE");
    cmd
}

/// `s4db ARGS --force-path-style` against moto.
fn s4db(moto: &Moto, args: &[&str], stdin: &[u8]) -> Run {
    let mut all = args.to_vec();
    all.push("--force-path-style");
    exec(cli(moto), &all, stdin)
}

/// `s4db ARGS` against moto, exactly as given (no options added).
fn s4db_raw(moto: &Moto, args: &[&str], stdin: &[u8]) -> Run {
    exec(cli(moto), args, stdin)
}

/// `s4db --local-store ROOT ARGS` with no S3 at all: the AWS environment points
/// at a closed port and has no credentials, so any S3 request would fail.
fn s4db_local(root: &Path, args: &[&str], stdin: &[u8]) -> Run {
    let mut all = vec!["--local-store", path(root)];
    all.extend_from_slice(args);
    exec(no_s3_cli(), &all, stdin)
}

/// The binary with an AWS environment under which no S3 request can succeed.
fn no_s3_cli() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_s4db"));
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
        .env("AWS_REGION", common::REGION)
        .env("AWS_CONFIG_FILE", "/nonexistent/s4db-tests/aws-file")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/s4db-tests/aws-file",
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("S4DB_LOCAL_STORE");
    cmd
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("s4db-cli-test-")
        .tempdir()
        .expect("create temp dir")
}

/// Python's `S4DB(bucket, prefix).get(key)`: a JSON string for `str`,
/// `{"b64": ...}` for `bytes`, `null` when missing.
fn py_get(moto: &Moto, bucket: &str, prefix: &str, key: &str) -> Json {
    Py::v10().run(
        moto,
        &["--bucket", bucket, "--prefix", prefix, "get", key],
        b"",
    )["value"]
        .clone()
}

/// Python's sorted keys of the database.
fn py_keys(moto: &Moto, bucket: &str, prefix: &str) -> Vec<String> {
    let dump = Py::v10().run(moto, &["--bucket", bucket, "--prefix", prefix, "dump"], b"");
    serde_json::from_value(dump["keys"].clone()).expect("dump keys")
}

/// Object names under the prefix (prefix removed), sorted.
fn py_files(moto: &Moto, bucket: &str, prefix: &str) -> Vec<String> {
    let files = Py::v10().run(
        moto,
        &["--bucket", bucket, "--prefix", prefix, "files"],
        b"",
    );
    serde_json::from_value(files).expect("file list")
}

fn py_put_object(moto: &Moto, bucket: &str, prefix: &str, name: &str, data: &[u8]) {
    let doc = json!({ "b64": b64(data) }).to_string();
    Py::v10().run(
        moto,
        &["--bucket", bucket, "--prefix", prefix, "put-object", name],
        doc.as_bytes(),
    );
}

fn py_delete_object(moto: &Moto, bucket: &str, prefix: &str, name: &str) {
    Py::v10().run(
        moto,
        &[
            "--bucket",
            bucket,
            "--prefix",
            prefix,
            "delete-object",
            name,
        ],
        b"",
    );
}

fn py_apply(moto: &Moto, bucket: &str, prefix: &str, ops: Json) {
    Py::v10().run(
        moto,
        &["--bucket", bucket, "--prefix", prefix, "apply"],
        ops.to_string().as_bytes(),
    );
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn data_files(names: &[String]) -> Vec<&String> {
    names
        .iter()
        .filter(|n| n.starts_with("data_") && n.ends_with(".s4db"))
        .collect()
}

/// Bytes that are not UTF-8 (0xff never appears in UTF-8), with a NUL and a trailing newline.
const BINARY: &[u8] = b"\x00\x01\xffbinary\xfe\x00\n";

fn jsonl(lines: &[Json]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in lines {
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

// ---------------------------------------------------------------- get / put

#[test]
fn get_prints_exactly_the_value_bytes() {
    let moto = Moto::shared();
    let db = format!("{}/p", moto.unique_bucket());
    s4db(moto, &["put", &db, "bin"], BINARY).ok();
    s4db(moto, &["put", &db, "text", "hello"], b"").ok();

    let got = s4db(moto, &["get", &db, "bin"], b"").ok_quiet();
    assert_eq!(got.stdout, BINARY);
    let got = s4db(moto, &["get", &db, "text"], b"").ok_quiet();
    assert_eq!(got.stdout, b"hello", "no trailing newline may be added");
}

#[test]
fn get_of_a_missing_key_exits_1_naming_the_key() {
    let moto = Moto::shared();
    let db = format!("{}/p", moto.unique_bucket());
    s4db(moto, &["put", &db, "present", "x"], b"").ok();

    let run = s4db(moto, &["get", &db, "no-such-key"], b"");
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert!(run.stderr.contains("no-such-key"), "{run:?}");
}

#[test]
fn put_value_argument_is_stored_as_text() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    s4db(moto, &["put", &db, "k", "text ✓"], b"").ok_quiet();
    assert_eq!(py_get(moto, &bucket, "p/", "k"), json!("text ✓"));
}

#[test]
fn put_from_stdin_stores_utf8_as_text_and_other_bytes_as_binary() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    s4db(moto, &["put", &db, "t"], "line one\nline two\n".as_bytes()).ok_quiet();
    s4db(moto, &["put", &db, "b"], BINARY).ok_quiet();
    s4db(moto, &["put", &db, "empty"], b"").ok_quiet();

    assert_eq!(
        py_get(moto, &bucket, "p/", "t"),
        json!("line one\nline two\n")
    );
    assert_eq!(
        py_get(moto, &bucket, "p/", "b"),
        json!({ "b64": b64(BINARY) })
    );
    assert_eq!(py_get(moto, &bucket, "p/", "empty"), json!(""));
}

#[test]
fn put_of_a_key_too_long_for_the_format_is_refused() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let key = "k".repeat(70_000);
    let run = s4db(moto, &["put", &format!("{bucket}/p"), &key, "v"], b"");
    let line = run.error_line();
    assert!(line.contains("invalid key"), "{run:?}");
    assert_eq!(py_files(moto, &bucket, "p/"), Vec::<String>::new());
}

#[test]
fn options_are_accepted_anywhere_on_the_line() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    let endpoint = moto.endpoint.as_str();
    // Before the subcommand, between it and its arguments, after them, and between them.
    s4db_raw(moto, &["--force-path-style", "put", &db, "a", "1"], b"").ok();
    s4db_raw(
        moto,
        &[
            "put",
            "--force-path-style",
            "--region",
            "us-east-1",
            &db,
            "b",
            "2",
        ],
        b"",
    )
    .ok();
    s4db_raw(
        moto,
        &[
            "put",
            &db,
            "c",
            "3",
            "--endpoint-url",
            endpoint,
            "--force-path-style",
        ],
        b"",
    )
    .ok();
    let got = s4db_raw(
        moto,
        &[
            "get",
            &db,
            "--force-path-style",
            "b",
            "--checksums",
            "when-supported",
        ],
        b"",
    )
    .ok();
    assert_eq!(got.stdout, b"2");
    let keys = s4db_raw(
        moto,
        &["--region", "us-east-1", "keys", &db, "--force-path-style"],
        b"",
    )
    .ok();
    assert_eq!(keys.text(), "a\nb\nc\n");
}

#[test]
fn usage_errors_exit_2() {
    let moto = Moto::shared();
    for args in [
        &["get"][..],
        &["no-such-command", "b"][..],
        &["get", "/p", "k", "--force-path-style"][..],
    ] {
        let run = s4db_raw(moto, args, b"");
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(run.stdout.is_empty(), "{args:?}: {run:?}");
        assert!(!run.stderr.is_empty(), "{args:?}: {run:?}");
    }
}

// ------------------------------------------------------------------ prefixes

#[test]
fn bucket_slash_prefix_is_the_python_prefix_both_ways() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/some/prefix");

    s4db(moto, &["put", &db, "from-cli", "rust wrote this"], b"").ok();
    assert_eq!(
        py_get(moto, &bucket, "some/prefix/", "from-cli"),
        json!("rust wrote this")
    );
    assert!(py_files(moto, &bucket, "some/prefix/").contains(&"index.idx".to_string()));

    py_apply(
        moto,
        &bucket,
        "some/prefix/",
        json!([
            { "op": "put", "items": { "from-python": "python wrote this" } },
            { "op": "upload" },
        ]),
    );
    for spec in [db.clone(), format!("{db}/"), format!("s3://{db}")] {
        let got = s4db(moto, &["get", &spec, "from-python"], b"").ok();
        assert_eq!(got.stdout, b"python wrote this", "{spec}");
    }
    // Nothing leaked to the bucket root or a neighbouring prefix.
    assert_eq!(
        s4db(moto, &["keys", &bucket], b"").ok().text(),
        "",
        "the bare bucket is another database"
    );
    assert_eq!(
        s4db(moto, &["keys", &format!("{bucket}/some")], b"")
            .ok()
            .text(),
        ""
    );
}

// ---------------------------------------------------------------- no-upload

#[test]
fn no_upload_without_local_dir_is_an_error() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let run = s4db(
        moto,
        &["put", &format!("{bucket}/p"), "k", "v", "--no-upload"],
        b"",
    );
    let line = run.error_line();
    assert!(line.contains("--local-dir"), "{run:?}");
    assert_eq!(py_files(moto, &bucket, "p/"), Vec::<String>::new());
}

#[test]
fn no_upload_keeps_writes_local_until_upload_publishes_them() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    let dir = tempdir();
    let local = dir.path().join("work");

    s4db(
        moto,
        &[
            "put",
            &db,
            "k",
            "v1",
            "--no-upload",
            "--local-dir",
            path(&local),
        ],
        b"",
    )
    .ok_quiet();
    s4db(
        moto,
        &["--no-upload", "--local-dir", path(&local), "put", &db, "b"],
        BINARY,
    )
    .ok_quiet();

    // Not in S3: neither Python nor a CLI without the directory sees it.
    assert_eq!(py_files(moto, &bucket, "p/"), Vec::<String>::new());
    assert_eq!(s4db(moto, &["get", &db, "k"], b"").code, 1);
    // The same directory does.
    let got = s4db(moto, &["get", &db, "k", "--local-dir", path(&local)], b"").ok();
    assert_eq!(got.stdout, b"v1");

    s4db(moto, &["upload", &db, "--local-dir", path(&local)], b"").ok_quiet();
    assert_eq!(py_get(moto, &bucket, "p/", "k"), json!("v1"));
    assert_eq!(
        py_get(moto, &bucket, "p/", "b"),
        json!({ "b64": b64(BINARY) })
    );
    assert_eq!(s4db(moto, &["get", &db, "k"], b"").ok().stdout, b"v1");
}

// ------------------------------------------------------------- delete / keys

#[test]
fn delete_removes_the_existing_keys_and_uploads() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    for k in ["a", "b", "c"] {
        s4db(moto, &["put", &db, k, k], b"").ok();
    }
    let run = s4db(moto, &["delete", &db, "a", "missing", "c"], b"").ok();
    assert!(run.stdout.is_empty(), "{run:?}");

    assert_eq!(py_keys(moto, &bucket, "p/"), ["b"]);
    assert_eq!(py_get(moto, &bucket, "p/", "a"), Json::Null);
    assert_eq!(s4db(moto, &["keys", &db], b"").ok().text(), "b\n");
}

#[test]
fn keys_prints_one_key_per_line_sorted() {
    let moto = Moto::shared();
    let db = format!("{}/p", moto.unique_bucket());
    let lines: Vec<Json> = ["zeta", "alpha", "Beta", "ключ", "alpha/2"]
        .iter()
        .map(|k| json!({ "key": k, "value": "v" }))
        .collect();
    s4db(moto, &["import", &db], &jsonl(&lines)).ok();

    let run = s4db(moto, &["keys", &db], b"").ok_quiet();
    assert_eq!(run.text(), "Beta\nalpha\nalpha/2\nzeta\nключ\n");
    let run = s4db(moto, &["keys", &db, "--prefix", "alpha"], b"").ok_quiet();
    assert_eq!(run.text(), "alpha\nalpha/2\n");
}

#[test]
fn keys_null_separates_with_nul_bytes() {
    let moto = Moto::shared();
    let db = format!("{}/p", moto.unique_bucket());
    s4db(moto, &["put", &db, "two\nlines", "x"], b"").ok();
    s4db(moto, &["put", &db, "a", "x"], b"").ok();

    let run = s4db(moto, &["keys", "--null", &db], b"").ok_quiet();
    assert_eq!(run.stdout, b"a\0two\nlines\0");
}

// ---------------------------------------------------------- import / export

#[test]
fn import_reads_json_lines_and_uploads_once() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    let mut lines: Vec<Json> = (0..2500)
        .map(|i| json!({ "key": format!("k{i:05}"), "value": format!("value {i}") }))
        .collect();
    lines.push(json!({ "key": "bin", "value_base64": b64(BINARY) }));
    let mut input = jsonl(&lines);
    input.extend_from_slice(b"\n   \n"); // blank lines are skipped

    // --batch smaller than the input: several put batches, still one upload.
    let run = s4db(moto, &["import", &db, "--batch", "1000"], &input).ok();
    assert_eq!(
        run.stderr, "s4db: imported 2501 keys\n",
        "no progress bar on a pipe"
    );

    let stats = s4db(moto, &["stats", &db], b"").ok_quiet().json();
    assert_eq!(stats["keys"], 2501, "{stats}");
    let files = py_files(moto, &bucket, "p/");
    assert_eq!(
        data_files(&files).len(),
        1,
        "one writer, one upload: {files:?}"
    );
    assert_eq!(py_get(moto, &bucket, "p/", "k01234"), json!("value 1234"));
    assert_eq!(
        py_get(moto, &bucket, "p/", "bin"),
        json!({ "b64": b64(BINARY) })
    );
}

#[test]
fn import_of_a_bad_line_exits_2_naming_the_line_and_uploads_nothing() {
    let moto = Moto::shared();
    let good = r#"{"key": "ok", "value": "v"}"#;
    let bad_lines = [
        "not json",
        r#"{"key": "k"}"#,
        r#"{"key": "k", "value": "v", "value_base64": "AA=="}"#,
        r#"{"key": "k", "value_base64": "*** not base64 ***"}"#,
        r#"{"key": "k", "value": 3}"#,
        r#"{"value": "v"}"#,
        r#"{"key": "k", "value": "v", "extra": 1}"#,
    ];
    for bad in bad_lines {
        let bucket = moto.unique_bucket();
        let db = format!("{bucket}/p");
        // The bad line comes after a full --batch, so a put batch was already written.
        let input = format!("{good}\n{good}\n\n{bad}\n{good}\n");
        let run = s4db(moto, &["import", &db, "--batch", "1"], input.as_bytes());
        let line = run.error_line();
        assert!(line.contains("line 4"), "{bad}: {run:?}");
        assert_eq!(py_files(moto, &bucket, "p/"), Vec::<String>::new(), "{bad}");
    }
}

#[test]
fn a_failed_import_leaves_nothing_in_the_local_dir_for_a_later_upload() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    let dir = tempdir();
    let input = "{\"key\": \"a\", \"value\": \"1\"}\n{\"key\": \"b\", \"value\": \"2\"}\nbad\n";
    let run = s4db(
        moto,
        &[
            "import",
            &db,
            "--batch",
            "1",
            "--local-dir",
            path(dir.path()),
        ],
        input.as_bytes(),
    );
    assert!(run.error_line().contains("line 3"), "{run:?}");
    s4db(
        moto,
        &["put", &db, "c", "3", "--local-dir", path(dir.path())],
        b"",
    )
    .ok();
    assert_eq!(py_keys(moto, &bucket, "p/"), vec!["c"]);
}

#[test]
fn a_reader_that_goes_away_is_not_an_error() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    let lines: Vec<Json> = (0..5000)
        .map(|i| serde_json::json!({"key": format!("key-{i:05}"), "value": "v"}))
        .collect();
    s4db(moto, &["import", &db], &jsonl(&lines)).ok();
    let mut cmd = cli(moto);
    cmd.args(["keys", &db, "--force-path-style"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    drop(child.stdout.take()); // like `| head -0`
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn import_of_a_non_utf8_line_names_the_line() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let mut input = b"{\"key\": \"a\", \"value\": \"v\"}\n".to_vec();
    input.extend_from_slice(b"{\"key\": \"b\", \"value\": \"\xff\"}\n");
    let run = s4db(moto, &["import", &format!("{bucket}/p")], &input);
    let line = run.error_line();
    assert!(line.contains("line 2"), "{run:?}");
    assert_eq!(py_files(moto, &bucket, "p/"), Vec::<String>::new());
}

#[test]
fn export_round_trips_import() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    let big_text: String = (0..(1 << 20) / 16).map(|i| format!("{i:015x}\n")).collect();
    let mut lines = vec![
        json!({ "key": "text", "value": "plain text" }),
        json!({ "key": "empty text", "value": "" }),
        json!({ "key": "binary", "value_base64": b64(BINARY) }),
        json!({ "key": "empty binary", "value_base64": "" }),
        json!({ "key": "unicode/ключ/日本語/🔑", "value": "значение ✓ 値" }),
        json!({ "key": "quote\" back\\slash\ttab\nnewline", "value": "x" }),
        json!({ "key": "big binary", "value_base64": b64(&noise(1 << 20)) }),
        json!({ "key": "big text", "value": big_text }),
    ];
    s4db(moto, &["import", &db], &jsonl(&lines)).ok();

    let run = s4db(moto, &["export", &db], b"").ok_quiet();
    let exported: Vec<Json> = run
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("export line is JSON"))
        .collect();
    lines.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
    assert_eq!(exported, lines);

    // Re-importing the export into another database gives the same export.
    let copy = format!("{bucket}/copy");
    s4db(moto, &["import", &copy], &run.stdout).ok();
    assert_eq!(s4db(moto, &["export", &copy], b"").ok().stdout, run.stdout);
    // And Python agrees on the types.
    assert_eq!(py_get(moto, &bucket, "copy/", "empty text"), json!(""));
    assert_eq!(
        py_get(moto, &bucket, "copy/", "empty binary"),
        json!({ "b64": "" })
    );
}

// ------------------------------------------------------------- maintenance

#[test]
fn upload_and_download_mirror_the_data_files() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    s4db(moto, &["put", &db, "a", "1"], b"").ok();
    s4db(moto, &["put", &db, "b", "2"], b"").ok();

    let dir = tempdir();
    let local = dir.path().join("mirror");
    s4db(moto, &["download", &db, "--local-dir", path(&local)], b"").ok_quiet();
    let mut local_files: Vec<String> = std::fs::read_dir(&local)
        .expect("read the download dir")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("data_") && n.ends_with(".s4db"))
        .collect();
    local_files.sort();
    let remote = py_files(moto, &bucket, "p/");
    assert_eq!(local_files.iter().collect::<Vec<_>>(), data_files(&remote));
    assert_eq!(local_files.len(), 2);

    // upload with nothing to publish is fine and says so.
    let report = s4db(moto, &["upload", &db, "--local-dir", path(&local)], b"")
        .ok_quiet()
        .json();
    assert_eq!(report["committed"], false, "{report}");
}

#[test]
fn download_without_local_dir_is_an_error() {
    let moto = Moto::shared();
    let db = format!("{}/p", moto.unique_bucket());
    let run = s4db(moto, &["download", &db], b"");
    assert!(run.error_line().contains("--local-dir"), "{run:?}");
}

#[test]
fn compact_prints_json_and_keeps_every_value() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    s4db(moto, &["put", &db, "k", "old"], b"").ok();
    s4db(moto, &["put", &db, "k", "new"], b"").ok();
    s4db(moto, &["put", &db, "gone", "x"], b"").ok();
    s4db(moto, &["put", &db, "bin"], BINARY).ok();
    s4db(moto, &["delete", &db, "gone"], b"").ok();

    let report = s4db(moto, &["compact", &db, "--full"], b"")
        .ok_quiet()
        .json();
    assert_eq!(report["keys"], 2, "{report}");
    assert!(report["files_after"].is_u64(), "{report}");

    assert_eq!(s4db(moto, &["get", &db, "k"], b"").ok().stdout, b"new");
    assert_eq!(s4db(moto, &["get", &db, "bin"], b"").ok().stdout, BINARY);
    assert_eq!(s4db(moto, &["get", &db, "gone"], b"").code, 1);
    assert_eq!(py_keys(moto, &bucket, "p/"), ["bin", "k"]);
    assert_eq!(py_get(moto, &bucket, "p/", "k"), json!("new"));
    let stats = s4db(moto, &["stats", &db], b"").ok().json();
    assert_eq!(stats["data_files"], 1, "{stats}");

    // The files of the other writers' dead entries are gc's to delete.
    s4db(moto, &["gc", &db, "--grace", "0"], b"").ok_quiet();
    let files = py_files(moto, &bucket, "p/");
    assert_eq!(data_files(&files).len(), 1, "{files:?}");
    assert_eq!(
        py_get(moto, &bucket, "p/", "bin"),
        json!({ "b64": b64(BINARY) })
    );
}

#[test]
fn rebuild_index_from_s3_recovers_a_deleted_index() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    // Distinct keys per process: the replay order of writers is their upload
    // time, which S3 gives to the second, so two commands within one second
    // that touch the same key have no order to recover.
    let lines = jsonl(&[
        json!({ "key": "a", "value": "1" }),
        json!({ "key": "c", "value": "3" }),
    ]);
    s4db(moto, &["import", &db], &lines).ok();
    s4db(moto, &["put", &db, "b"], BINARY).ok();

    py_delete_object(moto, &bucket, "p/", "index.idx");
    assert_eq!(s4db(moto, &["keys", &db], b"").ok().text(), "");

    let report = s4db(moto, &["rebuild-index", &db, "--from-s3"], b"")
        .ok()
        .json();
    assert_eq!(report, json!({ "files": 2, "keys": 3, "torn": [] }));

    assert_eq!(s4db(moto, &["keys", &db], b"").ok().text(), "a\nb\nc\n");
    assert_eq!(s4db(moto, &["get", &db, "b"], b"").ok().stdout, BINARY);
    assert_eq!(py_get(moto, &bucket, "p/", "a"), json!("1"));
    assert_eq!(
        py_get(moto, &bucket, "p/", "b"),
        json!({ "b64": b64(BINARY) })
    );
}

#[test]
fn get_with_a_corrupt_index_exits_2_with_one_line() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    s4db(moto, &["put", &db, "a", "1"], b"").ok();
    py_put_object(
        moto,
        &bucket,
        "p/",
        "index.idx",
        b"\x02garbage, not an index",
    );

    let run = s4db(moto, &["get", &db, "a"], b"");
    let line = run.error_line();
    assert!(line.contains("index.idx"), "{run:?}");
    assert!(line.contains("corrupt"), "{run:?}");
    assert!(line.contains("rebuild-index"), "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
}

#[test]
fn rebuild_index_from_s3_recovers_a_corrupt_index() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    s4db(moto, &["put", &db, "a", "1"], b"").ok();
    s4db(moto, &["put", &db, "b", "2"], b"").ok();
    py_put_object(
        moto,
        &bucket,
        "p/",
        "index.idx",
        b"\x02garbage, not an index",
    );

    let report = s4db(moto, &["rebuild-index", "--from-s3", &db], b"")
        .ok()
        .json();
    assert_eq!(report["keys"], 2, "{report}");

    assert_eq!(s4db(moto, &["get", &db, "a"], b"").ok().stdout, b"1");
    assert_eq!(py_get(moto, &bucket, "p/", "b"), json!("2"));
}

#[test]
fn gc_deletes_unreferenced_data_files_older_than_the_grace() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    s4db(moto, &["put", &db, "a", "1"], b"").ok();
    let stray = "data_0badc0de_000001.s4db";
    py_put_object(moto, &bucket, "p/", stray, b"S4DB\x02\x00\x00\x00\x01");

    // The default grace (a day) keeps the young stray file.
    let out = s4db(moto, &["gc", &db], b"").ok_quiet().json();
    assert_eq!(out, json!({ "deleted": [] }));

    let out = s4db(moto, &["gc", &db, "--grace", "0"], b"")
        .ok_quiet()
        .json();
    assert_eq!(out, json!({ "deleted": [stray] }));
    assert!(!py_files(moto, &bucket, "p/").contains(&stray.to_string()));
    assert_eq!(s4db(moto, &["get", &db, "a"], b"").ok().stdout, b"1");
}

#[test]
fn stats_prints_json_with_the_key_count() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/some/prefix");
    let empty = s4db(moto, &["stats", &db], b"").ok_quiet().json();
    assert_eq!(empty["keys"], 0, "{empty}");

    s4db(moto, &["put", &db, "a", "1"], b"").ok();
    s4db(moto, &["put", &db, "b", "2"], b"").ok();
    let stats = s4db(moto, &["stats", &db], b"").ok_quiet().json();
    assert_eq!(stats["keys"], 2, "{stats}");
    assert_eq!(stats["prefix"], "some/prefix/", "{stats}");
    assert_eq!(stats["data_files"], 2, "{stats}");
}

// ------------------------------------------------------------------ errors

#[test]
fn unreachable_endpoint_exits_2_with_one_line_naming_it() {
    let moto = Moto::shared();
    let run = s4db(
        moto,
        &[
            "get",
            "bucket/p",
            "k",
            "--endpoint-url",
            "http://127.0.0.1:1",
        ],
        b"",
    );
    let line = run.error_line();
    assert!(line.contains("127.0.0.1:1"), "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
}

#[test]
fn missing_bucket_exits_2_with_one_line() {
    let moto = Moto::shared();
    let bucket = format!("never-created-{}", std::process::id());
    for args in [
        vec!["get", &bucket, "k"],
        vec!["put", &bucket, "k", "v"],
        vec!["keys", &bucket],
    ] {
        let run = s4db(moto, &args, b"");
        let line = run.error_line();
        assert!(
            line.contains("NoSuchBucket") || line.contains(&bucket),
            "{args:?}: {run:?}"
        );
        assert!(run.stdout.is_empty(), "{args:?}: {run:?}");
    }
}

#[test]
fn writing_while_another_process_holds_the_local_dir_fails_naming_it() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    let dir = tempdir();
    let local = dir.path().join("busy");
    std::fs::create_dir(&local).unwrap(); // an existing directory is locked at open

    // An import reading from a pipe we keep open holds the directory.
    let mut holder = cli(moto);
    holder
        .args([
            "import",
            &db,
            "--force-path-style",
            "--local-dir",
            path(&local),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut holder = holder.spawn().expect("spawn the holder");
    let pid = holder.id().to_string();
    let lock_file = local.join("s4db.lock");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(&lock_file).unwrap_or_default() != pid {
        if let Some(status) = holder.try_wait().unwrap() {
            panic!("the holder exited ({status}) before taking the lock");
        }
        assert!(Instant::now() < deadline, "the holder never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }

    for args in [
        vec!["put", &db, "k", "v"],
        vec!["delete", &db, "k"],
        vec!["import", &db],
    ] {
        let mut all = args.clone();
        all.extend(["--local-dir", path(&local)]);
        let run = s4db(moto, &all, b"");
        let line = run.error_line();
        assert!(line.contains(path(&local)), "{args:?}: {run:?}");
        assert!(line.contains(&pid), "the holder's pid: {run:?}");
    }

    // The holder is unharmed: it finishes its import once its input ends.
    let mut stdin = holder.stdin.take().unwrap();
    stdin
        .write_all(b"{\"key\": \"held\", \"value\": \"v\"}\n")
        .unwrap();
    drop(stdin);
    let out = holder.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "holder: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(py_get(moto, &bucket, "p/", "held"), json!("v"));
    assert_eq!(py_get(moto, &bucket, "p/", "k"), Json::Null);
}

// -------------------------------------------------------------- local store

#[test]
fn local_store_backend_works_without_s3() {
    let root = tempdir();
    let db = "bucket/some/prefix";
    let run = |args: &[&str], stdin: &[u8]| s4db_local(root.path(), args, stdin);

    run(&["put", db, "t", "text"], b"").ok_quiet();
    run(&["put", db, "b"], BINARY).ok_quiet();
    let lines = jsonl(&[
        json!({ "key": "i1", "value": "one" }),
        json!({ "key": "i2", "value_base64": b64(b"\xff") }),
    ]);
    assert_eq!(
        run(&["import", db], &lines).ok().stderr,
        "s4db: imported 2 keys\n"
    );
    run(&["delete", db, "i1"], b"").ok_quiet();

    assert_eq!(run(&["get", db, "b"], b"").ok_quiet().stdout, BINARY);
    assert_eq!(run(&["get", db, "t"], b"").ok_quiet().stdout, b"text");
    assert_eq!(run(&["get", db, "i1"], b"").code, 1);
    assert_eq!(run(&["keys", db], b"").ok_quiet().text(), "b\ni2\nt\n");
    assert_eq!(run(&["stats", db], b"").ok_quiet().json()["keys"], 3);
    let export = run(&["export", db], b"").ok_quiet().text();
    assert_eq!(
        export
            .lines()
            .next()
            .map(|l| serde_json::from_str::<Json>(l).unwrap()),
        Some(json!({ "key": "b", "value_base64": b64(BINARY) }))
    );
    run(&["compact", db], b"").ok_quiet().json();
    assert_eq!(run(&["get", db, "b"], b"").ok_quiet().stdout, BINARY);

    // Objects are files under ROOT/bucket/, at the S3 key the prefix gives.
    let objects = root.path().join("bucket/some/prefix");
    assert!(objects.join("index.idx").is_file());
    let names: Vec<String> = std::fs::read_dir(&objects)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("data_") && n.ends_with(".s4db")),
        "{names:?}"
    );
}

#[test]
fn local_store_can_come_from_the_environment() {
    let root = tempdir();
    let mut cmd = no_s3_cli();
    cmd.env("S4DB_LOCAL_STORE", root.path());
    exec(cmd, &["put", "b", "k", "v"], b"").ok_quiet();
    assert_eq!(
        s4db_local(root.path(), &["get", "b", "k"], b"").ok().stdout,
        b"v"
    );
}

#[test]
fn local_store_no_upload_keeps_writes_until_upload() {
    let root = tempdir();
    let dir = tempdir();
    let local = dir.path().join("w");
    let db = "bucket/p";
    s4db_local(
        root.path(),
        &[
            "put",
            db,
            "k",
            "v",
            "--no-upload",
            "--local-dir",
            path(&local),
        ],
        b"",
    )
    .ok_quiet();
    assert_eq!(s4db_local(root.path(), &["get", db, "k"], b"").code, 1);
    s4db_local(
        root.path(),
        &["upload", db, "--local-dir", path(&local)],
        b"",
    )
    .ok_quiet();
    assert_eq!(
        s4db_local(root.path(), &["get", db, "k"], b"").ok().stdout,
        b"v"
    );
}

#[test]
fn keys_and_values_starting_with_a_dash_follow_double_dash() {
    let root = tempdir();
    let run = |args: &[&str]| s4db_local(root.path(), args, b"");
    let refused = run(&["put", "b", "k", "-5"]);
    assert_eq!(refused.code, 2, "{refused:?}");
    run(&["put", "b", "--", "-key", "-5"]).ok_quiet();
    assert_eq!(run(&["get", "b", "--", "-key"]).ok_quiet().stdout, b"-5");
}

#[test]
fn long_operations_show_progress_on_a_terminal() {
    // `script` runs the command on a pseudo-terminal, as a user's shell would.
    let root = tempdir();
    let input = root.path().join("in.jsonl");
    let lines: Vec<Json> = (0..5000)
        .map(|i| serde_json::json!({"key": format!("k{i}"), "value": "v"}))
        .collect();
    std::fs::write(&input, jsonl(&lines)).unwrap();
    let command = format!(
        "{} --local-store {} import demo/p --batch 100 < {}",
        env!("CARGO_BIN_EXE_s4db"),
        path(root.path()),
        path(&input)
    );
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("script(1) from util-linux runs the command on a terminal");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("importing: "),
        "no progress on a terminal: {shown}"
    );
    assert!(shown.contains("imported 5000 keys"), "{shown}");
}

#[test]
fn credentials_region_and_endpoint_can_come_from_a_named_profile() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    let dir = tempdir();
    let config = dir.path().join("config");
    let credentials = dir.path().join("credentials");
    std::fs::write(
        &config,
        format!(
            "[profile s4db-test]\nregion = {}\nendpoint_url = {}\n",
            common::REGION,
            moto.endpoint
        ),
    )
    .unwrap();
    std::fs::write(
        &credentials,
        format!(
            "[s4db-test]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            common::ACCESS_KEY,
            common::SECRET_KEY
        ),
    )
    .unwrap();
    let profile_cli = || {
        let mut cmd = no_s3_cli();
        cmd.env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_REGION")
            .env("AWS_CONFIG_FILE", &config)
            .env("AWS_SHARED_CREDENTIALS_FILE", &credentials);
        cmd
    };
    let args = ["--profile", "s4db-test", "--force-path-style"];
    let put = [&["put", &db, "k", "from a profile"][..], &args[..]].concat();
    exec(profile_cli(), &put, b"").ok_quiet();
    let get = [&["get", &db, "k"][..], &args[..]].concat();
    assert_eq!(
        exec(profile_cli(), &get, b"").ok().stdout,
        b"from a profile"
    );
    assert_eq!(py_get(moto, &bucket, "p/", "k"), json!("from a profile"));
    // Without the profile nothing reaches moto.
    let run = exec(profile_cli(), &["get", &db, "k", "--force-path-style"], b"");
    assert_eq!(run.code, 2, "{run:?}");
}

// -------------------------------------------------------------- attributes

fn attrs_json(mode: &str, uid: u32, secs: i64) -> Json {
    json!({
        "kind": "regular",
        "mode": mode,
        "mode_numeric": u16::from_str_radix(mode, 8).unwrap(),
        "uid": uid,
        "gid": 20,
        "rdev": 0,
        "atime": { "secs": secs, "nanos": 5 },
        "mtime": { "secs": 1_600_000_000, "nanos": 999_999_999 },
        "ctime": { "secs": 0, "nanos": 0 },
        "link_id": 0,
        "xattrs": { "user.note": b64(b"\x00\xffhi") },
    })
}

#[test]
fn import_and_export_carry_attributes_and_stat_prints_them() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    let mut dir = attrs_json("0750", 1, 10);
    dir["kind"] = json!("dir");
    let lines = vec![
        json!({ "dir": "empty/dir", "attrs": dir }),
        json!({ "key": "a", "value": "1", "attrs": attrs_json("0640", 1000, -86_400) }),
        json!({ "key": "b", "value_base64": b64(b"\x01\x02"), "attrs": attrs_json("4755", 0, 7) }),
        json!({ "key": "plain", "value": "no attributes" }),
    ];
    s4db(moto, &["import", &db], &jsonl(&lines)).ok();

    let run = s4db(moto, &["stat", &db, "a"], b"").ok_quiet();
    assert_eq!(
        run.json(),
        json!({ "key": "a", "attrs": attrs_json("0640", 1000, -86_400) })
    );
    let run = s4db(moto, &["stat", &db, "plain"], b"").ok();
    assert_eq!(run.json(), json!({ "key": "plain", "attrs": null }));
    assert!(run.stderr.contains("no attributes"), "{run:?}");
    let run = s4db(moto, &["stat", &db, "empty/dir"], b"").ok_quiet();
    assert_eq!(run.json(), json!({ "dir": "empty/dir", "attrs": dir }));
    let run = s4db(moto, &["stat", &db, "missing"], b"");
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("\"missing\""), "{run:?}");

    // Export writes the directory lines first, then the keys with their attributes.
    let run = s4db(moto, &["export", &db], b"").ok_quiet();
    let exported: Vec<Json> = run
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported, lines);
    let copy = format!("{bucket}/copy");
    s4db(moto, &["import", &copy], &run.stdout).ok();
    assert_eq!(s4db(moto, &["export", &copy], b"").ok().stdout, run.stdout);

    let stats = s4db(moto, &["stats", &db], b"").ok().json();
    assert_eq!(stats["keys_with_attrs"], json!(2));
    assert_eq!(stats["dirs_with_attrs"], json!(1));
    // Python reads the keys; the attribute object is not one of them.
    assert_eq!(py_keys(moto, &bucket, "p/"), vec!["a", "b", "plain"]);
}

#[test]
fn import_rejects_bad_attributes_naming_the_line() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let db = format!("{bucket}/p");
    let mut bad = attrs_json("0640", 1, 0);
    bad["mode_numeric"] = json!(1);
    let lines = vec![
        json!({ "key": "ok", "value": "1" }),
        json!({ "key": "x", "value": "1", "attrs": bad }),
    ];
    let run = s4db(moto, &["import", &db], &jsonl(&lines));
    let line = run.error_line();
    assert!(line.contains("line 2") && line.contains("mode"), "{line}");
}
