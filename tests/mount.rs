//! The FUSE daemon `s4db-mount`, mounted for real (/dev/fuse, fusermount3) over a moto S3
//! server, used through ordinary programs (cat, cp, rsync, tar, sed, dd, ...) and checked
//! against the real Python `s4db` package.
//!
//! Every test mounts its own database on its own temp dirs. A failing test never leaves a
//! mount or a daemon behind ([`Mount`]'s Drop detaches the mount and kills the daemon).
//! A missing /dev/fuse, fusermount3 or rsync is a failure, never a skip.

mod common;

use common::mount::*;
use common::{noise, Py};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value as Json};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The byte range of `key`'s (stored, compressed) value in a data file, found by
/// walking its entries (FORMAT.md: 9-byte header, then
/// `flags u8 | key_len u32 | value_len u32 | key | value | crc u32`).
fn value_range(data: &[u8], key: &str) -> std::ops::Range<usize> {
    let be32 = |at: usize| u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
    let mut pos = 9;
    while pos + 13 <= data.len() {
        let (key_len, value_len) = (be32(pos + 1), be32(pos + 5));
        let key_start = pos + 9;
        let value_start = key_start + key_len;
        if &data[key_start..value_start] == key.as_bytes() {
            return value_start..value_start + value_len;
        }
        pos = value_start + value_len + 4;
    }
    panic!("key {key:?} not found in the data file");
}

// ======================================================= 1. everyday programs

#[test]
fn cat_ls_stat_find_grep_du_show_python_values() {
    let db = Db::new();
    let mut values = tree(&[
        ("hello.txt", b"hello world\n"),
        ("bin.dat", BINARY),
        ("empty", b""),
        ("a/b/c.txt", b"nested needle\n"),
        ("a/d.txt", b"other\n"),
    ]);
    values.insert("big".into(), noise(200_000));
    db.py_put(&values);
    let m = Mount::on(&db).start();

    for (key, value) in &values {
        let cat = m.sh(&format!("cat {key}")).ok();
        assert_eq!(&cat.stdout, value, "cat {key}");
    }

    // ls -l: the exact value length for files; keys with '/' are directories.
    let ls = m.sh("ls -ln").ok().text();
    let mut listed: BTreeMap<String, (char, u64)> = BTreeMap::new();
    for line in ls.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let kind = fields[0].chars().next().unwrap();
        let size = fields[4].parse().expect("ls size");
        listed.insert(fields[8].to_string(), (kind, size));
    }
    let dir = listed.remove("a").map(|(kind, _)| kind);
    assert_eq!(dir, Some('d'), "ls -ln:\n{ls}");
    let files: BTreeMap<String, (char, u64)> = values
        .iter()
        .filter(|(k, _)| !k.contains('/'))
        .map(|(k, v)| (k.clone(), ('-', v.len() as u64)))
        .collect();
    assert_eq!(listed, files, "ls -ln:\n{ls}");

    let stat = m.sh("stat -c '%s %F %a' hello.txt a/b/c.txt").ok();
    assert_eq!(
        stat.text(),
        "12 regular file 644\n14 regular file 644\n",
        "stat of files"
    );
    let stat = m.sh("stat -c '%F %a' a a/b").ok();
    assert_eq!(stat.text(), "directory 755\ndirectory 755\n");

    let find = m
        .sh("find . -path ./.s4db -prune -o -type f -print | sort")
        .ok();
    let want: String = values.keys().map(|k| format!("./{k}\n")).collect();
    assert_eq!(find.text(), want, "find");

    let grep = m.sh("grep -rl --exclude-dir=.s4db needle .").ok();
    assert_eq!(grep.text(), "./a/b/c.txt\n");

    // du: apparent sizes are the value lengths; disk usage is not zero for data.
    let du = m.sh("du -ab a/b/c.txt big").ok();
    assert_eq!(du.text(), "14\ta/b/c.txt\n200000\tbig\n");
    let blocks = m.sh("du -B1 big").ok().text();
    let used: u64 = blocks
        .split('\t')
        .next()
        .unwrap()
        .parse()
        .expect("du number");
    assert!(used >= 200_000, "du -B1 big reports {used} bytes used");
    m.unmount();
}

#[test]
fn cp_rsync_and_tar_copy_trees_in_and_out_exactly() {
    require_program("rsync", "rsync");
    let db = Db::new();
    let src_dir = tempdir("src");
    let src = src_dir.path().join("src");
    let files = sample_tree();
    write_tree(&src, &files);
    fs::create_dir(src.join("empty-dir")).unwrap();
    let m = Mount::on(&db).args(&["--upload-delay", "never"]).start();
    let (src_q, out_q) = (q(&src), q(&src_dir.path().join("out")));

    m.sh(&format!("cp -a {src_q} cp && diff -r {src_q} cp"))
        .ok();
    m.sh(&format!("cp -a cp {out_q} && diff -r {src_q} {out_q}"))
        .ok();
    m.sh(&format!(
        "rsync -a {src_q}/ rsync/ && diff -r {src_q} rsync"
    ))
    .ok();
    let archive = q(&src_dir.path().join("src.tar"));
    sh_in(src_dir.path(), &format!("tar cf {archive} -C {src_q} .")).ok();
    m.sh(&format!(
        "mkdir tar && tar xf {archive} -C tar && diff -r {src_q} tar"
    ))
    .ok();

    // Only the files themselves became keys: no rsync temp files, no leftovers.
    let mut expected = Tree::new();
    for dir in ["cp", "rsync", "tar"] {
        expected.extend(prefixed(dir, &files));
    }
    assert_eq!(m.tree(), expected, "the mount's files");
    m.upload();
    db.assert_python_sees(&expected);
    m.unmount();
}

#[test]
fn mv_rm_mkdir_rmdir_change_keys() {
    let db = Db::new();
    db.py_put(&tree(&[
        ("keep", b"keep\n"),
        ("old", b"old\n"),
        ("dir/a", b"a\n"),
        ("dir/sub/b", b"b\n"),
    ]));
    let m = Mount::on(&db).args(&["--upload-delay", "never"]).start();

    m.sh("mv old new && test ! -e old && cat new").ok();
    m.sh("mv dir moved && test ! -e dir && test -d moved/sub")
        .ok();
    m.sh(
        "mkdir -p empty/inner && test -d empty/inner && rmdir empty/inner empty && test ! -e empty",
    )
    .ok();
    m.sh("mkdir made && echo made > made/f").ok();
    m.sh("rm -r moved/sub && test ! -e moved/sub").ok();
    m.sh("echo 1 > x && echo 2 > y && mv x y && test ! -e x")
        .ok();
    m.sh("rmdir moved").fails_with(&["Directory not empty"]);
    m.sh("rm no-such-file").fails_with(&["No such file"]);
    m.sh("mkdir made").fails_with(&["File exists"]);

    let expected = tree(&[
        ("keep", b"keep\n"),
        ("new", b"old\n"),
        ("moved/a", b"a\n"),
        ("made/f", b"made\n"),
        ("y", b"1\n"),
    ]);
    assert_eq!(m.tree(), expected);
    m.upload();
    db.assert_python_sees(&expected);
    m.unmount();
}

#[test]
fn renaming_a_directory_moves_every_key_intact() {
    let db = Db::new();
    let inside = tree(&[("a", b"a\n"), ("b", BINARY), ("sub/c", b"c\n")]);
    db.py_put(&prefixed("python", &inside));
    let m = Mount::on(&db).args(&["--upload-delay", "never"]).start();
    write_tree(&m.path("mine"), &inside);

    m.sh("mv python python2 && mv mine mine2").ok();
    let mut expected = prefixed("python2", &inside);
    expected.extend(prefixed("mine2", &inside));
    assert_eq!(m.tree(), expected, "the mount's view after the renames");
    m.upload();
    db.assert_python_sees(&expected);
    m.unmount();
}

#[test]
fn sed_append_dd_and_truncate_edit_in_place() {
    let db = Db::new();
    // A value only in S3 (empty local dir): the edits must start from its bytes.
    db.py_put(&tree(&[("remote", b"0123456789")]));
    let m = Mount::on(&db).args(&["--upload-delay", "never"]).start();

    m.sh("printf 'alpha\\nbeta\\n' > f && sed -i s/beta/gamma/ f")
        .ok();
    m.sh("echo more >> f").ok();
    m.sh("printf XY | dd of=remote bs=1 seek=3 conv=notrunc status=none")
        .ok();
    m.sh("echo tail >> remote").ok();
    m.sh("printf 0123456789 > g && printf AB | dd of=g bs=1 seek=12 conv=notrunc status=none")
        .ok();
    m.sh("printf 0123456789 > shrink && truncate -s 4 shrink")
        .ok();
    m.sh("printf 0123 > grow && truncate -s 6 grow").ok();

    let expected = tree(&[
        ("f", b"alpha\ngamma\nmore\n"),
        ("remote", b"012XY56789tail\n"),
        ("g", b"0123456789\0\0AB"),
        ("shrink", b"0123"),
        ("grow", b"0123\0\0"),
    ]);
    let sizes = m.sh("stat -c '%n %s' f g grow remote shrink").ok();
    let want: String = ["f", "g", "grow", "remote", "shrink"]
        .iter()
        .map(|k| format!("{k} {}\n", expected[*k].len()))
        .collect();
    assert_eq!(sizes.text(), want, "sizes after the edits");
    assert_eq!(m.tree(), expected);
    m.upload();
    db.assert_python_sees(&expected);
    m.unmount();
}

