//! s4db in containers, with the real podman (README "In containers"):
//!
//! - a host mount with `--allow-other`, bind-mounted into a container where a non-root
//!   user reads and writes;
//! - the daemon itself in a container (the image from `Containerfile`, `/dev/fuse`,
//!   `--cap-add SYS_ADMIN`), publishing to the moto server on the host's loopback
//!   (`--network=host`), its local dir on a bind-mounted host dir or a podman volume, and
//!   its mount shared back to the host (`rshared`).
//!
//! The images come from `scripts/container.sh image`, built once per test binary from the
//! binaries under test; the debootstrap base image is made once and kept between runs.
//! A missing podman, runc, debootstrap or /dev/fuse is a failure, never a skip
//! (`scripts/test.sh` installs them).

mod common;

use common::mount::*;
use common::{repo_root, s4db_cli, Moto, PyValue, REGION};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The image the tests build from the binaries under test (never the human's `:latest`).
const IMAGE: &str = "localhost/s4db:test";
/// The plain Debian base `scripts/container.sh` makes with debootstrap.
const BASE: &str = "localhost/s4db-base:bookworm";
/// The unprivileged user inside the containers.
const UID: u32 = 1000;
/// Seconds a podman command may take before it counts as hung.
const PODMAN_TIMEOUT_SECS: &str = "180";

// ------------------------------------------------------------------ podman

/// podman, runc, debootstrap and FUSE must be here: a failure, never a skip.
fn require_tools() {
    require_fuse();
    for (program, package) in [
        ("podman", "podman"),
        ("runc", "runc"),
        ("debootstrap", "debootstrap"),
    ] {
        require_program(program, package);
    }
}

/// What `scripts/container.sh image` made, once per test binary: its containers.conf
/// (runc, explicit ulimits) and the id of [`IMAGE`] built from the binaries under test (the
/// id, not the tag: a concurrent test run may retag it).
struct Built {
    conf: PathBuf,
    image_id: String,
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        require_tools();
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_s4db-mount"))
            .parent()
            .expect("binary dir")
            .to_path_buf();
        assert!(
            bin_dir.join("s4db").exists(),
            "s4db is not beside s4db-mount in {bin_dir:?}"
        );
        let started = Instant::now();
        let out = Command::new(repo_root().join("scripts/container.sh"))
            .arg("image")
            .arg("--bin-dir")
            .arg(&bin_dir)
            .args(["--tag", IMAGE])
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/container.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "scripts/container.sh image failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "container.rs: {IMAGE} built in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let conf = stdout
            .lines()
            .find_map(|l| l.strip_prefix("export CONTAINERS_CONF="))
            .unwrap_or_else(|| panic!("no CONTAINERS_CONF from scripts/container.sh:\n{stdout}"));
        let image_id = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("# image {IMAGE} is ")))
            .unwrap_or_else(|| panic!("no image id from scripts/container.sh:\n{stdout}"));
        Built {
            conf: PathBuf::from(conf),
            image_id: image_id.trim().to_string(),
        }
    })
}

fn containers_conf() -> &'static Path {
    &built().conf
}

/// The s4db image under test, by id.
fn image() -> &'static str {
    &built().image_id
}

