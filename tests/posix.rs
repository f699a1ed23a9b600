//! Files keep what a POSIX filesystem keeps (issue 9): modes, owners, times, symlinks,
//! fifos, hard links, xattrs and empty directories, measured against local disk.
//!
//! - pjdfstest on a real mount and on a local temp dir in the same run; a case failing on
//!   the mount must be listed in `tests/pjdfstest-expected-failures.txt`, and a listed
//!   case that passes must be removed from it (the list only shrinks).
//! - Real programs (tar, rsync, cp, git, chmod, ln, mkfifo, setfattr/getfattr, mkdir,
//!   umask, runuser) run the same steps on a local temp dir and on the mount; their
//!   output and a listing of the result (mode, owner, size, links, mtime, type, symlink
//!   target, contents, xattrs) must agree; then the mount is unmounted, the bucket mounted
//!   again with a fresh local directory (another machine's view), and compared again.
//!
//! Runs as root (owners, trusted.* xattrs, other users). A missing tool, moto or /dev/fuse
//! fails the test, never skips it: `scripts/test.sh --setup-only` installs them.

mod common;

use common::mount::*;
use common::repo_root;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The non-root user of these tests and pjdfstest's second dummy_auth entry.
const USER: &str = "tests";
/// The cases allowed to fail on the mount (one `case-name  # reason` per line).
const EXPECTED_FAILURES: &str = "tests/pjdfstest-expected-failures.txt";

/// Prints every entry under `.` (sorted, `.` itself left out): mode, owner, size and link
/// count (not for directories: their sizes and counts are the filesystem's own), mtime in
/// whole seconds, type, name (with the target of a symlink), the MD5 of a regular file's
/// contents and its `user.*`/`trusted.*` xattrs.
const LIST: &str = r#"
find . -mindepth 1 | LC_ALL=C sort | while IFS= read -r f; do
  if [ -d "$f" ] && [ ! -L "$f" ]; then
    stat -c '%A %u %g - - %Y %F %N' -- "$f"
  else
    stat -c '%A %u %g %s %h %Y %F %N' -- "$f"
  fi
  if [ -f "$f" ] && [ ! -L "$f" ]; then echo "    md5 $(md5sum < "$f" | cut -c1-32)"; fi
  getfattr -h -d -m '^(user|trusted)\.' -- "$f" 2>/dev/null | grep -v '^#' | grep . \
    | LC_ALL=C sort | sed 's/^/    xattr /' || true
done
"#;

/// Builds the source tree of the copy tests in `$1` on local disk (as root): the modes
/// people keep (0755, 0600, 0444, setuid 4755, setgid 2775 and sticky 1777 directories),
/// owners root, nobody and tests, a 2001 mtime (981173106) on everything but `recent` (which keeps
/// its nanoseconds), symlinks (to a file, a directory, nowhere), a hard link, an empty
/// directory, a fifo, a binary file, a deep path and a user xattr.
const FIXTURE: &str = r#"
mkdir -p "$1" && cd "$1"
printf 'run me\n' > exec755 && chmod 0755 exec755
printf 'secret\n' > private600 && chown nobody:nogroup private600 && chmod 0600 private600
printf 'read only\n' > ro444 && chmod 0444 ro444
printf '#!/bin/sh\necho setuid\n' > setuid4755 && chown tests:tests setuid4755 && chmod 4755 setuid4755
mkdir setgid2775 && chown root:tests setgid2775 && chmod 2775 setgid2775
printf 'in a setgid dir\n' > setgid2775/inner && chown root:tests setgid2775/inner
mkdir sticky1777 && chmod 1777 sticky1777
printf 'theirs\n' > sticky1777/theirs && chown tests:tests sticky1777/theirs
mkdir -p deep/a/b && printf 'deep\n' > deep/a/b/file
head -c 100000 /dev/urandom > binary.bin
ln -s exec755 link-to-file
ln -s deep/a link-to-dir
ln -s ../nowhere dangling
ln ro444 hardlink-to-ro444
mkdir empty-dir
mkfifo fifo && chmod 0640 fifo
setfattr -n user.origin -v fixture exec755
find . -mindepth 1 -depth -exec touch -h -d @981173106 {} +  # 2001-02-03 04:05:06 UTC
printf 'now\n' > recent
"#;