// ============================================== 2. Python compatibility

#[test]
fn files_written_through_the_mount_are_python_values_after_upload() {
    let db = Db::new();
    let m = Mount::on(&db).args(&["--upload-delay", "never"]).start();
    let mut files = sample_tree();
    files.insert("text/utf8.txt".into(), "\u{e9}t\u{e9} \u{2713}\n".into());
    files.insert("nul-is-utf8".into(), b"a\0b".to_vec());
    write_tree(&m.mnt, &files);

    assert_eq!(db.py_values(), BTreeMap::new(), "nothing before the upload");
    m.upload();
    db.assert_python_sees(&files);
    m.unmount();
}

#[test]
fn unmappable_python_keys_are_hidden_listed_and_never_touched() {
    let db = Db::new();
    let long = format!("long/{}", "L".repeat(300));
    let unmappable: Tree = [
        "a//b",
        "x/",
        "./y",
        "../z",
        "/lead",
        "",
        long.as_str(),
        ".s4db/k",
        "d",
        "dir//hidden",
        "dir/./dot",
        "gone//h",
    ]
    .iter()
    .map(|k| (k.to_string(), format!("value of {k:?}").into_bytes()))
    .collect();
    let mappable = tree(&[
        ("plain", b"plain\n"),
        ("dir/nested", b"nested\n"),
        ("d/e", b"e\n"),
        ("gone/file", b"f\n"),
    ]);
    let mut all = unmappable.clone();
    all.extend(mappable.clone());
    db.py_put(&all);
    let m = Mount::on(&db).args(&["--upload-delay", "never"]).start();

    let listed: BTreeSet<String> = m
        .sh("cat .s4db/unmapped")
        .ok()
        .text()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let want: BTreeSet<String> = unmappable.keys().cloned().collect();
    assert_eq!(listed, want, ".s4db/unmapped");
    assert_eq!(m.tree(), mappable, "only the mappable keys are files");

    // Renames and writes around (and over the prefixes of) hidden keys.
    m.sh("mv plain renamed").ok();
    m.sh("mv dir dir2").ok();
    m.sh("echo new > new && mkdir -p x && echo f > x/file").ok();
    m.upload();
    let mut expected = unmappable;
    expected.extend(tree(&[
        ("renamed", b"plain\n"),
        ("dir2/nested", b"nested\n"),
        ("d/e", b"e\n"),
        ("gone/file", b"f\n"),
        ("new", b"new\n"),
        ("x/file", b"f\n"),
    ]));
    db.assert_python_sees(&expected);

    // Hidden keys are not shown, not even as directories they would imply.
    assert_eq!(
        top_level_names(&m.mnt),
        ["d", "dir2", "gone", "new", "renamed", "x"]
            .map(String::from)
            .into(),
        "the mount root (without .s4db)"
    );
    // Removing a directory leaves the hidden keys under its name alone.
    m.sh("rm -r gone && test ! -e gone").ok();
    m.upload();
    expected.remove("gone/file");
    db.assert_python_sees(&expected);
    m.unmount();
    db.assert_python_sees(&expected);
}

/// The names in `dir`, without `.s4db`.
fn top_level_names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .into_string()
                .expect("UTF-8")
        })
        .filter(|n| n != ".s4db")
        .collect()
}

#[test]
fn a_format_1_database_from_python_0_8_mounts_and_takes_writes() {
    let db = Db::new();
    let py08 = Py::v08();
    assert_eq!(db.tool(&py08, &["version"], b"")["format"], 1);
    let written = tree(&[("one", b"1\n"), ("dir/two", b"2\n")]);
    db.py_put_with(&py08, &written);
    let m = Mount::on(&db).args(&["--upload-delay", "never"]).start();

    assert_eq!(m.tree(), written, "0.8.0's keys through the mount");
    m.sh("echo uno > one && printf 'tres\\377' > dir/three")
        .ok();
    m.upload();
    m.unmount();
    db.assert_python_sees(&tree(&[
        ("one", b"uno\n"),
        ("dir/two", b"2\n"),
        ("dir/three", b"tres\xff"),
    ]));
}

// ======================================================= 3. publishing

#[test]
fn unmount_publishes_pending_writes() {
    let db = Db::new();
    let m = Mount::on(&db).args(&["--upload-delay", "never"]).start();
    m.sh("echo a > a && mkdir d && printf '\\377' > d/b").ok();
    assert_eq!(
        db.py_values(),
        BTreeMap::new(),
        "not published before the unmount"
    );
    m.unmount();
    db.assert_python_sees(&tree(&[("a", b"a\n"), ("d/b", b"\xff")]));
}

#[test]
fn upload_delay_publishes_without_any_action() {
    let db = Db::new();
    let m = Mount::on(&db).args(&["--upload-delay", "0.2"]).start();
    m.sh("echo a > a && echo b > b && rm b && echo c > c").ok();
    db.wait_python_sees(&tree(&[("a", b"a\n"), ("c", b"c\n")]));
    m.unmount();
}

/// A steady trickle of writes never leaves the debounce a quiet second, yet
/// each write is published within `--upload-max-delay` of being made.
#[test]
fn a_steady_trickle_is_published_within_the_max_delay() {
    let db = Db::new();
    let m = Mount::on(&db)
        .args(&["--upload-delay", "1", "--upload-max-delay", "1.5"])
        .start();
    let start = Instant::now();
    let mut published_while_writing = 0;
    for i in 0usize..30 {
        std::fs::write(m.path(&format!("f{i:02}")), format!("{i}\n")).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        if i % 10 == 9 {
            // Everything written more than the bound (plus an upload's time) ago is in the bucket.
            let seen = db.py_values();
            let expected_at_least = i.saturating_sub(15);
            for j in 0..expected_at_least {
                assert!(
                    seen.contains_key(&format!("f{j:02}")),
                    "f{j:02} not published {:?} after it was written (while writes kept coming)",
                    start.elapsed()
                );
            }
            published_while_writing = seen.len();
        }
    }
    assert!(
        published_while_writing > 0,
        "nothing was published while writing"
    );
    let stats = m.stats();
    assert!(
        stats["oldest_unsynced_write_seconds"].is_null()
            || stats["oldest_unsynced_write_seconds"].as_f64().unwrap() < 5.0,
        "{stats}"
    );
    m.unmount();
}

/// `df` shows the live bytes and the keys as used, of a large capacity.
#[test]
fn df_shows_live_bytes_and_keys_as_used() {
    let db = Db::new();
    let m = Mount::on(&db).start();
    m.sh("head -c 3000000 /dev/urandom > big && for i in 1 2 3 4; do echo $i > f$i; done")
        .ok();
    let df = m
        .sh("df -B1 --output=size,used,itotal,iused . | tail -1")
        .ok();
    let n: Vec<u64> = df
        .text()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let (size, used, itotal, iused) = (n[0], n[1], n[2], n[3]);
    assert!(size >= 1 << 50, "capacity {size}");
    assert!(
        (3_000_000..3_100_000).contains(&used),
        "used {used}: {}",
        df.text()
    );
    assert_eq!(iused, 5, "{}", df.text());
    assert!(itotal >= 1 << 32);
    m.unmount();
}