/// `podman ARGS` with the test containers.conf; never hangs past [`PODMAN_TIMEOUT_SECS`].
fn podman(args: &[&str]) -> Sh {
    let out = Command::new("timeout")
        .args(["-k", "5", PODMAN_TIMEOUT_SECS, "podman"])
        .args(args)
        .env("CONTAINERS_CONF", containers_conf())
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .expect("run podman");
    Sh {
        script: format!("podman {}", args.join(" ")),
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A name no other test (or concurrent test run) uses: `s4db-test-<pid>-<n>-<what>`.
fn unique_name(what: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "s4db-test-{}-{}-{what}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named container, removed (`podman rm -f`) when dropped, so a failing test leaves
/// nothing running.
struct Container {
    name: String,
}

impl Container {
    /// `podman run -d --name NAME ARGS` (ARGS: options, image, command).
    #[track_caller]
    fn run(what: &str, args: &[&str]) -> Container {
        let container = Container {
            name: unique_name(what),
        };
        let mut all = vec!["run", "-d", "--name", container.name.as_str()];
        all.extend_from_slice(args);
        podman(&all).ok();
        container
    }

    fn logs(&self) -> String {
        let out = podman(&["logs", &self.name]);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), out.stderr);
        let start = text.len().saturating_sub(8192);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text[start..].to_string()
    }

    fn running(&self) -> bool {
        podman(&["inspect", "--format", "{{.State.Running}}", &self.name])
            .text()
            .trim()
            == "true"
    }

    /// `podman exec NAME sh -ec SCRIPT` as root (the daemon's user), C locale.
    fn exec(&self, script: &str) -> Sh {
        podman(&["exec", "-e", "LC_ALL=C", &self.name, "sh", "-ec", script])
    }

    /// Waits until the container's `/proc/mounts` shows a FUSE mount on `mnt`.
    #[track_caller]
    fn wait_mounted(&self, mnt: &str) {
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        let check = format!("grep -q ' {mnt} fuse ' /proc/mounts");
        loop {
            if self.exec(&check).code == Some(0) {
                return;
            }
            assert!(
                self.running(),
                "the container exited before mounting {mnt}:\n{}",
                self.logs()
            );
            assert!(
                Instant::now() < deadline,
                "{mnt} not mounted in the container after {MOUNT_TIMEOUT:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `podman stop -t 60`: SIGTERM, so s4db-mount uploads, unmounts and exits; returns
    /// the exit code.
    #[track_caller]
    fn stop(&self) -> i64 {
        podman(&["stop", "-t", "60", &self.name]).ok();
        let code = podman(&["inspect", "--format", "{{.State.ExitCode}}", &self.name]).ok();
        code.text().trim().parse().expect("exit code")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]);
    }
}

/// A podman volume, removed when dropped.
struct Volume {
    name: String,
}

impl Volume {
    #[track_caller]
    fn create() -> Volume {
        let volume = Volume {
            name: unique_name("local"),
        };
        podman(&["volume", "create", &volume.name]).ok();
        volume
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = podman(&["volume", "rm", "-f", &self.name]);
    }
}

/// The `podman run` options and arguments of an in-container daemon for `db`: /dev/fuse,
/// SYS_ADMIN, the host network (moto listens on the host's 127.0.0.1), test credentials,
/// `local` (a host dir or a volume) as `/var/lib/s4db`, then the image and s4db-mount's
/// arguments (the entrypoint is `s4db-mount --foreground`).
fn daemon_args(
    db: &Db,
    local: &str,
    extra_volumes: &[String],
    mnt: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--network=host",
        "--device",
        "/dev/fuse",
        "--cap-add",
        "SYS_ADMIN",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (k, v) in db.moto.aws_env() {
        args.extend(["-e".into(), format!("{k}={v}")]);
    }
    args.extend(["-e".into(), "AWS_EC2_METADATA_DISABLED=true".into()]);
    args.extend(["-v".into(), format!("{local}:/var/lib/s4db")]);
    for v in extra_volumes {
        args.extend(["-v".into(), v.clone()]);
    }
    args.push(image().into());
    args.extend(
        [
            "--endpoint-url",
            db.moto.endpoint.as_str(),
            "--region",
            REGION,
            "--force-path-style",
            "--local-dir",
            "/var/lib/s4db",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(db.spec());
    args.push(mnt.into());
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn text(s: &str) -> PyValue {
    PyValue::Text(s.to_string())
}

/// `s4db stat DB KEY` on the host: the key's attributes as the bucket holds them.
#[track_caller]
fn stat_in_bucket(moto: &Moto, db: &Db, key: &str) -> serde_json::Value {
    let out = s4db_cli(moto)
        .args(["stat", &db.spec(), key])
        .output()
        .expect("run s4db stat");
    assert!(
        out.status.success(),
        "s4db stat {key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("s4db stat prints JSON")
}

// ------------------------------------------------------------------- tests

/// The image runs `s4db-mount --foreground` and carries `s4db` and fusermount3.
#[test]
fn image_runs_s4db_mount_and_has_s4db_and_fuse3() {
    containers_conf();
    let version = podman(&["run", "--rm", "--network=none", image(), "--version"]).ok();
    assert!(version.text().starts_with("s4db-mount "), "{version:?}");
    let tools = podman(&[
        "run",
        "--rm",
        "--network=none",
        "--entrypoint",
        "sh",
        image(),
        "-ec",
        "s4db --version; command -v fusermount3; test -s /etc/ssl/certs/ca-certificates.crt",
    ])
    .ok();
    assert!(tools.text().contains("s4db "), "{tools:?}");
    assert!(tools.text().contains("fusermount3"), "{tools:?}");
    let entrypoint = podman(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}}",
        image(),
    ])
    .ok();
    assert_eq!(
        entrypoint.text().trim(),
        r#"["/usr/local/bin/s4db-mount","--foreground"]"#
    );
}

/// Path 1: the host mounts with `--allow-other` (and `--uid/--gid` for the mount's root),
/// a container bind-mounts it and its non-root user reads and writes; the host sees that
/// user's files with its uid, in the bucket after `.s4db/upload`.
#[test]
fn host_mount_with_allow_other_serves_a_non_root_user_in_a_container() {
    containers_conf();
    let db = Db::new();
    db.py_put(&tree(&[("seed.txt", b"from python\n")]));
    let uid = UID.to_string();
    let m = Mount::on(&db)
        .args(&["--allow-other", "--uid", &uid, "--gid", &uid])
        .start();
    let volume = format!("{}:/data:rslave", m.mnt.display());
    let user = format!("{UID}:{UID}");
    let run = podman(&[
        "run",
        "--rm",
        "--network=none",
        "--user",
        &user,
        "-v",
        &volume,
        BASE,
        "sh",
        "-ec",
        "id -u; cat /data/seed.txt; echo written by uid 1000 > /data/from-container.txt; \
         mkdir /data/dir; printf nested > /data/dir/nested.txt; ls -ln /data",
    ]);
    let run = run.ok();
    let out = run.text();
    assert!(out.starts_with("1000\nfrom python\n"), "{run:?}");

    for rel in ["from-container.txt", "dir", "dir/nested.txt"] {
        let meta = fs::metadata(m.path(rel)).unwrap_or_else(|e| panic!("stat {rel}: {e}"));
        assert_eq!((meta.uid(), meta.gid()), (UID, UID), "owner of {rel}");
    }
    assert_eq!(m.read("from-container.txt"), b"written by uid 1000\n");

    m.upload();
    let want: BTreeMap<String, PyValue> = [
        ("seed.txt", text("from python\n")),
        ("from-container.txt", text("written by uid 1000\n")),
        ("dir/nested.txt", text("nested")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(db.py_values(), want, "Python's view of the bucket");
    let attrs = stat_in_bucket(db.moto, &db, "from-container.txt");
    assert_eq!(attrs["attrs"]["uid"], UID, "{attrs}");
    assert_eq!(attrs["attrs"]["gid"], UID, "{attrs}");
    m.unmount();
}

/// Path 2: the daemon in a container (the image's entrypoint), its local dir a host dir,
/// publishing to moto on the host's loopback; writes through `podman exec` reach the
/// bucket on `.s4db/upload`, and `podman stop` (SIGTERM) uploads the rest and exits 0.
#[test]
fn daemon_in_a_container_publishes_to_s3_on_the_host() {
    containers_conf();
    let db = Db::new();
    db.py_put(&tree(&[("seed.txt", b"from python\n")]));
    let local = tempdir("container-local");
    let args = daemon_args(
        &db,
        &local.path().display().to_string(),
        &[],
        "/mnt/db",
        &[],
    );
    let c = Container::run("daemon", &strs(&args));
    c.wait_mounted("/mnt/db");

    let wrote = c.exec(
        "cat /mnt/db/seed.txt; echo written in the container > /mnt/db/inside.txt; \
         mkdir -p /mnt/db/d; printf '\\377\\000bin' > /mnt/db/d/blob; \
         echo > /mnt/db/.s4db/upload; cat /mnt/db/.s4db/stats",
    );
    let wrote = wrote.ok();
    assert!(wrote.text().starts_with("from python\n"), "{wrote:?}");
    let mut want: BTreeMap<String, PyValue> = [
        ("seed.txt", text("from python\n")),
        ("inside.txt", text("written in the container\n")),
        ("d/blob", PyValue::Bytes(b"\xff\x00bin".to_vec())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(db.py_values(), want, "after .s4db/upload in the container");
    // The daemon's working files are in the host dir.
    let local_files: Vec<_> = fs::read_dir(local.path())
        .expect("read the local dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        local_files.iter().any(|n| n.starts_with("data_")),
        "no data file in the bind-mounted local dir: {local_files:?}"
    );

    // Not uploaded by hand: `podman stop` must publish it.
    c.exec("echo last > /mnt/db/last.txt").ok();
    assert_eq!(
        c.stop(),
        0,
        "s4db-mount's exit code after podman stop:\n{}",
        c.logs()
    );
    want.insert("last.txt".into(), text("last\n"));
    assert_eq!(db.py_values(), want, "after podman stop");
}

/// A killed container's closed writes stay in its podman volume, and the next container
/// on that volume publishes them (README: give `--local-dir` a persistent volume).
#[test]
fn daemon_in_a_container_on_a_volume_publishes_a_killed_containers_writes() {
    containers_conf();
    let db = Db::new();
    let volume = Volume::create();
    let args = daemon_args(
        &db,
        &volume.name,
        &[],
        "/mnt/db",
        &["--upload-delay", "never"],
    );
    let first = Container::run("first", &strs(&args));
    first.wait_mounted("/mnt/db");
    first.exec("echo survived > /mnt/db/pending.txt").ok();
    podman(&["kill", "-s", "KILL", &first.name]).ok();
    podman(&["wait", &first.name]).ok();
    assert!(
        db.py_values().is_empty(),
        "nothing was uploaded before the kill"
    );
    drop(first);

    let args = daemon_args(&db, &volume.name, &[], "/mnt/db", &[]);
    let second = Container::run("second", &strs(&args));
    second.wait_mounted("/mnt/db");
    db.wait_python_sees(&tree(&[("pending.txt", b"survived\n")]));
    let read = second.exec("cat /mnt/db/pending.txt").ok();
    assert_eq!(read.text(), "survived\n");
    assert_eq!(second.stop(), 0, "exit code:\n{}", second.logs());
}

/// The daemon in a container mounts under an `rshared` bind of a host directory that is
/// a shared mount: the host (and so other containers) uses the container's mount.
#[test]
fn daemon_in_a_container_shares_its_mount_with_the_host() {
    containers_conf();
    let db = Db::new();
    db.py_put(&tree(&[("seed.txt", b"from python\n")]));
    let root = tempdir("container-shared");
    let shared = fs::canonicalize(root.path())
        .expect("canonicalize")
        .join("shared");
    let local = root.path().join("local");
    fs::create_dir_all(shared.join("db")).expect("mkdir shared/db");
    fs::create_dir(&local).expect("mkdir local");
    // A shared mount point on the host: mount --bind DIR DIR; mount --make-shared DIR.
    let make_shared = sh_in(
        Path::new("/"),
        &format!(
            "mount --bind {0} {0} && mount --make-shared {0}",
            q(&shared)
        ),
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = fusermount("-uz", &self.0.join("db"));
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(shared.clone());
    make_shared.ok();

    let volumes = [format!("{}:/mnt/shared:rshared", shared.display())];
    let args = daemon_args(
        &db,
        &local.display().to_string(),
        &volumes,
        "/mnt/shared/db",
        &["--allow-other"],
    );
    let c = Container::run("sidecar", &strs(&args));
    c.wait_mounted("/mnt/shared/db");
    let host_mnt = shared.join("db");
    let deadline = Instant::now() + MOUNT_TIMEOUT;
    while !is_mounted(&host_mnt) {
        assert!(
            Instant::now() < deadline,
            "the container's mount did not propagate to the host's {host_mnt:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        fs::read(host_mnt.join("seed.txt")).expect("read through the propagated mount"),
        b"from python\n"
    );
    fs::write(host_mnt.join("from-host.txt"), b"host\n").expect("write from the host");
    sh_in(&host_mnt, "echo > .s4db/upload").ok();
    db.wait_python_sees(&tree(&[
        ("seed.txt", b"from python\n"),
        ("from-host.txt", b"host\n"),
    ]));
    assert_eq!(c.stop(), 0, "exit code:\n{}", c.logs());
    assert!(
        !is_mounted(&host_mnt),
        "the host still shows the stopped container's mount"
    );
}