// ------------------------------------------------------------------ set-up

/// Panics unless every program runs (`--version`), naming its Debian package.
fn require_programs(programs: &[(&str, &str)]) {
    for (program, package) in programs {
        require_program(program, package);
    }
}

/// Root, and the user [`USER`] (made when missing, as scripts/test.sh does).
fn require_root_and_user() -> &'static str {
    static MADE: OnceLock<()> = OnceLock::new();
    MADE.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "tests/posix.rs sets owners, trusted.* xattrs and switches users: run it as root"
        );
        let exists = Command::new("id").arg(USER).output().expect("run id");
        if !exists.status.success() {
            sh_in(Path::new("/"), &format!("useradd -M -U {USER}")).ok();
        }
    });
    USER
}

/// Lines of `a` not in `b` and of `b` not in `a`, for failure messages.
fn line_diff(a: &str, b: &str) -> String {
    let (la, lb): (BTreeSet<&str>, BTreeSet<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out = String::new();
    for l in a.lines().filter(|l| !lb.contains(l)) {
        out.push_str(&format!("- local: {l}\n"));
    }
    for l in b.lines().filter(|l| !la.contains(l)) {
        out.push_str(&format!("+ mount: {l}\n"));
    }
    out
}

// ------------------------------------------------------------------ both sides

/// One test's two sides: directory `work/<name>` on local disk and `<name>` on the mount
/// (mounted with `--allow-other`, so other users get in), plus a local `fixture/` and
/// scratch space that outlive remounts.
struct Sides {
    db: Db,
    mount: Option<Mount>,
    local: tempfile::TempDir,
    name: String,
}

impl Sides {
    fn new(name: &str) -> Sides {
        require_root_and_user();
        let db = Db::new();
        let mount = Mount::on(&db).args(&["--allow-other"]).start();
        fs::create_dir(mount.path(name))
            .unwrap_or_else(|e| panic!("mkdir {name} on the mount: {e}\n{}", mount.output()));
        let local = tempdir("posix-local");
        fs::create_dir_all(local.path().join("work").join(name)).expect("mkdir local side");
        Sides {
            db,
            mount: Some(mount),
            local,
            name: name.to_string(),
        }
    }

    fn mount(&self) -> &Mount {
        self.mount.as_ref().expect("mounted")
    }

    fn local_dir(&self) -> PathBuf {
        self.local.path().join("work").join(&self.name)
    }

    fn mount_dir(&self) -> PathBuf {
        self.mount().path(&self.name)
    }

    /// A scratch path on local disk, outside both sides.
    fn scratch(&self, rel: &str) -> PathBuf {
        self.local.path().join(rel)
    }

    /// Builds [`FIXTURE`] at `scratch("fixture")` and returns it.
    fn fixture(&self) -> PathBuf {
        let dir = self.scratch("fixture");
        let script = format!("set -- {}\n{FIXTURE}", q(&dir));
        sh_in(self.local.path(), &script).ok();
        dir
    }

    /// `sh -ec SCRIPT` in `dir` with umask 022 and `$SRC` (the fixture's path) and
    /// `$SCRATCH` (the scratch root) set.
    fn run_in(&self, dir: &Path, script: &str) -> Sh {
        let full = format!(
            "umask 022\nSRC={}/fixture\nSCRATCH={}\n{script}",
            q(self.local.path()),
            q(self.local.path())
        );
        sh_in(dir, &full)
    }

    /// Runs `script` on both sides: (local, mount).
    fn both(&self, script: &str) -> (Sh, Sh) {
        (
            self.run_in(&self.local_dir(), script),
            self.run_in(&self.mount_dir(), script),
        )
    }

    /// Runs `script` on both sides; asserts both exit 0 with the same stdout, and returns it.
    #[track_caller]
    fn same(&self, what: &str, script: &str) -> String {
        let (local, mount) = self.both(script);
        self.assert_same(what, &local, &mount);
        local.text()
    }

    #[track_caller]
    fn assert_same(&self, what: &str, local: &Sh, mount: &Sh) {
        let (lt, mt) = (
            String::from_utf8_lossy(&local.stdout),
            String::from_utf8_lossy(&mount.stdout),
        );
        if local.code != Some(0) {
            panic!("{what}: the script fails on local disk (a test bug):\n{local:?}");
        }
        if mount.code != Some(0) || lt != mt {
            panic!(
                "{what}: the mount differs from local disk\n\
                 === diff ===\n{}\n=== local disk ===\n{local:?}\n=== mount ===\n{mount:?}\n\
                 === daemon output (tail) ===\n{}",
                line_diff(&lt, &mt),
                self.mount().output()
            );
        }
    }

    /// Unmounts (publishing everything) and mounts the bucket again with a fresh local
    /// directory and mount point: what another machine sees.
    #[track_caller]
    fn remount(&mut self) {
        self.mount.take().expect("mounted").unmount();
        self.mount = Some(Mount::on(&self.db).args(&["--allow-other"]).start());
    }

    /// Compares [`LIST`] of both sides; returns the local listing.
    #[track_caller]
    fn same_listing(&self, what: &str) -> String {
        self.same(&format!("{what}: listing"), LIST)
    }

    fn unmount(mut self) {
        self.mount.take().expect("mounted").unmount();
    }
}

// ======================================================= 1. pjdfstest

/// Case name -> "ok" / "FAILED" / "skipped", and the first message line of each failure.
type PjdResults = (BTreeMap<String, String>, BTreeMap<String, String>);

/// Parses pjdfstest's output: `name   ok|FAILED|skipped` lines, each failure followed by
/// a tab-indented message.
fn parse_pjdfstest(text: &str) -> PjdResults {
    let (mut results, mut messages) = (BTreeMap::new(), BTreeMap::new());
    let mut last_failed: Option<String> = None;
    for line in text.lines() {
        if let Some(msg) = line.strip_prefix('\t') {
            if let Some(name) = last_failed.take() {
                messages.insert(name, msg.trim().to_string());
            }
            continue;
        }
        last_failed = None;
        let mut words = line.split_whitespace();
        let (Some(name), Some(status), None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        if name.contains("::") && ["ok", "FAILED", "skipped"].contains(&status) {
            if status == "FAILED" {
                last_failed = Some(name.to_string());
            }
            results.insert(name.to_string(), status.to_string());
        }
    }
    (results, messages)
}

/// The case names of [`EXPECTED_FAILURES`] (`#` starts a comment).
fn expected_failures() -> BTreeSet<String> {
    let path = repo_root().join(EXPECTED_FAILURES);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
    text.lines()
        .filter_map(|l| l.split('#').next()?.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn passed(results: &BTreeMap<String, String>) -> usize {
    results.values().filter(|s| *s == "ok").count()
}

#[test]
fn pjdfstest_fails_on_the_mount_only_the_listed_cases() {
    require_root_and_user();
    let db = Db::new();
    // Short paths: the socket cases bind(2) names under them (108 bytes at most).
    let short = |what: &str| {
        let dir = tempfile::Builder::new()
            .prefix(what)
            .tempdir_in("/tmp")
            .expect("create temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        dir
    };
    let mnt = short("pjdm");
    let local = short("pjdl");
    let mnt_path = fs::canonicalize(mnt.path()).expect("canonicalize");
    // The embedded local store, not moto: this is about the filesystem's
    // semantics, and pjdfstest leaves a 2 GiB data file (a file it truncated
    // that far) whose multipart upload at unmount took moto 40-85 s on a busy
    // machine, and once failed with a 500. The S3 paths have their own tests.
    let store = tempdir("pjdfstest-store");
    let m = Mount::on(&db)
        .args(&["--allow-other", "--local-store"])
        .args(&[store.path().to_str().expect("utf-8 temp path")])
        .mountpoint(&mnt_path)
        .start();
    let out = tempdir("pjdfstest-out");
    let run = Command::new(repo_root().join("scripts/pjdfstest.sh"))
        .arg("--local")
        .arg(local.path())
        .arg("--mount")
        .arg(&m.mnt)
        .arg("--out")
        .arg(out.path())
        .env("LC_ALL", "C")
        .output()
        .expect("run scripts/pjdfstest.sh");
    let script_output = format!(
        "scripts/pjdfstest.sh exited {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let read = |side: &str| {
        let path = out.path().join(format!("{side}.txt"));
        let text = fs::read_to_string(&path).unwrap_or_default();
        assert!(
            text.contains("\nSummary: "),
            "pjdfstest on the {side} did not run to its summary:\n{script_output}\n\
             --- {side}.txt (tail) ---\n{}\n--- daemon output ---\n{}",
            &text[text.len().saturating_sub(4000)..],
            m.output()
        );
        parse_pjdfstest(&text)
    };
    let (local_results, _) = read("local");
    let (mount_results, mount_messages) = read("mount");
    m.unmount();

    let counts = format!(
        "pjdfstest: mount {}/{} passed, local disk {}/{}",
        passed(&mount_results),
        mount_results.len(),
        passed(&local_results),
        local_results.len()
    );
    println!("{counts}");

    let expected = expected_failures();
    let failed = |r: &BTreeMap<String, String>| -> BTreeSet<String> {
        r.iter()
            .filter(|(_, s)| *s == "FAILED")
            .map(|(n, _)| n.clone())
            .collect()
    };
    let mount_failed = failed(&mount_results);
    let unexpected: Vec<&String> = mount_failed.difference(&expected).collect();
    let now_pass: Vec<&String> = expected
        .iter()
        .filter(|n| mount_results.get(*n).is_some_and(|s| s == "ok"))
        .collect();
    let unknown: Vec<&String> = expected
        .iter()
        .filter(|n| !mount_results.contains_key(*n))
        .collect();

    let mut report = String::new();
    let local_failed = failed(&local_results);
    if !local_failed.is_empty() {
        // Not the mount's fault; shown so a broken local disk is noticed.
        report.push_str(&format!(
            "(note: {} cases fail on local disk too: {})\n",
            local_failed.len(),
            local_failed.iter().cloned().collect::<Vec<_>>().join(" ")
        ));
    }
    if !unexpected.is_empty() {
        report.push_str(&format!(
            "\n{} cases fail on the mount and are not in {EXPECTED_FAILURES}:\n",
            unexpected.len()
        ));
        for name in &unexpected {
            let msg = mount_messages.get(*name).map(String::as_str).unwrap_or("");
            report.push_str(&format!("  {name:<60} {msg}\n"));
        }
    }
    if !now_pass.is_empty() {
        report.push_str(&format!(
            "\n{} cases in {EXPECTED_FAILURES} now pass on the mount: remove them:\n",
            now_pass.len()
        ));
        for name in &now_pass {
            report.push_str(&format!("  {name}\n"));
        }
    }
    if !unknown.is_empty() {
        report.push_str(&format!(
            "\n{} cases in {EXPECTED_FAILURES} are not pjdfstest cases (or were skipped):\n",
            unknown.len()
        ));
        for name in &unknown {
            report.push_str(&format!("  {name}\n"));
        }
    }
    print!("{report}");
    assert!(
        unexpected.is_empty() && now_pass.is_empty() && unknown.is_empty(),
        "{counts}\n{report}\nfull pjdfstest output: rerun `scripts/pjdfstest.sh --mount MNT`\n\
         {script_output}"
    );
}

// ======================================================= 2. copying trees

/// The comparisons themselves: tar, cp -a and rsync -a into two local directories give
/// the same listings (so a difference on the mount is the mount's).
#[test]
fn listings_of_two_local_copies_agree() {
    require_programs(&[("tar", "tar"), ("rsync", "rsync"), ("getfattr", "attr")]);
    require_root_and_user();
    let root = tempdir("posix-selfcheck");
    let src = root.path().join("fixture");
    sh_in(root.path(), &format!("set -- {}\n{FIXTURE}", q(&src))).ok();
    let copy = |dir: &str| {
        let script = format!(
            "SRC={src}\ntar cpf {dir}.tar --xattrs --xattrs-include='user.*' -C $SRC .\n\
             mkdir {dir} {dir}/tar && tar xpf {dir}.tar --xattrs --xattrs-include='user.*' -C {dir}/tar\n\
             cp -a $SRC/. {dir}/cp\nrsync -a $SRC/ {dir}/rsync\ncd {dir}\n{LIST}",
            src = q(&src)
        );
        sh_in(root.path(), &script).ok().text()
    };
    let (one, two) = (copy("one"), copy("two"));
    assert_eq!(one, two, "{}", line_diff(&one, &two));
    assert!(
        one.contains("./tar/setuid4755") && one.contains("./rsync/fifo"),
        "{one}"
    );
}

#[test]
fn tar_xp_keeps_modes_owners_times_links_fifos_xattrs_and_empty_dirs() {
    require_programs(&[("tar", "tar"), ("getfattr", "attr")]);
    let mut s = Sides::new("tar");
    let src = s.fixture();
    let archive = s.scratch("fixture.tar");
    sh_in(
        s.local.path(),
        &format!(
            "tar cpf {} --xattrs --xattrs-include='user.*' -C {} .",
            q(&archive),
            q(&src)
        ),
    )
    .ok();
    let extract = format!("tar xpf {} --xattrs --xattrs-include='user.*'", q(&archive));
    s.same("tar xpf", &extract);
    let listing = s.same_listing("after tar xpf");
    // The listing compares like with like; check a few things are really there.
    for want in [
        "-rwsr-xr-x 1001 1001",
        "drwxrwsr-x 0 1001",
        "drwxrwxrwt 0 0",
        "-rw------- 65534 65534",
        "prw-r----- 0 0",
        "symbolic link './link-to-file' -> 'exec755'",
        "xattr user.origin=\"fixture\"",
        "directory './empty-dir'",
        "981173106", // 2001-02-03 04:05:06 UTC
    ] {
        assert!(
            listing.contains(want),
            "local tar listing lacks {want:?}:\n{listing}"
        );
    }
    s.remount();
    s.same_listing("after tar xpf, remounted");
    s.unmount();
}

#[test]
fn rsync_a_copies_everything_and_a_dry_run_then_has_nothing_to_do() {
    require_programs(&[("rsync", "rsync")]);
    let mut s = Sides::new("rsync");
    s.fixture();
    s.same("rsync -a", r#"rsync -a "$SRC"/ tree/"#);
    s.same_listing("after rsync -a");
    let dry_run = r#"rsync -ai --dry-run "$SRC"/ tree/"#;
    let out = s.same("rsync -ai --dry-run", dry_run);
    assert_eq!(out, "", "rsync -ai --dry-run on local disk finds changes");
    s.remount();
    s.same_listing("after rsync -a, remounted");
    let out = s.same("rsync -ai --dry-run, remounted", dry_run);
    assert_eq!(out, "");
    s.unmount();
}

#[test]
fn cp_a_keeps_what_stat_shows() {
    let mut s = Sides::new("cp");
    s.fixture();
    s.same("cp -a", r#"cp -a "$SRC"/. tree/"#);
    let stat = r#"cd tree && find . -mindepth 1 | LC_ALL=C sort | while IFS= read -r f; do
      if [ -d "$f" ] && [ ! -L "$f" ]; then stat -c '%A %u %g - %Y %F %N' -- "$f"
      else stat -c '%A %u %g %s %Y %F %N' -- "$f"; fi
    done"#;
    s.same("stat after cp -a", stat);
    s.same_listing("after cp -a");
    s.remount();
    s.same("stat after cp -a, remounted", stat);
    s.same_listing("after cp -a, remounted");
    s.unmount();
}

// ======================================================= 3. git

/// git with a fixed identity and dates (so both sides make the same commits), no user or
/// system configuration, and any owner accepted.
const GIT: &str = r#"
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null
export GIT_AUTHOR_DATE='2001-02-03T04:05:06Z' GIT_COMMITTER_DATE='2001-02-03T04:05:06Z'
g() { git -c user.name=s4db -c user.email=s4db@example.com -c safe.directory='*' \
  -c init.defaultBranch=main -c gc.auto=0 "$@"; }
"#;

#[test]
fn git_commits_gcs_and_after_a_remount_status_log_and_fsck_pass() {
    require_programs(&[("git", "git")]);
    let mut s = Sides::new("git");
    let make = format!(
        r#"{GIT}
g init -q repo
cd repo
printf 'one\n' > a.txt
mkdir -p src/deep && printf 'fn main() {{}}\n' > src/deep/main.rs
printf '#!/bin/sh\necho hi\n' > run.sh && chmod +x run.sh
ln -s a.txt link
g add -A && g commit -qm first
printf 'two\n' >> a.txt
printf 'new\n' > b.txt
g rm -q src/deep/main.rs
g add -A && g commit -qm second
g gc -q
g status --porcelain
g log --format='%H %s'
g fsck --full --strict --no-progress
g ls-files -s
"#
    );
    let out = s.same("git init, two commits, gc", &make);
    assert!(
        out.contains(" second\n") && out.contains(" first\n"),
        "{out}"
    );
    let check = format!(
        r#"{GIT}
cd repo
echo "status: $(g status --porcelain)"
g log --format='%H %s'
g fsck --full --strict --no-progress
g ls-files -s
./run.sh
cat link
"#
    );
    let before = s.same("git status, log, fsck", &check);
    assert!(before.starts_with("status: \n"), "{before}");
    s.remount();
    let after = s.same("git status, log, fsck, remounted", &check);
    assert_eq!(after, before);
    s.unmount();
}

// ======================================================= 4. one program each

#[test]
fn chmod_x_makes_a_script_run() {
    let mut s = Sides::new("script");
    let out = s.same(
        "chmod +x script.sh && ./script.sh",
        r#"printf '#!/bin/sh\necho "ran with $*"\n' > script.sh
./script.sh 2>&1 || echo "exit $?"
chmod +x script.sh
./script.sh one two
stat -c '%A %n' script.sh"#,
    );
    assert!(
        out.contains("Permission denied") && out.contains("ran with one two\n-rwxr-xr-x script.sh"),
        "{out}"
    );
    s.remount();
    s.same(
        "./script.sh, remounted",
        "./script.sh again; stat -c '%A %n' script.sh",
    );
    s.unmount();
}

#[test]
fn a_truncating_open_of_a_running_program_fails_and_leaves_it_whole() {
    let s = Sides::new("exec");
    // O_RDONLY|O_TRUNC: the open that reaches the file system before the
    // kernel's ETXTBSY check when O_TRUNC is handled in the open request.
    let out = s.same(
        "open(O_TRUNC) of a running program",
        r#"cp /usr/bin/sleep prog && chmod 755 prog
for round in 1 2 3; do
  ./prog 30 & pid=$!
  until [ "$(readlink /proc/$pid/exe)" = "$PWD/prog" ]; do sleep 0.01; done
  python3 -c 'import os
try:
    os.open("prog", os.O_RDONLY | os.O_TRUNC)
    print("opened")
except OSError as e:
    print(os.strerror(e.errno))'
  sleep 0.1
  kill -0 $pid && echo running
  kill $pid; wait $pid 2>/dev/null || true
  cmp prog /usr/bin/sleep && echo intact
done"#,
    );
    assert_eq!(out, "Text file busy\nrunning\nintact\n".repeat(3), "{out}");
    s.unmount();
}

#[test]
fn ln_s_makes_symlinks_that_readlink_reads_back() {
    let mut s = Sides::new("symlink");
    let out = s.same(
        "ln -s, readlink",
        r#"printf 'target\n' > target
ln -s target link
ln -s ../elsewhere/x relative
ln -s /absolute/path absolute
ln -s "$(printf 'l%.0s' $(seq 1000))" long
ln -s target link 2>&1 || echo "exit $?"
readlink link relative absolute
readlink long | wc -c
cat link
[ -L link ] && echo "link is a symlink"
stat -c '%F %s %N' link relative absolute"#,
    );
    assert!(
        out.contains("target\n../elsewhere/x\n/absolute/path\n1001\n"),
        "{out}"
    );
    let check =
        "readlink link relative absolute long; cat link; stat -c '%F %s %N' link relative absolute";
    s.same("readlink", check);
    s.remount();
    s.same("readlink, remounted", check);
    s.unmount();
}

#[test]
fn mkfifo_makes_a_fifo_that_carries_data() {
    let mut s = Sides::new("fifo");
    let out = s.same(
        "mkfifo",
        r#"mkfifo p
mkfifo -m 600 q
stat -c '%F %a %n' p q
( echo through-the-fifo > p & )
cat p"#,
    );
    assert_eq!(
        out, "fifo 644 p\nfifo 600 q\nthrough-the-fifo\n",
        "local disk"
    );
    s.remount();
    s.same("fifo, remounted", "stat -c '%F %a %n' p q");
    s.unmount();
}

/// Prints the `user.*` and `trusted.*` xattrs of each argument, sorted.
const XATTRS: &str = r#"
xl() { for f; do echo "$f:"; getfattr -h -d -m '^(user|trusted)\.' -- "$f" | grep -v '^#' \
  | grep . | LC_ALL=C sort || true; done; }
"#;

#[test]
fn xattrs_are_set_read_removed_and_kept_by_mv() {
    require_programs(&[("setfattr", "attr"), ("getfattr", "attr")]);
    let mut s = Sides::new("xattr");
    let out = s.same(
        "setfattr, getfattr, mv",
        &format!(
            r#"{XATTRS}
printf 'x\n' > f
setfattr -n user.k -v v f
setfattr -n user.words -v 'two words' f
setfattr -n trusted.t -v secret f
setfattr -n user.gone -v x f
setfattr -x user.gone f
getfattr -n user.gone f 2>&1 || echo "exit $?"
getfattr -d f
mkdir d && setfattr -n user.dir -v 1 d
mv f d/moved
xl d d/moved"#
        ),
    );
    assert!(
        out.contains("user.gone: No such attribute")
            && out.contains(
                "d/moved:\ntrusted.t=\"secret\"\nuser.k=\"v\"\nuser.words=\"two words\"\n"
            ),
        "{out}"
    );
    let check = format!("{XATTRS}\nxl d d/moved");
    s.remount();
    s.same("getfattr, remounted", &check);
    s.unmount();
}

#[test]
fn mkdir_m_and_umask_give_the_modes_asked_for() {
    let mut s = Sides::new("modes");
    let check = "stat -c '%a %F %n' d e f t";
    let out = s.same(
        "mkdir -m, umask",
        &format!("mkdir -m 700 d\n(umask 077; touch f; mkdir e)\nmkdir -m 1777 t\n{check}"),
    );
    assert_eq!(
        out,
        "700 directory d\n700 directory e\n600 regular empty file f\n1777 directory t\n"
    );
    s.remount();
    s.same("modes, remounted", check);
    s.unmount();
}

#[test]
fn a_user_writes_in_its_own_directory_and_is_refused_in_roots() {
    let user = require_root_and_user();
    let mut s = Sides::new("users");
    let as_user =
        |cmd: &str| format!("runuser -u {user} -- sh -c '{cmd}' 2>&1 || echo \"refused: exit $?\"");
    let script = [
        "mkdir own && chown tests:tests own".to_string(),
        "mkdir rootdir && printf 'root\\n' > rootfile".to_string(),
        as_user("umask 022; echo mine > own/f && mkdir own/sub && ln -s f own/l && mv own/f own/g"),
        "stat -c '%U:%G %a %F %n' own own/g own/sub own/l".to_string(),
        as_user("touch rootdir/x"),
        as_user("echo more >> rootfile"),
        as_user("rm -f rootfile"),
        as_user("chmod 777 rootfile"),
        as_user("chown tests rootfile"),
        "ls -A rootdir; cat rootfile".to_string(),
    ]
    .join("\n");
    let out = s.same("runuser as tests", &script);
    assert!(
        out.contains("tests:tests 644 regular file own/g")
            && out.contains("touch: cannot touch 'rootdir/x': Permission denied")
            && !out.contains("more"),
        "{out}"
    );
    let check = "stat -c '%U:%G %a %F %n' own own/g own/sub own/l rootdir rootfile";
    s.remount();
    s.same("owners, remounted", check);
    s.same(
        "runuser as tests, remounted",
        &[
            as_user("echo again > own/h && cat own/h"),
            as_user("touch rootdir/y"),
        ]
        .join("\n"),
    );
    s.unmount();
}

#[test]
fn an_empty_directory_survives_a_remount() {
    let mut s = Sides::new("emptydir");
    let check =
        "find . | LC_ALL=C sort; stat -c '%a %F %n' empty nested/inner nested/inner/deepest";
    s.same(
        "mkdir, rmdir",
        &format!(
            "mkdir empty\nmkdir -p nested/inner/deepest\nchmod 0750 nested/inner\n\
             mkdir gone && rmdir gone\n{check}"
        ),
    );
    s.remount();
    let out = s.same("empty directories, remounted", check);
    assert!(out.contains("./empty\n") && !out.contains("gone"), "{out}");
    s.unmount();
}

#[test]
fn setgid_and_sticky_directories_hard_links_and_exact_times_behave_as_on_disk() {
    let user = require_root_and_user();
    let mut s = Sides::new("dirbits");
    let as_user =
        |cmd: &str| format!("runuser -u {user} -- sh -c '{cmd}' 2>&1 || echo \"refused: exit $?\"");
    let check = "stat -c '%A %U:%G %h %n' sg sg/f sg/sub st st/rootfile h1 h2\n\
                 [ h1 -ef h2 ] && echo 'h1 and h2 are one inode'\n\
                 stat -c '%y %n' ns lnk";
    let script = [
        "mkdir sg && chown root:tests sg && chmod 2775 sg".to_string(),
        "touch sg/f && mkdir sg/sub".to_string(),
        "mkdir st && chmod 1777 st && touch st/rootfile && chmod 666 st/rootfile".to_string(),
        as_user("rm -f st/rootfile"),
        as_user("echo t > st/theirs && rm st/theirs && echo removed their own"),
        "printf 'x\\n' > h1 && ln h1 h2".to_string(),
        "touch -d '2001-02-03 04:05:06.123456789Z' ns".to_string(),
        "ln -s h1 lnk && touch -h -d @981173106 lnk".to_string(),
        check.to_string(),
    ]
    .join("\n");
    let out = s.same("setgid, sticky, ln, touch -d", &script);
    assert!(
        out.contains("drwxr-sr-x root:tests 2 sg/sub")
            && out.contains("rm: cannot remove 'st/rootfile': Operation not permitted")
            && out.contains("h1 and h2 are one inode")
            && out.contains("04:05:06.123456789"),
        "{out}"
    );
    s.remount();
    s.same("setgid, sticky, ln, touch -d, remounted", check);
    s.unmount();
}