/// Another writer's commit shows up without any action, at the refresh interval.
#[test]
fn refresh_interval_picks_up_other_writers() {
    let db = Db::new();
    db.py_put(&tree(&[("old", b"1")]));
    let m = Mount::on(&db).args(&["--refresh-interval", "0.2"]).start();
    assert_eq!(m.read("old"), b"1");
    db.py_put(&tree(&[("new", b"from python")]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !m.path("new").exists() {
        assert!(Instant::now() < deadline, "the new key never showed up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(m.read("new"), b"from python");
    m.unmount();
}

// ======================================================= 4. read-only

#[test]
fn a_read_only_mount_refuses_every_write_with_erofs() {
    let db = Db::new();
    let values = tree(&[("file", b"content\n"), ("dir/inner", b"x")]);
    db.py_put(&values);
    for options in [&["--read-only"][..], &["-o", "ro"][..]] {
        let m = Mount::on(&db).args(options).start();
        assert_eq!(m.tree(), values, "reads work ({options:?})");
        for write in [
            "echo x > new",
            "echo x > file",
            "echo x >> file",
            "truncate -s 0 file",
            "touch file",
            "mkdir newdir",
            "rm file",
            "rmdir dir",
            "mv file moved",
            "mv dir moved",
        ] {
            m.sh(write).fails_with(&["Read-only file system"]);
        }
        assert_eq!(m.tree(), values, "nothing changed ({options:?})");
        m.unmount();
    }
    db.assert_python_sees(&values);
}

// ======================================================= 5. allow-other

#[test]
fn allow_other_lets_another_user_read_and_without_it_they_cannot() {
    let user = other_user();
    let db = Db::new();
    db.py_put(&tree(&[("shared.txt", b"for everyone\n")]));

    let m = Mount::on(&db).args(&["--allow-other"]).start();
    let read = format!("runuser -u {user} -- cat {}", q(&m.path("shared.txt")));
    let got = sh_in(Path::new("/"), &read).ok();
    assert_eq!(got.text(), "for everyone\n");
    m.unmount();

    let m = Mount::on(&db).start();
    let read = format!("runuser -u {user} -- cat {}", q(&m.path("shared.txt")));
    sh_in(Path::new("/"), &read).fails_with(&["Permission denied"]);
    m.unmount();
}

// ======================================================= 6. bad names

#[test]
fn names_that_cannot_be_keys_fail_with_a_clear_errno() {
    let db = Db::new();
    let m = Mount::on(&db).args(&["--upload-delay", "never"]).start();
    let (n255, n256) = ("n".repeat(255), "n".repeat(256));

    m.sh(&format!("echo ok > {n255} && cat {n255}")).ok();
    m.sh("echo file > file").ok();
    for bad in [
        format!("touch {n256}"),
        format!("mkdir {n256}"),
        format!("mv file {n256}"),
        format!("mkdir -p d && echo x > d/{n256}"),
    ] {
        m.sh(&bad).fails_with(&["File name too long"]);
    }
    // Keys are UTF-8: a name that is not cannot become one.
    m.sh("touch \"$(printf 'bad\\377')\"")
        .fails_with(&["Invalid argument"]);
    for inside in ["echo x > .s4db/new", "mkdir .s4db/dir", "rm .s4db/stats"] {
        m.sh(inside)
            .fails_with(&["Operation not permitted", "Permission denied"]);
    }
    // A symlink's target is its value, as text: one that is not UTF-8 cannot be a key.
    m.sh("ln -s \"$(printf 'bad\\377')\" symlink")
        .fails_with(&["Invalid argument"]);

    m.sh("rmdir d").ok();
    m.upload();
    db.assert_python_sees(&tree(&[(&n255, b"ok\n"), ("file", b"file\n")]));
    m.unmount();
}

// ======================================================= 7. corruption

#[test]
fn a_corrupt_entry_reads_as_eio_and_the_others_still_read() {
    let db = Db::new();
    let values = tree(&[
        ("good1", b"first good value\n"),
        ("bad", b"this value gets one byte flipped in S3\n"),
        ("good2", b"second good value\n"),
    ]);
    db.py_put(&values);
    let objects = db.data_objects();
    let [object] = &objects[..] else {
        panic!("expected one data file: {:?}", db.objects())
    };
    let mut data = db.get_object(object);
    let range = value_range(&data, "bad");
    data[range.start + range.len() / 2] ^= 0x01;
    db.put_object(object, &data);

    let m = Mount::on(&db).start();
    for _ in 0..2 {
        m.sh("cat bad").fails_with(&["Input/output error"]);
    }
    for key in ["good1", "good2"] {
        assert_eq!(m.sh(&format!("cat {key}")).ok().stdout, values[key]);
    }
    m.unmount();
}

// ======================================================= 8. crash

#[test]
fn acknowledged_writes_survive_kill_9_and_are_published_after_restart() {
    let db = Db::new();
    let local = tempdir("local");
    let src = tempdir("src");
    let big = noise(150_000);
    fs::write(src.path().join("big"), &big).unwrap();
    let m = Mount::on(&db)
        .local_dir(local.path())
        .args(&["--upload-delay", "never"])
        .start();

    let big_q = q(&src.path().join("big"));
    m.sh("echo one > one && printf two > two && mkdir -p d/e && echo deep > d/e/f")
        .ok();
    m.sh(&format!(
        "cp {big_q} copied && dd if={big_q} of=fsynced bs=64k conv=fsync status=none"
    ))
    .ok();
    m.sh("echo synced > synced && sync && echo 1 > overwritten && echo 2 > overwritten && echo x > deleted && rm deleted")
        .ok();
    let mut expected = tree(&[
        ("one", b"one\n"),
        ("two", b"two"),
        ("d/e/f", b"deep\n"),
        ("synced", b"synced\n"),
        ("overwritten", b"2\n"),
    ]);
    expected.insert("copied".into(), big.clone());
    expected.insert("fsynced".into(), big);
    m.kill9();
    assert_eq!(db.py_values(), BTreeMap::new(), "nothing was uploaded");

    let m = Mount::on(&db)
        .local_dir(local.path())
        .args(&["--upload-delay", "never"])
        .start();
    assert_eq!(m.tree(), expected, "after the crash and a remount");
    m.unmount();
    db.assert_python_sees(&expected);
}

// ======================================================= 9. concurrency

/// One writer's random operations on its own keys, mirrored in `model` and checked
/// against the mount as it goes (no one else touches these keys).
fn random_writer(mnt: &Path, id: usize, ops: usize) -> Tree {
    let mut rng = StdRng::seed_from_u64(id as u64);
    let keys: Vec<String> = (0..8)
        .map(|j| match j % 3 {
            0 => format!("w{id}/k{j}"),
            _ => format!("w{id}/sub/k{j}"),
        })
        .collect();
    fs::create_dir_all(mnt.join(format!("w{id}/sub"))).expect("mkdir writer dirs");
    let mut model = Tree::new();
    for n in 0..ops {
        let key = &keys[rng.gen_range(0..keys.len())];
        let path = mnt.join(key);
        let ctx = format!("writer {id} op {n} on {key}");
        let content: Vec<u8> = if rng.gen_bool(0.7) {
            format!("w{id} op{n} ")
                .repeat(rng.gen_range(0..50))
                .into_bytes()
        } else {
            (0..rng.gen_range(1..3000)).map(|_| rng.gen()).collect()
        };
        match rng.gen_range(0..7) {
            0 | 1 => {
                fs::write(&path, &content).unwrap_or_else(|e| panic!("{ctx}: write: {e}"));
                model.insert(key.clone(), content);
            }
            2 => {
                let mut f = fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&path)
                    .unwrap_or_else(|e| panic!("{ctx}: open to append: {e}"));
                f.write_all(&content)
                    .unwrap_or_else(|e| panic!("{ctx}: append: {e}"));
                model.entry(key.clone()).or_default().extend(&content);
            }
            3 => {
                let removed = fs::remove_file(&path);
                match model.remove(key) {
                    Some(_) => removed.unwrap_or_else(|e| panic!("{ctx}: rm: {e}")),
                    None => assert_eq!(
                        removed.map_err(|e| e.kind()),
                        Err(ErrorKind::NotFound),
                        "{ctx}: rm of a missing file"
                    ),
                }
            }
            4 => {
                let Some(value) = model.get_mut(key) else {
                    continue;
                };
                let at = rng.gen_range(0..=value.len());
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap_or_else(|e| panic!("{ctx}: open to pwrite: {e}"));
                f.write_all_at(&content, at as u64)
                    .unwrap_or_else(|e| panic!("{ctx}: pwrite at {at}: {e}"));
                let end = (at + content.len()).max(value.len());
                value.resize(end, 0);
                value[at..at + content.len()].copy_from_slice(&content);
            }
            5 => {
                let to = &keys[rng.gen_range(0..keys.len())];
                let Some(value) = model.remove(key) else {
                    continue;
                };
                fs::rename(&path, mnt.join(to))
                    .unwrap_or_else(|e| panic!("{ctx}: rename to {to}: {e}"));
                model.insert(to.clone(), value);
            }
            _ => {
                let got = fs::read(&path).map_err(|e| e.kind());
                let want = model.get(key).cloned().ok_or(ErrorKind::NotFound);
                assert!(
                    got == want,
                    "{ctx}: read {:?} bytes, the model has {:?}",
                    got.as_ref().map(Vec::len),
                    want.as_ref().map(Vec::len)
                );
                if let Some(v) = model.get(key) {
                    let len = fs::metadata(&path).map(|m| m.len());
                    assert_eq!(len.ok(), Some(v.len() as u64), "{ctx}: st_size");
                }
            }
        }
    }
    model
}

/// The versions the shared-key writer cycles through: distinct contents and lengths.
fn shared_versions(key: usize) -> Vec<Vec<u8>> {
    (0..4)
        .map(|v| {
            format!("shared {key} version {v}\n")
                .repeat(v * 40 + 1)
                .into_bytes()
        })
        .collect()
}

#[test]
fn concurrent_random_writers_match_a_model() {
    const WRITERS: usize = 4;
    const OPS: usize = 150;
    let db = Db::new();
    let m = Mount::on(&db).args(&["--upload-delay", "never"]).start();
    let mnt = m.mnt.as_path();
    let model: Tree = std::thread::scope(|s| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|id| s.spawn(move || random_writer(mnt, id, OPS)))
            .collect();
        writers
            .into_iter()
            .flat_map(|w| w.join().expect("a writer panicked"))
            .collect()
    });
    assert_eq!(m.tree(), model, "the mount's view after the run");
    m.upload();
    db.assert_python_sees(&model);
    m.unmount();
}

/// Reads `shared/s{key}` and asserts it is one whole version.
fn assert_one_version(mnt: &Path, key: usize) {
    let got = fs::read(mnt.join(format!("shared/s{key}")))
        .unwrap_or_else(|e| panic!("read shared/s{key}: {e}"));
    let versions = shared_versions(key);
    assert!(
        versions.contains(&got),
        "shared/s{key}: a torn or stale read: {} bytes {:?}; the versions have {:?} bytes",
        got.len(),
        String::from_utf8_lossy(&got[..got.len().min(60)]),
        versions.iter().map(Vec::len).collect::<Vec<_>>()
    );
}

#[test]
fn readers_see_whole_versions_while_files_are_replaced_by_rename() {
    const SHARED: usize = 3;
    const ROUNDS: usize = 21;
    let db = Db::new();
    let m = Mount::on(&db).args(&["--upload-delay", "never"]).start();
    let mnt = m.mnt.as_path();
    fs::create_dir(mnt.join("shared")).unwrap();
    for key in 0..SHARED {
        fs::write(mnt.join(format!("shared/s{key}")), &shared_versions(key)[0]).unwrap();
    }

    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let readers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut reads = 0;
                    while !done.load(Ordering::Relaxed) {
                        (0..SHARED).for_each(|key| assert_one_version(mnt, key));
                        reads += SHARED;
                    }
                    reads
                })
            })
            .collect();
        // The careful way to replace a file (editors, rsync): write a temp file, rename it over.
        let replaced = std::panic::catch_unwind(|| {
            for round in 1..=ROUNDS {
                for key in 0..SHARED {
                    let tmp = mnt.join(format!("shared/.tmp-{key}"));
                    fs::write(&tmp, &shared_versions(key)[round % 4]).expect("write temp");
                    fs::rename(&tmp, mnt.join(format!("shared/s{key}"))).expect("rename");
                }
            }
        });
        done.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.join().expect("a reader failed") > 0);
        }
        replaced.expect("the replacing writer failed");
    });

    let model: Tree = (0..SHARED)
        .map(|key| {
            (
                format!("shared/s{key}"),
                shared_versions(key)[ROUNDS % 4].clone(),
            )
        })
        .collect();
    assert_eq!(m.tree(), model, "the mount's view after the run");
    m.upload();
    db.assert_python_sees(&model);
    m.unmount();
}

// ======================================================= 10. control files

const CONTROL_FILES: [&str; 6] = [
    "upload",
    "download",
    "compact",
    "rebuild_index",
    "gc",
    "refresh",
];

/// The request counters a control operation would move: all but `get_range` (reading
/// a data file through the mount may fetch entries; running an upload, refresh etc. may not).
fn control_requests(stats: &Json) -> Json {
    let r = &stats["s3_requests"];
    json!([r["get"], r["put"], r["delete"], r["list"], r["head"]])
}

#[test]
fn reading_control_files_runs_nothing_and_stats_has_the_spec_fields() {
    let db = Db::new();
    db.py_put(&tree(&[("k", b"needle\n")]));
    let m = Mount::on(&db).args(&["--upload-delay", "never"]).start();
    m.sh("echo new > new").ok();

    let before = m.stats();
    for field in ["keys", "files", "bytes", "unsynced_writes", "cache_hits"] {
        assert!(
            before[field].is_u64(),
            "stats.{field} is a number: {before}"
        );
    }
    for field in ["get", "get_range", "put", "delete", "list", "head"] {
        assert!(
            before["s3_requests"][field].is_u64(),
            "stats.s3_requests.{field} is a number: {before}"
        );
    }
    assert_eq!(before["keys"], 2, "{before}");
    assert!(before["unsynced_writes"].as_u64() > Some(0), "{before}");

    let listing = m.sh("ls .s4db").ok().text();
    for name in CONTROL_FILES
        .iter()
        .chain(&["stats", "unmapped", "last_error"])
    {
        assert!(listing.lines().any(|l| l == *name), "ls .s4db:\n{listing}");
    }
    // What backup tools and searches do: read everything, control files included.
    let reads: String = CONTROL_FILES
        .iter()
        .map(|op| format!("cat .s4db/{op} > /dev/null && "))
        .collect();
    m.sh(&format!(
        "{reads}grep -r needle . > /dev/null && find . -type f -exec cat {{}} + > /dev/null"
    ))
    .ok();

    let after = m.stats();
    assert_eq!(
        control_requests(&after),
        control_requests(&before),
        "reading control files sent requests:\nbefore {before}\nafter {after}"
    );
    assert_eq!(after["unsynced_writes"], before["unsynced_writes"]);
    assert_eq!(db.py_values().len(), 1, "nothing was uploaded");

    m.upload();
    let uploaded = m.stats();
    assert_eq!(uploaded["unsynced_writes"], 0, "{uploaded}");
    assert!(uploaded["s3_requests"]["put"].as_u64() > after["s3_requests"]["put"].as_u64());
    m.unmount();
}

#[test]
fn refresh_with_unsynced_writes_fails_and_last_error_says_why() {
    let db = Db::new();
    let m = Mount::on(&db).args(&["--upload-delay", "never"]).start();
    m.sh("echo mine > mine").ok();

    m.control("refresh").fails();
    let error = m.last_error().to_lowercase();
    assert!(
        error.contains("refresh")
            && ["unsynced", "not uploaded", "pending", "upload"]
                .iter()
                .any(|w| error.contains(w)),
        "last_error should name the operation and the unsynced writes: {error:?}"
    );

    // Once published, refresh works and shows what others committed meanwhile.
    m.upload();
    db.py_put(&tree(&[("theirs", b"python\n")]));
    m.control("refresh").ok();
    assert_eq!(
        m.tree(),
        tree(&[("mine", b"mine\n"), ("theirs", b"python\n")])
    );
    m.unmount();
}

#[test]
fn a_failing_download_or_compact_fails_the_write_naming_the_missing_object() {
    let db = Db::new();
    db.py_put(&tree(&[("k", b"v\n")]));
    let objects = db.data_objects();
    let [object] = &objects[..] else {
        panic!("expected one data file: {:?}", db.objects())
    };
    let m = Mount::on(&db).start();
    db.delete_object(object);

    for op in ["compact", "download"] {
        m.control(op).fails();
        let error = m.last_error();
        assert!(
            error.contains(object.as_str()),
            "{op}: last_error should name {object}: {error:?}"
        );
    }
    // The mount still serves: stats and a new file.
    m.stats();
    m.sh("echo ok > new && cat new").ok();
    m.unmount();
}

// ======================================================= 11. daemon mode

#[test]
fn daemon_mode_returns_once_the_mount_is_ready_and_publishes_at_unmount() {
    let db = Db::new();
    db.py_put(&tree(&[("ready", b"yes\n")]));
    let m = Mount::on(&db)
        .args(&["--upload-delay", "never"])
        .start_daemonized();
    // Immediately: no polling, the launcher's exit is the promise.
    assert_eq!(m.sh("ls").ok().text(), "ready\n");
    m.sh("echo written > written").ok();
    m.unmount();
    db.wait_python_sees(&tree(&[("ready", b"yes\n"), ("written", b"written\n")]));
}

#[test]
fn a_missing_bucket_fails_to_mount_naming_it() {
    let db = Db::in_missing_bucket();
    for foreground in [false, true] {
        let output = Mount::on(&db).run_to_failure(foreground);
        assert!(
            output.contains(&db.bucket),
            "the error should name bucket {}: {output}",
            db.bucket
        );
    }
}

#[test]
fn a_mountpoint_that_is_not_a_directory_fails_saying_so() {
    let db = Db::new();
    let dir = tempdir("file");
    let file = dir.path().join("not-a-dir");
    fs::write(&file, "x").unwrap();
    let output = Mount::on(&db).mountpoint(&file).run_to_failure(false);
    assert!(
        output.to_lowercase().contains("not a directory"),
        "the error should say the mount point is not a directory: {output}"
    );
    assert_eq!(fs::read(&file).unwrap(), b"x");
}

#[test]
fn a_second_daemon_on_the_same_local_dir_fails() {
    let db = Db::new();
    db.py_put(&tree(&[("k", b"v\n")]));
    let local = tempdir("local");
    let first = Mount::on(&db).local_dir(local.path()).start();
    for foreground in [false, true] {
        let output = Mount::on(&db)
            .local_dir(local.path())
            .run_to_failure(foreground);
        assert!(
            output.contains(local.path().to_str().unwrap()),
            "the error should name the local dir {:?}: {output}",
            local.path()
        );
    }
    assert_eq!(first.read("k"), b"v\n", "the first mount is unharmed");
    first.unmount();
}

// ======================================================= 12. cold reads

#[test]
fn cold_reads_cost_at_most_one_range_get_per_file_and_rereads_none() {
    let db = Db::new();
    // Read straight away, and stat first then read: one GET per file either way.
    let mut cold = tree(&[("small", b"small\n"), ("binary", BINARY)]);
    cold.insert("big-binary".into(), noise(300_000)); // many kernel read chunks, one GET
    let mut stat_first = tree(&[("dir/nested", b"nested\n")]);
    stat_first.insert("dir/big-text".into(), "text\n".repeat(300_000).into_bytes());
    let mut values = cold.clone();
    values.extend(stat_first.clone());
    db.py_put(&values);
    let m = Mount::on(&db).start();
    let start = m.stats();
    assert_eq!(
        start["s3_requests"]["get_range"], 0,
        "mounting reads no data: {start}"
    );

    for (key, value) in &cold {
        assert_eq!(&m.read(key), value, "{key}");
    }
    m.sh("stat dir/* > /dev/null").ok();
    for (key, value) in &stat_first {
        assert_eq!(&m.read(key), value, "{key}");
    }
    let after = m.stats();
    // Python wrote no size hints: sizing a small value fetches its whole
    // entry, and its directory's neighbours come along in the same GET.
    let gets = after["s3_requests"]["get_range"].as_u64().unwrap();
    assert!(
        (1..=values.len() as u64).contains(&gets),
        "at most one range GET per file read: {after}"
    );

    m.sh("ls -lR > /dev/null && stat * dir/* > /dev/null").ok();
    assert_eq!(m.tree(), values, "warm reads");
    let again = m.stats();
    let gets = |s: &Json| json!([s["s3_requests"]["get"], s["s3_requests"]["get_range"]]);
    assert_eq!(
        gets(&again),
        gets(&after),
        "listing and reading again sent GETs: {again}"
    );
    m.unmount();
}

/// `mv` of cold files one at a time, as a shell loop does: the first rename
/// reads its directory's neighbours in the same data file along with its own
/// value, so the rest cost no request, and every value arrives intact. The
/// same for `>>` to cold files.
#[test]
fn renaming_or_appending_to_cold_files_one_by_one_reads_their_data_file_once() {
    let db = Db::new();
    let values: BTreeMap<String, Vec<u8>> = (0..200)
        .map(|i| {
            (
                format!("d/f{i}"),
                format!("value {i}\n").repeat(i % 7 + 1).into_bytes(),
            )
        })
        .collect();
    db.py_put(&values);
    let m = Mount::on(&db).start();
    m.sh("for i in $(seq 0 199); do mv d/f$i d/g$i; done").ok();
    let stats = m.stats();
    assert_eq!(
        stats["s3_requests"]["get_range"], 1,
        "one range GET for the directory's neighbours: {stats}"
    );
    let moved: BTreeMap<String, Vec<u8>> = values
        .iter()
        .map(|(k, v)| (k.replace("/f", "/g"), v.clone()))
        .collect();
    assert_eq!(m.tree(), moved);
    m.control("upload").ok();
    db.assert_python_sees(&moved);
    m.unmount();

    // Appends to cold files the mount wrote (sizes known from hints, values
    // not local on a new machine): the first fetches its neighbours too.
    let fresh = Mount::on(&db).start();
    fresh
        .sh("for i in $(seq 0 199); do echo more >> d/g$i; done")
        .ok();
    let stats = fresh.stats();
    assert_eq!(stats["s3_requests"]["get_range"], 1, "{stats}");
    let appended: BTreeMap<String, Vec<u8>> = moved
        .iter()
        .map(|(k, v)| (k.clone(), [&v[..], b"more\n"].concat()))
        .collect();
    assert_eq!(fresh.tree(), appended);
    fresh.unmount();
}

/// 64 `cat`s at once of values only S3 has: the session hands each read to
/// the runtime, so the range GETs overlap instead of queueing one by one.
#[test]
fn sixty_four_parallel_cold_reads_overlap() {
    let db = Db::new();
    let values: Tree = (0..64)
        .map(|i| (format!("p/k{i:02}"), noise(20_000 + i)))
        .collect();
    db.py_put(&values);
    let m = Mount::on(&db).start();
    // Names from seq, not ls: a listing would prefetch sizes (and values) itself.
    m.sh("seq -w 0 63 | xargs -P 64 -I{} cat p/k{} > /dev/null")
        .ok();
    let stats = m.stats();
    assert!(
        stats["s3_requests"]["max_in_flight"].as_u64().unwrap() > 1,
        "the reads queued behind each other: {stats}"
    );
    assert_eq!(m.tree(), values);
    m.unmount();
}

#[test]
fn sigterm_uploads_and_unmounts() {
    let db = Db::new();
    let m = Mount::on(&db).args(&["--upload-delay", "never"]).start();
    m.sh("echo kept > a && mkdir d && echo too > d/b").ok();
    m.terminate();
    db.assert_python_sees(&tree(&[("a", b"kept\n"), ("d/b", b"too\n")]));
}

/// Sizes of values another writer put are asked once, then remembered in the
/// local directory: a later mount lists them without a request.
#[test]
fn sizes_learned_once_are_remembered_across_mounts() {
    let db = Db::new();
    let values = tree(&[("x/one", b"1"), ("x/two", b"22"), ("x/three", &[0xff; 333])]);
    db.py_put(&values);
    let local = tempdir("kept-local");
    let m = Mount::on(&db).local_dir(local.path()).start();
    let sizes = m.sh("stat -c '%n %s' x/*").ok();
    assert_eq!(sizes.text(), "x/one 1\nx/three 333\nx/two 2\n");
    m.unmount();

    let m = Mount::on(&db).local_dir(local.path()).start();
    assert_eq!(m.sh("stat -c '%n %s' x/*").ok().text(), sizes.text());
    let stats = m.stats();
    assert_eq!(stats["s3_requests"]["get_range"], 0, "{stats}");
    assert_eq!(
        stats["s3_requests"]["get"], 2,
        "only the index and the attribute object: {stats}"
    );
    m.unmount();
}

#[test]
fn a_value_past_the_format_limit_fails_with_efbig() {
    let db = Db::new();
    let m = Mount::on(&db).start();
    m.sh("truncate -s 5G big").fails_with(&["File too large"]);
    m.sh("echo fine > small").ok();
    assert_eq!(m.read("small"), b"fine\n");
    m.unmount();
}

/// `scripts/bench_mount.sh` keeps working: a tiny N on this build's daemon.
/// Its figures are not checked (performance lives in the benchmark).
#[test]
fn the_mount_benchmark_script_runs() {
    require_fuse();
    let bin_dir = daemon_bin().parent().expect("bin dir").to_path_buf();
    let out = Command::new(common::repo_root().join("scripts/bench_mount.sh"))
        .args(["3", "1"])
        .env("S4DB_BENCH_BIN", bin_dir)
        .output()
        .expect("run scripts/bench_mount.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench_mount.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("| create 3 files of 256 B + publish |"),
        "{stdout}"
    );
}

/// `scripts/bench_scale.sh` keeps working: a tiny N on this build's binaries,
/// its JSON checked for shape and sanity, not for speed.
#[test]
fn the_scale_benchmark_script_runs() {
    require_fuse();
    let bin_dir = daemon_bin().parent().expect("bin dir").to_path_buf();
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::repo_root().join("scripts/bench_scale.sh"))
        .args(["--keys", "2000", "--out"])
        .arg(out_dir.path())
        .env("S4DB_BENCH_BIN", bin_dir)
        .output()
        .expect("run scripts/bench_scale.sh");
    assert!(
        out.status.success(),
        "bench_scale.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let json = std::fs::read(out_dir.path().join("scale.json")).expect("scale.json");
    let r: Json = serde_json::from_slice(&json).expect("scale.json is JSON");
    assert_eq!(r["keys"], 2000);
    assert_eq!(r["ls_mount"]["entries"], 200, "{r}");
    assert_eq!(r["ls_mount"]["next_3_s3_requests"], 0, "{r}");
    let secs = |v: &Json| v.as_f64().filter(|s| *s >= 0.0);
    for v in [
        &r["mount"]["command_s"],
        &r["mount"]["ready_after_index_get_s"],
        &r["ls_mount"]["first_s"],
        &r["ls_disk"]["median_s"],
    ] {
        assert!(secs(v).is_some(), "{v} in {r}");
    }
    for phase in ["ready", "hints_loaded", "after_ls"] {
        let m = &r["memory"][phase];
        let (rss, hwm) = (m["rss_mb"].as_f64().unwrap(), m["hwm_mb"].as_f64().unwrap());
        assert!(rss > 0.0 && hwm >= rss, "{phase}: {m}");
    }
    assert!(out_dir.path().join("scale.md").exists());
}

/// `scripts/bench_peers.sh` keeps working against s3fs, rclone and the local
/// disk (quick mode, one pass through the latency proxy), and
/// `scripts/bench_report.py` turns its results into the benchmark document.
/// Every workload must finish with its result checked in the bucket; the
/// figures themselves are not judged.
#[test]
fn the_peer_benchmark_and_its_report_run() {
    require_fuse();
    let root = common::repo_root();
    let bin_dir = daemon_bin().parent().expect("bin dir").to_path_buf();
    let out_dir = tempfile::tempdir().unwrap();
    let run = |program: PathBuf, args: &[&str]| {
        let out = Command::new(&program)
            .args(args)
            .env("S4DB_BENCH_BIN", &bin_dir)
            .env("S4DB_BENCH_OUT", out_dir.path())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{} failed:\n{stdout}\n{}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    run(
        root.join("scripts/bench_peers.sh"),
        &["--quick", "--rtt-ms", "20"],
    );
    let r: Json = serde_json::from_slice(
        &fs::read(out_dir.path().join("peers-20ms.json")).expect("peers-20ms.json"),
    )
    .expect("peers-20ms.json is JSON");
    for (wid, tools) in r["results"].as_object().unwrap() {
        for (tool, e) in tools.as_object().unwrap() {
            let status = e["status"].as_str().unwrap();
            // A peer may hit its cap; nothing may fail, and s4db always finishes.
            // The walk of many keys runs on s4db and the local disk only.
            let fine = status == "ok"
                || (status == "timeout" && tool != "s4db")
                || (status == "not run" && (tool == "local" || wid == "walk"));
            assert!(fine, "{tool} {wid}: {e}");
            // Every daemon's peak memory is measured, in every workload it ran.
            if tool != "local" && status != "not run" {
                assert!(
                    e["peak_hwm_mb"].as_f64().unwrap() > 0.0,
                    "{tool} {wid}: {e}"
                );
            }
        }
    }
    for wid in ["huge_w", "huge_r", "grep", "tar", "walk"] {
        assert_eq!(r["results"][wid]["s4db"]["status"], "ok", "{wid}");
    }
    // The walk is served from what the mount loaded: no request at all.
    let walk = &r["results"]["walk"]["s4db"];
    assert_eq!(walk["requests"], 0, "{walk}");
    // The one-connection reference read the data file of the large file.
    let single = &r["single_conn"];
    assert!(
        single["bytes"].as_u64().unwrap() >= r["huge_mib"].as_u64().unwrap() << 20,
        "{single}"
    );
    let cold = &r["results"]["cold"]["s4db"];
    // At most one range GET per file; a scan of many takes its neighbours along.
    let ranges = cold["s4db_stats"]["get_range"].as_u64().unwrap();
    assert!((1..=r["n"].as_u64().unwrap()).contains(&ranges), "{cold}");
    let doc = out_dir.path().join("BENCHMARKS.md");
    let report = root.join("scripts/bench_report.py");
    let results = out_dir.path().to_str().unwrap();
    run(
        Py::v10().python,
        &[
            report.to_str().unwrap(),
            "--results",
            results,
            "--out",
            doc.to_str().unwrap(),
        ],
    );
    let text = fs::read_to_string(&doc).unwrap();
    for row in [
        "| cold read of 20 files (+20 ms RTT) |",
        "| 16 MiB cold sequential read (+20 ms RTT, 80 MB/s per connection) |",
        "| 16 MiB write + publish (+20 ms RTT) |",
        "| cold `grep -r` of 200 files of 4 KiB (+20 ms RTT) |",
        "| cold `tar c` of 200 files of 4 KiB (+20 ms RTT) |",
        "| os.walk + os.stat of 2,000 keys in 100 directories |",
        "| daemon memory during the large-file, scan and walk workloads |",
    ] {
        assert!(text.contains(row), "{row} missing:\n{text}");
    }
    assert!(text.contains("$ per 1,000 runs"), "{text}");
}

// ======================================================= attributes across writers

/// `stat` of every name below the mount root as `mode uid gid name`, sorted.
fn modes(m: &Mount) -> String {
    m.sh("find . -path ./.s4db -prune -o -mindepth 1 -printf '%m %U %G %y %p\\n' | sort -k5")
        .ok()
        .text()
}

/// Two mounts chmod and chown different keys at the same time: after both
/// upload (one of them rebasing onto the other), every change is kept, as a
/// third mount on a fresh local directory sees.
#[test]
fn two_mounts_chmod_and_chown_different_keys_and_both_keep_their_change() {
    let db = Db::new();
    let a = Mount::on(&db).args(&["--upload-delay", "never"]).start();
    a.sh("mkdir d && for i in 1 2 3 4; do echo $i > d/f$i; done")
        .ok();
    a.upload();
    let b = Mount::on(&db).args(&["--upload-delay", "never"]).start();
    a.sh("chmod 600 d/f1 && chown 65534:65534 d/f2").ok();
    b.sh("chmod 751 d/f3 && chown 1:2 d/f4 && chmod 700 d").ok();
    let (ta, tb) = (a.path(".s4db/upload"), b.path(".s4db/upload"));
    let ua = std::thread::spawn(move || fs::write(ta, b"1"));
    let ub = std::thread::spawn(move || fs::write(tb, b"1"));
    ua.join().unwrap().unwrap();
    ub.join().unwrap().unwrap();
    a.unmount();
    b.unmount();
    let c = Mount::on(&db).start();
    assert_eq!(
        modes(&c),
        "700 0 0 d ./d\n600 0 0 f ./d/f1\n644 65534 65534 f ./d/f2\n751 0 0 f ./d/f3\n644 1 2 f ./d/f4\n"
    );
    c.unmount();
    // Python sees the values only.
    db.assert_python_sees(&tree(&[
        ("d/f1", b"1\n"),
        ("d/f2", b"2\n"),
        ("d/f3", b"3\n"),
        ("d/f4", b"4\n"),
    ]));
}

/// A daemon killed after writing data and changing attributes, before any
/// upload: the next start publishes both, together.
#[test]
fn a_crash_between_writing_data_and_publishing_its_attributes_loses_neither() {
    let db = Db::new();
    let local = tempdir("local");
    let m = Mount::on(&db)
        .local_dir(local.path())
        .args(&["--upload-delay", "never"])
        .start();
    m.sh("echo 'echo ran' > run.sh && chmod 755 run.sh && ln -s run.sh link && mkdir -m 700 private && mkfifo pipe && setfattr -n user.k -v v run.sh && touch -d 2001-02-03 run.sh")
        .ok();
    let before = m
        .sh("stat -c '%A %Y %N' run.sh link private pipe")
        .ok()
        .text();
    m.kill9();
    assert_eq!(db.py_values(), BTreeMap::new(), "nothing was uploaded");
    let m = Mount::on(&db)
        .local_dir(local.path())
        .args(&["--upload-delay", "never"])
        .start();
    m.upload();
    m.unmount();
    let fresh = Mount::on(&db).start();
    assert_eq!(
        fresh
            .sh("stat -c '%A %Y %N' run.sh link private pipe")
            .ok()
            .text(),
        before
    );
    assert_eq!(
        fresh
            .sh("getfattr -n user.k --only-values run.sh")
            .ok()
            .text(),
        "v"
    );
    assert_eq!(
        fresh.sh("./run.sh; readlink link").ok().text(),
        "ran\nrun.sh\n"
    );
    fresh.unmount();
}

// ======================================================= large cold reads

/// A large cold value is read by parallel part GETs (`--read-part-size`),
/// byte for byte; a corrupted object fails the read with EIO at the latest
/// when the value's last byte would be returned.
#[test]
fn large_cold_reads_fetch_parts_in_parallel_and_a_bad_crc_fails_with_eio() {
    let db = Db::new();
    let src = tempdir("src");
    let big = noise(12_000_000);
    fs::write(src.path().join("big"), &big).unwrap();
    let m = Mount::on(&db).start();
    m.sh(&format!("cp {} big", q(&src.path().join("big")))).ok();
    m.upload();
    m.unmount();

    let parts = ["--read-part-size", "2000000", "--max-threads", "4"];
    let m = Mount::on(&db).args(&parts).start();
    assert_eq!(fs::read(m.path("big")).unwrap(), big);
    let stats = m.stats();
    let ranges = stats["s3_requests"]["get_range"].as_u64().unwrap();
    assert!((6..=8).contains(&ranges), "6 parts and a head: {stats}");
    assert!(
        stats["s3_requests"]["max_in_flight"].as_u64().unwrap() >= 2,
        "{stats}"
    );
    m.unmount();

    // One byte flipped in the middle of the value: the read fails.
    let object = db.data_objects().pop().unwrap();
    let mut bytes = db.get_object(&object);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    db.put_object(&object, &bytes);
    let m = Mount::on(&db).args(&parts).start();
    let err = fs::read(m.path("big")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // A read that stops short of the end is served (the CRC cannot be
    // checked before every part is in), a read to the end is not.
    m.sh("dd if=big of=/dev/null bs=1M count=1 status=none")
        .ok();
    m.sh("cat big > /dev/null")
        .fails_with(&["Input/output error"]);
    m.unmount();
}

/// Drops the clean pages the kernel caches for `file`, so the next read
/// reaches the daemon.
fn drop_page_cache(file: &fs::File) {
    use std::os::fd::AsRawFd;
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
}

/// A large cold read holds only a window of parts: a read at the start
/// fetches no more than the parts in flight ahead of it, and a part read
/// again after it left the window is fetched again (that it must match its
/// first read is the unit test in `src/fs/stream.rs`). A write to a value
/// being streamed loads it whole first.
#[test]
fn a_large_cold_read_keeps_a_window_of_parts_and_loads_whole_to_write() {
    let db = Db::new();
    let big = noise(12_345_678);
    let m = Mount::on(&db).start();
    fs::write(m.path("big"), &big).unwrap();
    m.upload();
    m.unmount();

    let parts = ["--read-part-size", "2000000", "--max-threads", "2"];
    let m = Mount::on(&db).args(&parts).start();
    let ranges = || m.stats()["s3_requests"]["get_range"].as_u64().unwrap();
    let before = ranges();
    let f = fs::File::open(m.path("big")).unwrap();
    let mut head = [0u8; 4096];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head[..], &big[..4096]);
    // Part 0 and the two parts ahead of it, never all seven.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(ranges() - before, 3, "the window is 2 parts ahead");

    let mut all = Vec::new();
    std::io::Read::read_to_end(&mut &f, &mut all).unwrap();
    assert!(all == big, "the value reads back different");
    assert_eq!(ranges() - before, 7, "each of 7 parts once");

    // Part 0 left the window: read again, it is fetched again.
    drop_page_cache(&f);
    f.read_exact_at(&mut head, 100).unwrap();
    assert_eq!(&head[..], &big[100..4196]);
    assert_eq!(ranges() - before, 8, "part 0 fetched again");
    drop(f);

    // A write while another handle streams the value: loaded whole first,
    // both handles then see the write.
    let reader = fs::File::open(m.path("big")).unwrap();
    drop_page_cache(&reader);
    reader.read_exact_at(&mut head, 0).unwrap();
    let writer = fs::OpenOptions::new()
        .write(true)
        .open(m.path("big"))
        .unwrap();
    writer.write_all_at(b"changed", 5_000_000).unwrap();
    let mut expected = big.clone();
    expected[5_000_000..5_000_007].copy_from_slice(b"changed");
    let mut got = [0u8; 7];
    reader.read_exact_at(&mut got, 5_000_000).unwrap();
    assert_eq!(&got, b"changed");
    drop((reader, writer));
    assert!(
        m.read("big") == expected,
        "the written value reads back different"
    );
    m.unmount();
}

// ============================================================ write-behind

/// The multipart uploads moto holds for `db`'s bucket.
fn open_uploads(db: &Db) -> usize {
    let (status, body) = db
        .moto
        .request("GET", &format!("/{}?uploads", db.bucket), b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    String::from_utf8_lossy(&body).matches("<Upload>").count()
}

/// Polls `what` (up to 30 s) until `done` holds for it.
#[track_caller]
fn until<T: std::fmt::Debug>(what: impl Fn() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = what();
        if done(&got) {
            return got;
        }
        assert!(Instant::now() < deadline, "still {got:?} after 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Write-behind: the parts of a large file go up while it is written
/// (nothing is published before the upload), a part written again after it
/// was sent is sent again at the upload, and the object then reads back byte
/// for byte on a fresh mount. A large file removed while open leaves no
/// multipart upload behind.
#[test]
fn a_large_file_goes_up_while_it_is_written() {
    const MIB: usize = 1024 * 1024;
    let db = Db::new();
    let m = Mount::on(&db).args(&["--upload-delay", "never"]).start();
    let mut big = noise(40 * MIB);
    let mut f = fs::File::create(m.path("big")).unwrap();
    for chunk in big.chunks(MIB) {
        f.write_all(chunk).unwrap();
    }
    // Data-file bytes 8 to 40 MiB are parts 2 to 5 (8 MiB parts): sent
    // while the file is still open.
    let puts = || m.stats()["s3_requests"]["put"].as_u64().unwrap();
    until(puts, |n| *n >= 4);
    assert!(db.data_objects().is_empty(), "nothing published yet");
    // Back into part 2, already sent.
    f.write_all_at(b"written again", 10 * MIB as u64).unwrap();
    big[10 * MIB..10 * MIB + 13].copy_from_slice(b"written again");
    drop(f);
    m.upload();
    assert_eq!(open_uploads(&db), 0, "the upload was completed");
    let local = db
        .data_objects()
        .into_iter()
        .filter_map(|name| Some((fs::read(m.local_dir.join(&name)).ok()?, name)))
        .find(|(bytes, _)| bytes.len() > 40 * MIB);
    let (local, object) = local.expect("the large file's data file");
    assert!(
        db.get_object(&object) == local,
        "object and local file differ"
    );
    m.unmount();
    let m = Mount::on(&db).start();
    assert!(m.read("big") == big, "the large file reads back different");

    // Put at an fsync (its file linked into place as the data file) and
    // published, then written again while still open: the data file
    // published first must not change (it still equals its object).
    let mut again = noise(24 * MIB);
    let mut g = fs::File::create(m.path("again")).unwrap();
    for chunk in again.chunks(MIB) {
        g.write_all(chunk).unwrap();
    }
    g.sync_all().unwrap();
    m.upload();
    g.write_all_at(b"second version", 0).unwrap();
    again[..14].copy_from_slice(b"second version");
    drop(g);
    m.upload();
    for name in db.data_objects() {
        if let Ok(local) = fs::read(m.local_dir.join(&name)) {
            assert!(
                db.get_object(&name) == local,
                "{name}: object and local file differ"
            );
        }
    }
    m.unmount();
    let m = Mount::on(&db).start();
    assert!(
        m.read("again") == again,
        "the file written after fsync reads back different"
    );

    // Removed while open: its upload is aborted.
    let mut gone = fs::File::create(m.path("gone")).unwrap();
    for chunk in noise(24 * MIB).chunks(MIB) {
        gone.write_all(chunk).unwrap();
    }
    until(|| open_uploads(&db), |n| *n == 1);
    m.sh("rm gone").ok();
    drop(gone);
    until(|| open_uploads(&db), |n| *n == 0);
    m.unmount();
}

/// A cold scan of many small files (`cat */*`, `tar c`, `grep -r`) takes the
/// entries that follow in the data file in one range GET per MiB; a lone
/// `cat` stays one GET of exactly its entry.
#[test]
fn cold_scans_of_small_files_cost_one_get_per_mib() {
    let db = Db::new();
    let m = Mount::on(&db).start();
    m.sh("for d in a b c; do mkdir $d; for i in $(seq 100 399); do head -c 2000 /dev/urandom | base64 -w0 > $d/f$i; done; done")
        .ok();
    m.upload();
    m.unmount();
    let total: u64 = 900 * 2668;

    let m = Mount::on(&db).start();
    m.sh("cat b/f200 > /dev/null").ok();
    assert_eq!(
        m.stats()["s3_requests"]["get_range"],
        1,
        "one file: one GET"
    );
    m.unmount();

    for scan in [
        "cat */* > /dev/null",
        "tar cf - a b c | wc -c > /dev/null",
        "grep -r zzzzzzzz . || true",
    ] {
        let m = Mount::on(&db).start();
        let expected = m.sh(&format!("{scan}; echo done")).ok();
        assert!(expected.text().ends_with("done\n"));
        let ranges = m.stats()["s3_requests"]["get_range"].as_u64().unwrap();
        let mib = total.div_ceil(1 << 20);
        assert!(
            ranges <= mib + 3,
            "`{scan}`: {ranges} range GETs for {total} bytes ({mib} MiB)"
        );
        m.unmount();
    }
    // And the bytes are right.
    let m = Mount::on(&db).start();
    let sums = m.sh("md5sum */* | md5sum").ok().text();
    m.unmount();
    let m = Mount::on(&db).start();
    let one_by_one = m
        .sh("for f in */*; do md5sum $f; done | md5sum")
        .ok()
        .text();
    assert_eq!(sums, one_by_one);
    m.unmount();
}

/// The kernel may keep names and attributes for long, so a refresh that
/// brings another writer's commit must invalidate what it changed: new
/// contents, sizes and modes show, a deleted file is gone, a new one appears.
#[test]
fn a_refresh_invalidates_what_other_writers_changed() {
    let db = Db::new();
    db.py_put(&tree(&[("f", b"old"), ("gone", b"x"), ("same", b"s")]));
    let a = Mount::on(&db)
        .args(&["--refresh-interval", "never"])
        .start();
    assert_eq!(
        a.sh("cat f gone same; stat -c '%s %a' f").ok().text(),
        "oldxs3 644\n"
    );
    db.py_put(&tree(&[("f", b"newer value"), ("added", b"a")]));
    db.tool(
        &Py::v10(),
        &["apply"],
        br#"[{"op": "delete", "keys": ["gone"]}, {"op": "upload"}]"#,
    );
    let b = Mount::on(&db).start();
    b.sh("chmod 600 same").ok();
    b.upload();
    b.unmount();
    // Still cached: nothing tells the kernel until the refresh.
    fs::write(a.path(".s4db/refresh"), b"1").unwrap();
    assert_eq!(
        a.sh("cat f; echo; stat -c '%s' f; stat -c '%a' same; ls")
            .ok()
            .text(),
        "newer value\n11\n600\nadded\nf\nsame\n"
    );
    assert!(!a.path("gone").exists());
    a.unmount();
}

// ======================================================= 12. a mount that runs for months

/// Options of a mount that compacts and collects garbage at once (test speed).
const MAINTAIN_FAST: &[&str] = &["--compact", "0.2", "--gc", "0.3", "--gc-grace", "0"];

/// Every S3 request the mount made so far.
fn requests(stats: &Json) -> u64 {
    let r = &stats["s3_requests"];
    ["get", "get_range", "put", "delete", "list", "head"]
        .iter()
        .map(|f| r[f].as_u64().unwrap_or(0))
        .sum()
}

/// Polls `cond` every 200 ms for up to `secs` seconds.
#[track_caller]
fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not after {secs} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn fifteen_hundred_small_uploads_leave_few_objects_and_a_fresh_mount_lists_them_in_few_requests() {
    let db = Db::new();
    let m = Mount::on(&db)
        .args(&["--upload-delay", "never"])
        .args(MAINTAIN_FAST)
        .start();
    m.sh("mkdir d0 d1 d2 d3 d4 d5 d6 d7 d8 d9").ok();
    let t0 = Instant::now();
    for batch in 0..10 {
        let (from, to) = (batch * 150 + 1, batch * 150 + 150);
        m.sh(&format!(
            "i={from}; while [ $i -le {to} ]; do echo \"value $i\" > d$((i % 10))/f$i; \
             echo > .s4db/upload; i=$((i + 1)); done"
        ))
        .ok();
    }
    eprintln!("1,500 uploads in {:.1} s", t0.elapsed().as_secs_f64());
    // Compaction and gc catch up (gc's grace is 0 here).
    wait_until(60, "objects bounded", || {
        db.objects().len() <= 200
            && m.stats()["maintenance"]["objects_deleted"].as_u64() > Some(2000)
    });
    let stats = m.stats();
    let maint = &stats["maintenance"];
    assert!(maint["compactions"].as_u64() > Some(0), "{stats}");
    assert!(maint["objects_deleted"].as_u64() > Some(2000), "{stats}");
    m.unmount();
    let objects = db.objects();
    assert!(
        objects.len() <= 200,
        "{} objects: {objects:?}",
        objects.len()
    );

    // A fresh mount (fresh local dir, no maintenance of its own) lists everything.
    let fresh = Mount::on(&db)
        .args(&["--compact", "never", "--gc", "never"])
        .start();
    let listing = fresh.sh("ls -lR | grep -c ' f[0-9]*$'").ok().text();
    assert_eq!(listing.trim(), "1500");
    std::thread::sleep(Duration::from_millis(500));
    let stats = fresh.stats();
    eprintln!(
        "{} objects; a fresh ls -lR: {} S3 requests ({})",
        objects.len(),
        requests(&stats),
        stats["s3_requests"]
    );
    assert!(
        requests(&stats) <= 20,
        "{} S3 requests for a fresh ls -lR of 1,500 files in {} objects: {stats}",
        requests(&stats),
        objects.len()
    );
    assert_eq!(fresh.read("d7/f1337"), b"value 1337\n");
    assert_eq!(fresh.read("d0/f1500"), b"value 1500\n");
    fresh.unmount();
}

#[test]
fn compaction_runs_while_another_mount_and_python_read_and_write_and_nothing_is_lost() {
    let db = Db::new();
    let a = Mount::on(&db)
        .args(&["--upload-delay", "0.1", "--refresh-interval", "0.5"])
        .args(&["--compact", "0.2", "--gc", "0.3", "--gc-grace", "3"])
        .start();
    let b = Mount::on(&db)
        .args(&["--upload-delay", "0.1", "--refresh-interval", "0.5"])
        .args(&["--compact", "0.3", "--gc", "never"])
        .start();
    let mut want = Tree::new();
    for round in 0..8 {
        for i in 0..15 {
            let (ka, kb) = (format!("a/{round}-{i}"), format!("b/{round}-{i}"));
            fs::create_dir_all(a.path("a")).unwrap();
            fs::create_dir_all(b.path("b")).unwrap();
            fs::write(a.path(&ka), format!("from a {round} {i}")).unwrap();
            fs::write(b.path(&kb), format!("from b {round} {i}")).unwrap();
            want.insert(ka, format!("from a {round} {i}").into_bytes());
            want.insert(kb, format!("from b {round} {i}").into_bytes());
        }
        // Overwrites of keys an earlier round wrote (dead entries to compact).
        if round > 0 {
            let k = format!("a/{}-0", round - 1);
            fs::write(a.path(&k), format!("rewritten {round}")).unwrap();
            want.insert(k, format!("rewritten {round}").into_bytes());
        }
        let py = tree(&[(&format!("py/{round}") as &str, b"from python")]);
        db.py_put(&py);
        want.extend(py);
        // Both mounts read everything they can see, while the other compacts.
        for m in [&a, &b] {
            m.sh("find . -path ./.s4db -prune -o -type f -print | xargs -r cat > /dev/null")
                .ok();
        }
    }
    a.upload();
    b.upload();
    db.wait_python_sees(&want);
    wait_until(30, "both mounts see everything", || {
        a.tree() == want && b.tree() == want
    });
    let sa = a.stats();
    assert!(sa["maintenance"]["compactions"].as_u64() > Some(0), "{sa}");
    assert_eq!(sa["maintenance"]["last_error"], Json::Null, "{sa}");
    assert_eq!(b.stats()["maintenance"]["last_error"], Json::Null);
    a.unmount();
    b.unmount();
    db.assert_python_sees(&want);
    let fresh = Mount::on(&db).start();
    assert_eq!(fresh.tree(), want);
    fresh.unmount();
}

fn local_data_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("data_") && n.ends_with(".s4db"))
        .collect();
    names.sort();
    names
}

#[test]
fn the_cache_cap_evicts_published_files_only() {
    let db = Db::new();
    let local = tempdir("local");
    let m = Mount::on(&db)
        .local_dir(local.path())
        .args(&["--upload-delay", "never", "--max-cache-size", "0"])
        .args(&["--compact", "never", "--gc", "0.2", "--gc-grace", "3600"])
        .start();
    for i in 0..3 {
        fs::write(m.path(&format!("published{i}")), format!("p{i}")).unwrap();
        m.upload();
    }
    fs::write(m.path("unsynced1"), "u1").unwrap();
    fs::write(m.path("unsynced2"), "u2").unwrap();
    // Only the file holding the unsynced writes stays.
    wait_until(10, "published files evicted", || {
        local_data_files(&m.local_dir).len() == 1
    });
    let stats = m.stats();
    assert!(
        stats["maintenance"]["evicted_files"].as_u64() >= Some(3),
        "{stats}"
    );
    assert_eq!(stats["unsynced_writes"], 2, "{stats}");
    for i in 0..3 {
        assert_eq!(m.read(&format!("published{i}")), format!("p{i}").as_bytes());
    }
    // A crash now: the unsynced writes are still there for the next mount.
    m.kill9();
    let m = Mount::on(&db).local_dir(local.path()).start();
    m.upload();
    m.unmount();
    db.assert_python_sees(&tree(&[
        ("published0", b"p0"),
        ("published1", b"p1"),
        ("published2", b"p2"),
        ("unsynced1", b"u1"),
        ("unsynced2", b"u2"),
    ]));
}

#[test]
fn kill_9_during_background_compaction_loses_nothing_and_leaves_nothing_dangling() {
    let db = Db::new();
    let local = tempdir("local");
    let m = Mount::on(&db)
        .local_dir(local.path())
        .args(&["--upload-delay", "never"])
        .args(&["--compact", "0.05", "--gc", "never"])
        .start();
    let logdir = tempdir("log");
    let log = logdir.path().join("written.log");
    // Uploads of one file each, with compaction rounds in between; the log
    // (outside the mount) lists the writes that returned.
    let script = format!(
        "i=1; while [ $i -le 400 ]; do echo v$i > f$i && echo $i >> {log}; \
         echo > .s4db/upload || true; i=$((i + 1)); done",
        log = q(&log)
    );
    let mut writer = Command::new("sh")
        .args(["-c", &script])
        .current_dir(&m.mnt)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Enough writes that the kill lands among them (on a loaded machine
    // three compactions can pass before ten writes).
    wait_until(60, "compaction has run among the writes", || {
        m.stats()["maintenance"]["compactions"].as_u64() >= Some(3)
            && fs::read_to_string(&log).is_ok_and(|l| l.lines().count() > 10)
    });
    std::thread::sleep(Duration::from_millis(150));
    m.kill9();
    let _ = writer.wait();
    let written: Vec<String> = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert!(written.len() > 10, "{written:?}");

    // The next mount publishes what was acknowledged; gc then leaves only
    // what the index references (and one hint object per data file).
    let m = Mount::on(&db)
        .local_dir(local.path())
        .args(MAINTAIN_FAST)
        .start();
    m.upload();
    for i in &written {
        assert_eq!(
            m.read(&format!("f{i}")),
            format!("v{i}\n").as_bytes(),
            "f{i}"
        );
    }
    wait_until(30, "nothing dangling", || {
        let stats = m.stats();
        let objects = db.objects();
        let data = objects.iter().filter(|n| n.starts_with("data_")).count();
        let hints = objects.iter().filter(|n| n.starts_with("hints/")).count();
        data as u64 == stats["files"].as_u64().unwrap() && hints <= data
    });
    m.unmount();
    let seen = db.py_values();
    for i in &written {
        assert_eq!(
            seen.get(&format!("f{i}")),
            Some(&py_value(format!("v{i}\n").as_bytes())),
            "f{i}"
        );
    }
}

#[test]
fn the_local_directory_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let user = other_user();
    let db = Db::new();
    // A local directory the daemon creates: 0700, its files 0600.
    let launch = Mount::on(&db).args(&["--upload-delay", "never"]);
    let fresh_dir = launch.root.path().join("new/local");
    let m = launch.local_dir(&fresh_dir).start();
    fs::write(m.path("secret"), "top secret").unwrap();
    m.upload();
    fs::write(m.path("unsynced"), "not yet").unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&fresh_dir), 0o700);
    for e in fs::read_dir(&fresh_dir).unwrap() {
        let p = e.unwrap().path();
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&p), want, "{p:?}");
    }
    let ls = format!("runuser -u {user} -- ls {}", q(&fresh_dir));
    sh_in(Path::new("/"), &ls).fails_with(&["Permission denied"]);
    m.unmount();

    // A given directory open to others: a warning, and the files are still 0600.
    let launch = Mount::on(&db);
    fs::set_permissions(&launch.local_dir, fs::Permissions::from_mode(0o755)).unwrap();
    let m = launch.start();
    fs::write(m.path("x"), "y").unwrap();
    assert!(m.output().contains("open to other users"), "{}", m.output());
    let data = local_data_files(&m.local_dir);
    assert!(!data.is_empty());
    let cat = format!(
        "runuser -u {user} -- cat {}",
        q(&m.local_dir.join(&data[0]))
    );
    sh_in(Path::new("/"), &cat).fails_with(&["Permission denied"]);
    m.unmount();
}

/// A read moves the atime as relatime would, without an upload of its own;
/// the change is published with the next upload (here: at unmount), so a
/// mount on another machine sees it.
#[test]
fn atime_moves_on_read_as_relatime_and_is_published_without_an_upload_of_its_own() {
    let db = Db::new();
    let m = Mount::on(&db).args(&["--upload-delay", "0.2"]).start();
    m.sh("echo data > f && touch -a -d @981158400 f").ok();
    m.upload();
    m.unmount();

    let m = Mount::on(&db).args(&["--upload-delay", "0.2"]).start();
    assert_eq!(m.sh("stat -c %X f").ok().text(), "981158400\n");
    m.sh("cat f > /dev/null").ok();
    std::thread::sleep(Duration::from_millis(800));
    let stats = m.stats();
    assert_eq!(
        stats["s3_requests"]["put"], 0,
        "a read uploads nothing: {stats}"
    );
    m.unmount();

    let fresh = Mount::on(&db).start();
    let atime: u64 = fresh.sh("stat -c %X f").ok().text().trim().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        now - atime < 60,
        "atime {atime} was not moved by the read (now {now})"
    );
    fresh.unmount();
}
