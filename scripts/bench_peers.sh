#!/usr/bin/env bash
# s4db-mount against its peers, s3fs-fuse and rclone mount, side by side: the same
# workloads through each FUSE mount, all against ONE moto_server, behind a proxy that adds
# network latency (scripts/latency_proxy.py) so that each tool's request pattern costs what
# it would against real S3, and that counts every request each tool sends.
#
#   scripts/bench_peers.sh [--n N] [--n-rename K] [--n-create N] [--n-scan G] [--n-walk W]
#                          [--huge-mib M] [--runs R] [--rtt-ms MS[,MS...]] [--mb-per-s B]
#                          [--cap S] [--only W[,W...]] [--quick]
#
#   --n N        small files in the create/ls/read/rm workloads (default 500)
#   --n-rename K files renamed one by one (default 1000)
#   --n-create N files of the large create workload, run in the last RTT pass only, where
#                the peers are capped at CREATE_CAP_RATIO × s4db's time (default 10000)
#   --n-scan G   small files (4 KiB of text, 100 per directory) of the cold `grep -r` and
#                `tar c` workloads, last RTT pass only (default 10000)
#   --n-walk W   keys (in 100 directories) of the os.walk + os.stat workload, s4db and the
#                local disk only, last RTT pass only (default 100000)
#   --huge-mib M size of the large sequential write + publish and cold read, last RTT pass
#                only (default 1024)
#   --runs R     runs per tool; times are medians (default 3)
#   --rtt-ms L   added round-trip time, comma-separated for several passes (default 20);
#                0 = straight to moto, no proxy, so no request counts (s4db's own stats stay)
#   --mb-per-s B the proxy's bandwidth cap per connection and direction, MB/s (default 80,
#                about one connection to S3; 0 = none; see scripts/latency_proxy.py)
#   --cap S      a peer's workload still running after max(S, 1.5 × s4db's time for it)
#                seconds is stopped and shown as "> X s" (default 6)
#   --only L     only these workloads (comma-separated ids: create, ls, cold, warm, fio_w,
#                fio_r, read_warm, mv, rm, create_many, huge_w, huge_r, grep, tar, walk...),
#                for profiling one; the report still lists them all
#   --quick      smoke test: N=20, one run, 4 MiB fio file, 16 MiB large file, 200 files
#                scanned, 2000 keys walked
#
# A fourth column, "local disk", runs the workloads that mean something on a local ext4
# directory (creating, listing, warm reads, fio) as the reference for what a mount costs.
#
# Every workload also reports each daemon's peak memory: VmHWM of its process (reset through
# /proc/PID/clear_refs before the workload) and the largest RssAnon sampled every 50 ms.
#
# moto_server keeps the bodies it spools (parts, objects over 5 MiB) on tmpfs (/dev/shm),
# where S3 keeps them off the benchmark machine: on the VM's ext4, writing a 1 GiB upload's
# parts and then the assembled object cost moto 13-17 s of kernel time, and the 1 GiB write
# + publish measured that disk rather than the tools (s4db by hand: 15.4 s, moto 17.4 s of
# system CPU; with the spool on tmpfs 8.4 s and 4.0 s). Every tool writes through the same
# server; their own caches stay on the disk.
#
# moto_server runs through scripts/bench_moto.py, which removes three costs of moto's that
# real S3 does not charge, each in proportion to an object's size: a range GET reads only its
# range (moto copies the whole object for each one: 0.45 s per range of a 1 GiB object),
# CompleteMultipartUpload streams the parts into the object (moto copies 1 GiB three or four
# times: 15-26 s), and aws-chunked part bodies are decoded in linear time.
#
# Output (in $S4DB_BENCH_OUT, default target/bench): per RTT, a markdown table on stdout and in peers-<rtt>ms.md, all raw
# numbers in target/bench/peers-<rtt>ms.json (scripts/bench_chart.py draws them), and the
# proxy's request log in target/bench/peers-<rtt>ms-requests.log.
#
# Installs s3fs, rclone, fio and bc with apt-get when missing; needs .venv-test/py10
# (moto_server; `scripts/test.sh --setup-only` makes it). Builds the release binaries, or
# uses S4DB_BENCH_BIN=DIR. A default run (0 and 20 ms) takes about 15 minutes on 2 cores, the
# 1 GiB, scan and walk workloads of the 20 ms pass about 7 of them (busy machine, load 7-13).
#
# Fairness rules:
# - Every tool mounts with its defaults plus what it needs to work here: rclone gets
#   --vfs-cache-mode writes (without it, it cannot even append) and --vfs-write-back 0s
#   (upload at close, rather than 5 s later); s4db gets --upload-delay never, so that
#   publishing is the explicit `.s4db/upload` a workload ends with, and
#   --refresh-interval never (no background index polls in the request counts).
# - A workload that writes ends when its result is in S3: s4db after `echo >
#   .s4db/upload` returns; s3fs after close (it uploads synchronously) and `sync`; rclone
#   once its log shows every file it queued uploaded (renames and deletes it does within
#   the system call). After each one, what it should have left in the bucket is checked
#   (untimed); a miss is "fail".
# - Renames and appends act on files never read in that mount ("cold"), so each run starts
#   them from the same state.
# - Reads run on a fresh mount with fresh cache directories, as on a new machine.
# - Budget: s3fs needs minutes for what s4db does in seconds, so the peers are capped,
#   at twice s4db's time for the same workload and at least --cap seconds (s4db runs
#   first; it has only a hang guard). A capped entry's ratio is then a lower bound. A
#   workload that took more than REPEAT_UNDER_S in the first run (or hit the cap) is not
#   run again: its median is that one run (marked †), whose noise is small against its
#   length anyway. The data a skipped or capped workload would have left for the ones
#   after it is put straight into the bucket (s4db: written through the mount) instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

N=500
K=1000
NC=10000
NG=10000
NW=100000
HUGE_MIB=1024
MBPS=80
RUNS=3
RTTS=20
CAP_S=6
CAP_RATIO=1.5
S4DB_CAP_S=300 # a hang guard, not a limit: s4db's times set the peers' caps
QUICK=0
ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
  --n) N=$2; shift 2 ;;
  --n-create) NC=$2; shift 2 ;;
  --n-rename) K=$2; shift 2 ;;
  --n-scan) NG=$2; shift 2 ;;
  --n-walk) NW=$2; shift 2 ;;
  --huge-mib) HUGE_MIB=$2; shift 2 ;;
  --mb-per-s) MBPS=$2; shift 2 ;;
  --runs) RUNS=$2; shift 2 ;;
  --rtt-ms) RTTS=$2; shift 2 ;;
  --cap) CAP_S=$2; shift 2 ;;
  --only) ONLY=" ${2//,/ } "; shift 2 ;;
  --quick) QUICK=1; shift ;;
  -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "bench_peers.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
BIG_MIB=64
if [[ $QUICK -eq 1 ]]; then
  N=20 K=20 NC=50 RUNS=1 BIG_MIB=4 NG=200 NW=2000 HUGE_MIB=16
fi
SCAN_KIB=4          # size of each scanned file
SCAN_PER_DIR=100    # scanned files per directory
WALK_DIRS=100       # directories of the walked keys
SCAN_CAP_RATIO=11   # the scans' cap: a lower bound on the 10× the target asks for
HUGE_CAP_RATIO=3    # the large write and read: max(HUGE_CAP_FLOOR, 3 × s4db)
HUGE_CAP_FLOOR=30
[[ $QUICK -eq 1 ]] && HUGE_CAP_FLOOR=$CAP_S
REPEAT_UNDER_S=2
KA=$((N < 100 ? N : 100))        # files appended to
CREATE_CAP_RATIO=21 # the large create's cap: a lower bound on the ratio the target asks for
TOOLS=(s4db s3fs rclone local)

# ---- tools (the apt_install pattern of scripts/test.sh)
source "$ROOT/scripts/lib.sh"
command -v fusermount3 >/dev/null || apt_install fuse3
command -v s3fs >/dev/null || apt_install s3fs
command -v rclone >/dev/null || apt_install rclone
command -v fio >/dev/null || apt_install fio
command -v bc >/dev/null || apt_install bc

bench_setup
OUT="${S4DB_BENCH_OUT:-$ROOT/target/bench}"
mkdir -p "$OUT"

# Explicit credentials for every tool, nothing from the environment or ~/.aws. The
# environment's AWS_CA_BUNDLE makes rclone fail on a plain-HTTP endpoint; proxies must not
# see loopback traffic.
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1
export AWS_CONFIG_FILE=/nonexistent AWS_SHARED_CREDENTIALS_FILE=/nonexistent
unset AWS_CA_BUNDLE AWS_PROFILE AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3 AWS_DEFAULT_REGION
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost

# ---- everything started is tracked and stopped on exit, whatever happens
WORK=$(mktemp -d /tmp/s4db-bench-peers.XXXXXX)
PIDS=() # every daemon started, stopped by pid at exit
MNT=""      # the mount in use, if any
WORKLOAD="" # the workload running, if any
cleanup() {
  set +e
  [[ -n "$WORKLOAD" ]] && kill "$WORKLOAD" 2>/dev/null # timeout(1) passes it on
  if [[ -n "$MNT" ]] && grep -q " $MNT " /proc/self/mountinfo; then
    fusermount3 -uz "$MNT" 2>/dev/null
  fi
  stop_pids "${PIDS[@]}" # a mount daemon, then the proxy, then moto
  if [[ -d "$WORK" ]]; then # the daemons' logs, for a post-mortem
    mkdir -p "$OUT/peers-logs"
    cp "$WORK"/*.log "$OUT/peers-logs/" 2>/dev/null
  fi
  # --one-file-system: never delete through a mount that is somehow still there.
  rm -rf --one-file-system "$WORK"
  [[ ${MOTO_SPOOL:-} != /dev/shm/s4db-bench-moto.* ]] || rm -rf "$MOTO_SPOOL"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget() { # forget PID: it has exited; never signal a pid that may have been reused
  local p keep=()
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc; }
log() { echo "bench_peers.sh: $*" >&2; }

# ---- the helper: bucket set-up, checks, rclone's write-back wait, the report
# Talks to moto directly, so set-up and checks never pass the proxy nor count as a tool's
# requests; signs its requests itself rather than import boto3, whose import alone would
# add 0.3 s to every rclone write workload's wait.
cat >"$WORK/peers.py" <<'PYEOF'
import argparse, datetime, hashlib, hmac, json, os, re, statistics, subprocess, sys, time
import urllib.parse, urllib.request
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

def sigv4(method, url):
    """SigV4 headers for the bench credentials. moto does not check signatures, but it
    takes the account from them: an unsigned request is anonymous and may not overwrite
    an object a tool wrote."""
    u = urllib.parse.urlsplit(url)
    now = datetime.datetime.now(datetime.timezone.utc)
    amzdate, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    q = sorted(urllib.parse.parse_qsl(u.query, keep_blank_values=True))
    query = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                     for k, v in q)
    headers = {"host": u.netloc, "x-amz-content-sha256": "UNSIGNED-PAYLOAD", "x-amz-date": amzdate}
    signed = ";".join(headers)
    canonical = "\n".join([method, urllib.parse.quote(u.path or "/", safe="/-_.~"), query,
                           "".join(f"{k}:{v}\n" for k, v in headers.items()), signed,
                           "UNSIGNED-PAYLOAD"])
    scope = f"{day}/us-east-1/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amzdate, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + os.environ["AWS_SECRET_ACCESS_KEY"]).encode()
    for part in (day, "us-east-1", "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={os.environ['AWS_ACCESS_KEY_ID']}/"
                                f"{scope}, SignedHeaders={signed}, Signature={sig}")
    del headers["host"]
    return headers

def http(method, url, data=None, headers=None):
    # urllib's default form Content-Type makes moto try to parse the body, and hang.
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/octet-stream",
                                          **sigv4(method, url), **(headers or {})})
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.read()

def listing(ep, bucket, prefix=""):
    """{key: size} of every object under prefix."""
    out, token = {}, None
    ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
    while True:
        q = {"list-type": "2", "prefix": prefix}
        if token:
            q["continuation-token"] = token
        root = ET.fromstring(http("GET", f"{ep}/{bucket}?{urllib.parse.urlencode(q)}"))
        for c in root.iter(ns + "Contents"):
            out[c.find(ns + "Key").text] = int(c.find(ns + "Size").text)
        token = root.findtext(ns + "NextContinuationToken")
        if root.findtext(ns + "IsTruncated") != "true" or not token:
            return out

SPEC = re.compile(r"^(!?)([^\[=*]*)(?:\[(\d+)-(\d+)\])?(\*?)(?:=(\d+))?$")

def expand(spec):
    """'d/f[1-10]=256' -> (absent?, [keys], size or None, whole-prefix?)"""
    m = SPEC.match(spec)
    if not m:
        sys.exit(f"bad spec {spec}")
    neg, prefix, a, b, star, size = m.groups()
    keys = [f"{prefix}{i}" for i in range(int(a), int(b) + 1)] if a else [prefix]
    return bool(neg), keys, int(size) if size else None, bool(star)

def misses(objects, specs):
    """What the bucket ({key: size, None where unknown}) lacks against the specs."""
    bad = []
    for spec in specs:
        neg, keys, size, star = expand(spec)
        if star:
            found = [k for k in objects if k.startswith(keys[0])]
            if neg and found:
                bad.append(f"{len(found)} objects still under {keys[0]}")
            continue
        for k in keys:
            if neg and k in objects:
                bad.append(f"{k} still there")
            elif not neg and k not in objects:
                bad.append(f"{k} missing")
            elif not neg and None not in (size, objects[k]) and objects[k] != size:
                bad.append(f"{k} has {objects[k]} bytes, not {size}")
    return bad

def s4db_objects(a):
    """The keys of an s4db database (its CLI, straight to moto); sized only for the first
    key of each sized spec (one `get` each), which is check enough."""
    base = ["--endpoint-url", a.endpoint, "--force-path-style", "--region", "us-east-1"]
    out = subprocess.run([a.s4db, "keys", a.bucket, *base], check=True, capture_output=True)
    objects = dict.fromkeys(out.stdout.decode().splitlines())
    for spec in a.specs:
        neg, keys, size, _ = expand(spec)
        # Past 64 MiB only its presence: the cold read that follows checks the size.
        if not neg and size is not None and size <= 64 << 20 and keys[0] in objects:
            v = subprocess.run([a.s4db, "get", a.bucket, keys[0], *base], capture_output=True)
            objects[keys[0]] = len(v.stdout)
    return objects

def cmd_check(a):
    objects = s4db_objects(a) if a.s4db else listing(a.endpoint, a.bucket)
    bad = misses(objects, a.specs)
    if bad:
        print(f"check {a.bucket}: {len(bad)} problems: {', '.join(bad[:5])}", file=sys.stderr)
        sys.exit(1)

RCLONE_EVENT = re.compile(r"^\S+ \S+ (?:INFO|ERROR|NOTICE) *: (.+?): (vfs cache: queuing for upload|"
                          r"Copied \(|vfs cache: item close failed|Failed to copy)")

def cmd_wait_rclone(a):
    """Waits until rclone has uploaded every file queued since OFFSET of its log, and
    each expected key at least once.

    With --vfs-write-back 0s rclone uploads inside the kernel's RELEASE of the file, which
    close() does not wait for, and outside the write-back queue that `rc vfs/stats`
    counts; its -v log is the one place that says when each upload ended. Polling the
    bucket instead is not safe: moto 5.2.5 computes a new object's ETag lazily from a
    shared file, and a listing that races rclone's post-upload HEAD makes it cache a
    wrong MD5; rclone then reports "corrupted on transfer" and deletes the object it
    just uploaded (seen here on the 64 MiB fio file)."""
    expected = set()
    for spec in a.specs:
        neg, keys, _, star = expand(spec)
        if not neg and not star:
            expected.update(keys)
    queued, done = {}, {}
    deadline, stable = time.time() + a.timeout, 0
    with open(a.log, errors="replace") as f:
        f.seek(a.offset)
        while time.time() < deadline:
            for line in f.readlines():
                m = RCLONE_EVENT.match(line)
                if m:
                    d = queued if m.group(2).startswith("vfs cache: queuing") else done
                    d[m.group(1)] = d.get(m.group(1), 0) + 1
            idle = all(done.get(k, 0) >= n for k, n in queued.items())
            # Twice in a row: the last file's RELEASE may reach rclone just after close().
            stable = stable + 1 if idle and all(k in done for k in expected) else 0
            if stable >= 2:
                return
            time.sleep(0.02)
    sys.exit(f"rclone: uploads still pending after {a.timeout} s")

def cmd_seed(a):
    """Puts what the workloads need and is not there yet (256 B d/f* and e/f*, 64 KiB
    p/k*, big.bin)."""
    have = listing(a.endpoint, a.bucket)
    want = {f"d/f{i}": 256 for i in range(1, a.d + 1)}
    want.update({f"e/f{i}": 256 for i in range(1, a.e + 1)})
    want.update({f"p/k{i}": 65536 for i in range(1, a.p + 1)})
    if a.big:
        want["big.bin"] = a.big
    todo = [(k, n) for k, n in want.items() if have.get(k) != n]
    put = lambda kn: http("PUT", f"{a.endpoint}/{a.bucket}/{kn[0]}", os.urandom(kn[1]))
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(put, todo))
    if todo:
        print(f"seeded {len(todo)} objects into {a.bucket}", file=sys.stderr)

def cmd_seed_dir(a):
    """PUTs every file under DIR as PREFIX/<its path below DIR>, unless there already."""
    have = listing(a.endpoint, a.bucket, a.prefix + "/")
    todo = []
    for d, _, files in os.walk(a.dir):
        for f in files:
            path = os.path.join(d, f)
            key = a.prefix + "/" + os.path.relpath(path, a.dir)
            if have.get(key) != os.path.getsize(path):
                todo.append((key, path))
    put = lambda kp: http("PUT", f"{a.endpoint}/{a.bucket}/{kp[0]}", open(kp[1], "rb").read())
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(put, todo))
    print(f"seeded {len(todo)} objects into {a.bucket}/{a.prefix}/", file=sys.stderr)

def cmd_seed_file(a):
    """One PUT of a (large) local file, streamed."""
    size = os.path.getsize(a.path)
    with open(a.path, "rb") as f:
        http("PUT", f"{a.endpoint}/{a.bucket}/{a.key}", f, {"Content-Length": str(size)})
    print(f"seeded {a.key} ({size} bytes) into {a.bucket}", file=sys.stderr)

def cmd_get_speed(a):
    """One GET, on one connection, of the largest object in the bucket, through ENDPOINT
    (the proxy): the throughput a single connection gets, as JSON."""
    key, size = max(listing(a.endpoint, a.bucket).items(), key=lambda kv: kv[1])
    url = f"{a.endpoint}/{a.bucket}/{urllib.parse.quote(key)}"
    req = urllib.request.Request(url, headers=sigv4("GET", url))
    t0, got = time.time(), 0
    with urllib.request.urlopen(req, timeout=600) as r:
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            got += len(chunk)
    secs = time.time() - t0
    print(json.dumps({"key": key, "bytes": got, "seconds": round(secs, 3),
                      "mib_per_s": round(got / secs / (1 << 20), 1)}))

def cmd_sample_rss(a):
    """Samples /proc/PID/status every 50 ms; writes the largest RssAnon (kB) to OUT each
    time it grows, until PID is gone or this is stopped."""
    peak = -1
    while True:
        try:
            with open(f"/proc/{a.pid}/status") as f:
                anon = next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))
        except (OSError, StopIteration, ValueError):
            return
        if anon > peak:
            peak = anon
            with open(a.out, "w") as f:
                f.write(str(peak))
        time.sleep(0.05)

def cmd_stats(a):
    try:
        with open(f"{a.mnt}/.s4db/stats") as f:
            print(json.dumps(json.load(f)["s3_requests"], separators=(",", ":")))
    except (OSError, ValueError, KeyError):
        print("{}")

# ---- the report
def kind(method, target, flags):
    path, _, query = target.partition("?")
    key = path.lstrip("/").partition("/")[2]
    if "copy" in flags:
        return "COPY"
    if method == "GET":
        return "GET" if key else "LIST"
    if method == "POST" and "delete" in query:
        return "DELETE(multi)"
    return method

def fmt_s(v):
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"

def fmt_ratio(r):
    return f"{r:.0f}×" if r >= 10 else f"{r:.1f}×" if r >= 1 else f"{r:.2f}×"

def cmd_report(a):
    meta = json.loads(a.meta)
    loglines = open(a.log).read().splitlines() if a.log and os.path.exists(a.log) else None
    rows = [l.split("\t") for l in open(a.raw).read().splitlines() if l]
    tools, labels = meta["tools"], meta["workloads"]
    res = {w: {t: {"runs": []} for t in tools} for w in labels}
    for tool, wid, run, secs, status, cap, ra, rb, sa, sb, hwm, anon in rows:
        r = {"run": int(run), "seconds": float(secs), "status": status, "cap_s": int(cap)}
        if hwm != "-":
            r["hwm_mb"] = round(int(hwm) / 1024, 1)
        if anon != "-":
            r["anon_mb"] = round(int(anon) / 1024, 1)
        if loglines is not None and ra != "-":
            kinds = {}
            for line in loglines[int(ra):int(rb)]:
                f = line.split()
                k = kind(f[2], f[3], f[4:])
                kinds[k] = kinds.get(k, 0) + 1
            r["requests"] = sum(kinds.values())
            r["requests_by_kind"] = dict(sorted(kinds.items()))
        if tool == "s4db" and sa not in ("-", "{}") and sb not in ("-", "{}"):
            sa, sb = json.loads(sa), json.loads(sb)
            r["s4db_stats"] = {k: sb[k] - sa.get(k, 0) for k in sb if k != "max_in_flight"}
            r["s4db_stats"]["max_in_flight"] = sb.get("max_in_flight")
        res[wid][tool]["runs"].append(r)
    for wid in labels:
        for tool in tools:
            e = res[wid][tool]
            ok = [r for r in e["runs"] if r["status"] == "ok"]
            statuses = {r["status"] for r in e["runs"]}
            if ok:
                e["status"], e["median_s"] = "ok", statistics.median(r["seconds"] for r in ok)
                base = ok
            elif "timeout" in statuses:
                e["status"], e["median_s"], base = "timeout", None, e["runs"]
                e["cap_s"] = max(r["cap_s"] for r in e["runs"] if r["status"] == "timeout")
            else:
                e["status"], e["median_s"], base = ("fail" if e["runs"] else "not run"), None, e["runs"]
            e["n_runs"] = len(ok)
            counts = sorted((r["requests"], i) for i, r in enumerate(base) if "requests" in r)
            if counts:  # the run with the median request count, by kind too
                mid = base[counts[(len(counts) - 1) // 2][1]]
                e["requests"], e["requests_by_kind"] = mid["requests"], mid["requests_by_kind"]
            st = [r["s4db_stats"] for r in base if "s4db_stats" in r]
            if st:
                e["s4db_stats"] = st[(len(st) - 1) // 2]
            for m in ("hwm_mb", "anon_mb"):  # the daemon's peak over every run
                v = [r[m] for r in e["runs"] if m in r]
                if v:
                    e["peak_" + m] = max(v)
    doc = dict(meta, results=res)
    with open(a.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)

    names = meta["tool_names"]
    def cell(e):
        if e["status"] == "ok":
            return fmt_s(e["median_s"]) + (" †" if e["n_runs"] < meta["runs"] else "")
        return f"> {e['cap_s']} s" if e["status"] == "timeout" else e["status"]
    def reqs(e):
        return str(e["requests"]) if "requests" in e else "-"
    def ratio(peer, ours):
        if ours["status"] == "ok" and peer["status"] == "ok":
            return fmt_ratio(peer["median_s"] / ours["median_s"])
        if ours["status"] == "ok" and peer["status"] == "timeout":
            return "> " + fmt_ratio(peer["cap_s"] / ours["median_s"])
        if ours["status"] == "timeout" and peer["status"] == "ok":
            return "< " + fmt_ratio(peer["median_s"] / ours["cap_s"])
        return "-"
    def rss(e):
        if "peak_hwm_mb" not in e:
            return "-"
        return f"{e['peak_hwm_mb']:.0f}" + (f" ({e['peak_anon_mb']:.0f})" if "peak_anon_mb" in e else "")
    def stats(e):
        s = e.get("s4db_stats")
        if not s:
            return "-"
        return " ".join(f"{k}={v}" for k, v in s.items() if k != "max_in_flight" and v) or "none"
    peers = [t for t in tools if t != "s4db"]
    lines = [f"### {meta['title']}", "", meta["subtitle"], ""]
    head = ["workload"]
    for t in tools:
        head += [f"{names[t]} s", "req"]
    daemons = [t for t in tools if t != "local"]
    head += [f"{names[p]} ÷ s4db" for p in peers] + ["s4db `.s4db/stats`"]
    head.append("peak RSS MB (anon): " + " / ".join(names[t] for t in daemons))
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for wid, label in labels.items():
        row = [label]
        for t in tools:
            row += [cell(res[wid][t]), reqs(res[wid][t])]
        row += [ratio(res[wid][p], res[wid]["s4db"]) for p in peers]
        row.append(stats(res[wid]["s4db"]))
        row.append(" / ".join(rss(res[wid][t]) for t in daemons))
        lines.append("| " + " | ".join(row) + " |")
    if loglines is not None:
        lines += ["", "Requests by kind (as the proxy saw them; LIST = GET of the bucket):", "",
                  "| workload | " + " | ".join(names[t] for t in tools) + " |",
                  "|" + "---|" * (len(tools) + 1)]
        for wid, label in labels.items():
            row = [label]
            for t in tools:
                k = res[wid][t].get("requests_by_kind")
                row.append(", ".join(f"{v} {n}" for n, v in k.items()) if k else ("none" if k == {} else "-"))
            lines.append("| " + " | ".join(row) + " |")
    sc = meta.get("single_conn")
    if sc:
        lines += ["", f"One connection through the proxy (one GET of the {sc['bytes'] / (1 << 20):,.0f} MiB "
                  f"object `{sc['key']}`, after s4db's large cold read): {sc['seconds']:.1f} s, "
                  f"{sc['mib_per_s']:.0f} MiB/s; the proxy caps each connection at "
                  f"{meta['mb_per_s']:g} MB/s."]
    lines += ["", meta["footnote"], ""]
    text = "\n".join(lines)
    with open(a.out + ".md", "w") as f:
        f.write(text)
    print(text)

ap = argparse.ArgumentParser()
sub = ap.add_subparsers(dest="cmd", required=True)
p = sub.add_parser("mkbucket"); p.add_argument("endpoint"); p.add_argument("bucket")
p.set_defaults(fn=lambda a: http("PUT", f"{a.endpoint}/{a.bucket}"))
p = sub.add_parser("check"); p.add_argument("endpoint"); p.add_argument("bucket")
p.add_argument("specs", nargs="+"); p.add_argument("--s4db"); p.set_defaults(fn=cmd_check)
p = sub.add_parser("wait-rclone"); p.add_argument("log"); p.add_argument("offset", type=int)
p.add_argument("specs", nargs="*"); p.add_argument("--timeout", type=float, default=600)
p.set_defaults(fn=cmd_wait_rclone)
p = sub.add_parser("seed"); p.add_argument("endpoint"); p.add_argument("bucket")
for o in ("--d", "--e", "--p", "--big"):
    p.add_argument(o, type=int, default=0)
p.set_defaults(fn=cmd_seed)
p = sub.add_parser("stats"); p.add_argument("mnt"); p.set_defaults(fn=cmd_stats)
p = sub.add_parser("seed-dir"); p.add_argument("endpoint"); p.add_argument("bucket")
p.add_argument("dir"); p.add_argument("prefix"); p.set_defaults(fn=cmd_seed_dir)
p = sub.add_parser("seed-file"); p.add_argument("endpoint"); p.add_argument("bucket")
p.add_argument("key"); p.add_argument("path"); p.set_defaults(fn=cmd_seed_file)
p = sub.add_parser("get-speed"); p.add_argument("endpoint"); p.add_argument("bucket")
p.set_defaults(fn=cmd_get_speed)
p = sub.add_parser("sample-rss"); p.add_argument("pid"); p.add_argument("out")
p.set_defaults(fn=cmd_sample_rss)
p = sub.add_parser("report"); p.add_argument("--raw", required=True); p.add_argument("--log")
p.add_argument("--meta", required=True); p.add_argument("--out", required=True)
p.set_defaults(fn=cmd_report)
a = ap.parse_args()
a.fn(a)
PYEOF
helper() { "$PY" "$WORK/peers.py" "$@"; }

# ---- moto: one server for everything
MOTO_PORT=$(free_port)
MOTO="http://127.0.0.1:$MOTO_PORT"
MOTO_SPOOL=$WORK
[[ -d /dev/shm && -w /dev/shm ]] && MOTO_SPOOL=$(mktemp -d /dev/shm/s4db-bench-moto.XXXXXX)
TMPDIR=$MOTO_SPOOL "$PY" "$ROOT/scripts/bench_moto.py" -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
  "$PY" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "$MOTO" 2>/dev/null && break
  kill -0 "${PIDS[0]}" 2>/dev/null || { cat "$WORK/moto.log" >&2; exit 1; }
  sleep 0.2
done
log "moto at $MOTO"

printf 'bench:bench\n' >"$WORK/s3fs.passwd"
chmod 600 "$WORK/s3fs.passwd"
head -c 192 /dev/urandom | base64 -w0 >"$WORK/small" # 256 B of text
mkdir -p "$WORK/mnt"
"$PY" - "$WORK" "$N" "$NC" "$NG" "$SCAN_PER_DIR" "$SCAN_KIB" <<'PYEOF' # the files the create workloads copy, and the scanned ones
import base64, os, sys
work, n, nc, ng, per_dir, kib = sys.argv[1], *map(int, sys.argv[2:])
small = open(f"{work}/small", "rb").read()
for d, count in (("d", n), ("c", nc)):
    os.makedirs(f"{work}/src/{d}")
    for i in range(1, count + 1):
        with open(f"{work}/src/{d}/f{i}", "wb") as f:
            f.write(small)
# g/d<j>/f<i>: text of kib KiB each (lines of 76 base64 characters), 100 to a directory.
for i in range(1, ng + 1):
    d = f"{work}/src/g/d{(i - 1) // per_dir + 1}"
    if (i - 1) % per_dir == 0:
        os.makedirs(d)
    text = base64.encodebytes(os.urandom(kib * 1024))[:kib * 1024 - 1] + b"\n"
    with open(f"{d}/f{i}", "wb") as f:
        f.write(text)
PYEOF
MNT="$WORK/mnt"

# ---- mounting. Every daemon runs in the foreground, in the background of this script,
# so its pid is known (to wait for its exit after unmounting, or to stop it at exit).
DAEMON=""
RCLONE_LOG="$WORK/rclone.log"
RCLONE_MOUNTED_AT=0 # rclone's log size when the mount started
mount_tool() { # mount_tool TOOL BUCKET: mount on $MNT with fresh cache directories
  local tool=$1 bucket=$2 cache
  cache=$(mktemp -d "$WORK/cache-$tool.XXXX")
  CACHE=$cache
  if [[ $tool == local ]]; then # the reference: a directory on the local disk
    MNT="$WORK/local-$bucket"
    mkdir -p "$MNT"
    DAEMON=""
    return 0
  fi
  MNT="$WORK/mnt"
  case $tool in
  s4db)
    "$BIN/s4db-mount" -f --endpoint-url "$EP" --force-path-style --region us-east-1 \
      --upload-delay never --refresh-interval never "$bucket" "$MNT" --local-dir "$cache" \
      >>"$WORK/$tool.log" 2>&1 &
    ;;
  s3fs)
    s3fs "$bucket" "$MNT" -f \
      -o "url=$EP,use_path_request_style,passwd_file=$WORK/s3fs.passwd,nonempty" \
      >>"$WORK/$tool.log" 2>&1 &
    ;;
  rclone)
    # -v: its log tells when each upload ended (see wait-rclone).
    RCLONE_MOUNTED_AT=$(logsize)
    rclone --config "$WORK/rclone.conf" mount "remote:$bucket" "$MNT" --cache-dir "$cache" \
      --vfs-cache-mode writes --vfs-write-back 0s -v >>"$RCLONE_LOG" 2>&1 &
    ;;
  esac
  DAEMON=$!
  PIDS+=("$DAEMON")
  for _ in $(seq 300); do
    grep -q " $MNT " /proc/self/mountinfo && return 0
    kill -0 "$DAEMON" 2>/dev/null || break
    sleep 0.05
  done
  log "$tool did not mount $bucket; its log:"
  tail -20 "$WORK/$tool.log" >&2
  exit 1
}
unmount_tool() { # unmount_tool [--hard]: --hard after a capped write, whose leftovers nobody needs
  local i
  [[ -n "$DAEMON" ]] || return 0
  if [[ ${1:-} == --hard ]]; then
    fusermount3 -uz "$MNT" 2>/dev/null || true
    kill -9 "$DAEMON" 2>/dev/null || true
    wait "$DAEMON" 2>/dev/null || true
    forget "$DAEMON"
    return 0
  fi
  for i in $(seq 50); do # busy for a moment after a workload was killed at the cap
    fusermount3 -u "$MNT" 2>/dev/null && break
    [[ $i -eq 50 ]] && fusermount3 -uz "$MNT"
    sleep 0.2
  done
  for _ in $(seq 300); do
    if ! kill -0 "$DAEMON" 2>/dev/null; then
      wait "$DAEMON" 2>/dev/null || true
      forget "$DAEMON"
      return 0
    fi
    sleep 0.1
  done
  log "daemon $DAEMON still running 30 s after unmount; stopping it"
  kill "$DAEMON" 2>/dev/null || true
}
logsize() { stat -c %s "$RCLONE_LOG" 2>/dev/null || echo 0; }
mounted() { [[ -z "$DAEMON" ]] || { grep -q " $MNT " /proc/self/mountinfo && kill -0 "$DAEMON" 2>/dev/null; }; }

# How a tool's write workload ends: with its result in S3 (see "Fairness rules" above).
publish_cmd() { # publish_cmd TOOL WID SPEC...
  local tool=$1 wid=$2
  shift 2
  case $tool:$wid in
  s4db:*) echo "echo > .s4db/upload" ;;
  s3fs:* | local:*) echo "sync" ;;
  # rclone renames and deletes within the system call; files it uploads after close().
  rclone:mv | rclone:rm) echo "true" ;;
  rclone:*) echo "'$PY' '$WORK/peers.py' wait-rclone '$RCLONE_LOG' $(logsize)$(printf ' %q' "$@")" ;;
  esac
}
verify() { # verify TOOL BUCKET SPEC...: does the bucket hold what the workload made?
  local tool=$1 bucket=$2
  shift 2
  if [[ $tool == local ]]; then
    return 0
  elif [[ $tool == s4db ]]; then
    helper check "$MOTO" "$bucket" "$@" --s4db "$BIN/s4db"
  else
    helper check "$MOTO" "$bucket" "$@"
  fi
}

# ---- measuring
declare -A ONCE # "tool wid" -> set when the workload runs in the first run only
RAW=""
reqline() { if [[ -n "$REQLOG" ]]; then wc -l <"$REQLOG"; else echo -; fi; }
s4stats() { if [[ $1 == s4db ]]; then helper stats "$MNT"; else echo -; fi; }
peer_cap() { # peer_cap WID: max(CAP_S, CAP_RATIO × s4db's median for WID), whole seconds
  local m k=$CAP_RATIO floor=$CAP_S
  case $1 in
  create_many) k=$CREATE_CAP_RATIO ;;
  grep | tar) k=$SCAN_CAP_RATIO ;;
  huge_w | huge_r) k=$HUGE_CAP_RATIO floor=$HUGE_CAP_FLOOR ;;
  esac
  m=$(awk -F'\t' -v w="$1" '$1 == "s4db" && $2 == w && $5 == "ok" { print $4 }' "$RAW" |
    sort -g | awk '{ a[NR] = $1 } END { print NR ? (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) : 0 }')
  awk -v m="$m" -v floor="$floor" -v k="$k" \
    'BEGIN { c = k * m; if (c < floor) c = floor; printf "%d\n", c == int(c) ? c : int(c) + 1 }'
}
LOCAL_WIDS=" create create_many ls warm fio_w read_warm huge_w walk " # what the local disk runs
LAST_ONLY=" create_many huge_w huge_r grep tar walk " # in the last RTT pass only
PEERLESS=" walk " # s4db and the local disk only (see one_run)
wants() { # wants WID: is WID measured in this run?
  [[ -z $ONLY || $ONLY == *" $1 "* ]] || return 1
  [[ $TOOL != local || $LOCAL_WIDS == *" $1 "* ]] || return 1
  [[ $LAST_ONLY != *" $1 "* || $RTT == "$LAST_RTT" ]] || return 1
  [[ $PEERLESS != *" $1 "* || $TOOL == s4db || $TOOL == local ]] || return 1
  [[ $RUN -eq 1 ]] && return 0
  [[ -z "${ONCE[$TOOL $1]:-}" ]] || return 1
  # A warm read is only warm after the cold read in the same mount.
  [[ $TOOL == local || $1 != warm ]] || wants cold || return 1
  [[ $TOOL == local || $1 != read_warm ]] || wants fio_r || return 1
}
timed() { # timed WID COMMAND [SPEC...]: runs COMMAND in the mount (plus the publish step
  # and the check when SPECs are given), records time, status and the requests it sent
  local wid=$1 cmd=$2
  shift 2
  wants "$wid" || return 0
  local status=ok ra rb sa sb t0 secs rc=0 cap=$S4DB_CAP_S
  [[ $TOOL == s4db || $TOOL == local ]] || cap=$(peer_cap "$wid")
  if ! mounted; then
    log "$TOOL: mount gone before $wid"
    status=fail
  fi
  [[ $# -gt 0 ]] && cmd="$cmd && $(publish_cmd "$TOOL" "$wid" "$@")"
  # Untimed: dirty pages earlier workloads left (a peer's cache, a 1 GiB file) are
  # written back now, not on this workload's clock, and the local disk's `sync` writes
  # only its own. Before the counts are read: whatever a mount sends on a sync is not
  # charged to the workload. (The 1 GiB writes still vary with how fast this VM hands
  # out fresh memory: docs/benchmark-notes.md, fifth session.)
  sync
  sa=$(s4stats "$TOOL")
  ra=$(reqline)
  local hwm=- anon=- sampler=""
  if [[ -n $DAEMON ]]; then # the daemon's peak memory over this workload
    echo 5 >"/proc/$DAEMON/clear_refs" 2>/dev/null || true # resets VmHWM to the current RSS
    rm -f "$WORK/anon"
    helper sample-rss "$DAEMON" "$WORK/anon" &
    sampler=$!
  fi
  t0=$(now)
  if [[ $status == ok ]]; then
    # In the background and waited for: a trapped signal interrupts `wait` at once,
    # where a foreground child would delay the clean-up until it ends.
    timeout -k 5 "$cap" bash -c "cd '$MNT' && $cmd" >/dev/null 2>"$WORK/err" &
    WORKLOAD=$!
    wait "$WORKLOAD" || rc=$?
    WORKLOAD=""
  fi
  secs=$(elapsed "$t0")
  if [[ -n $sampler ]]; then
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$DAEMON/status" 2>/dev/null || true)
    [[ -n $hwm ]] || hwm=-
    anon=$(cat "$WORK/anon" 2>/dev/null || true) # none when over before the first sample:
    [[ -n $anon ]] || anon=$(awk '/^RssAnon:/ { print $2 }' "/proc/$DAEMON/status" 2>/dev/null || true)
    [[ -n $anon ]] || anon=-
  fi
  rb=$(reqline)
  sb=$(s4stats "$TOOL")
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    status=timeout
    # Let the tool finish what the killed command started before anything lists the
    # bucket (moto's ETag race, see wait-rclone).
    if [[ $TOOL == rclone ]]; then
      helper wait-rclone "$RCLONE_LOG" "$RCLONE_MOUNTED_AT" --timeout 120 || true
    fi
    sleep 0.5
  elif [[ $rc -ne 0 ]]; then
    status=fail
    log "$TOOL $wid failed (exit $rc): $(tail -3 "$WORK/err" | tr '\n' ' ')"
  elif [[ $status == ok && $# -gt 0 ]] && ! verify "$TOOL" "$BUCKET" "$@"; then
    status=fail
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$TOOL" "$wid" "$RUN" "$secs" "$status" \
    "$cap" "$ra" "$rb" "$sa" "$sb" "$hwm" "$anon" >>"$RAW"
  printf '  %-7s run %d  %-7s %8.3f s  %s\n' "$TOOL" "$RUN" "$wid" "$secs" "$status" >&2
  if [[ $RUN -eq 1 && ($status != ok || $(echo "$secs > $REPEAT_UNDER_S" | bc) -eq 1) ]]; then
    ONCE[$TOOL $wid]=1
  fi
}

# Data the workloads after a skipped or capped one still need: through the mount for
# s4db (its format), straight into the bucket for the peers (plain objects).
seed() { # seed D E P BIG: d/f1..D, e/f1..E, p/k1..P, big.bin of BIG bytes
  if [[ $TOOL == s4db || $TOOL == local ]]; then
    (
      cd "$MNT"
      mkdir -p d e p
      for i in $(seq 1 "$1"); do [[ -f d/f$i ]] || cp "$WORK/small" "d/f$i"; done
      for i in $(seq 1 "$2"); do [[ -f e/f$i ]] || cp "$WORK/small" "e/f$i"; done
      for i in $(seq 1 "$3"); do [[ -f p/k$i ]] || head -c 65536 /dev/urandom >"p/k$i"; done
      [[ $4 -eq 0 || -f big.bin ]] || head -c "$4" /dev/urandom >big.bin
      [[ $TOOL == local ]] || echo >.s4db/upload
    )
  else
    helper seed "$MOTO" "$BUCKET" --d "$1" --e "$2" --p "$3" --big "$4"
  fi
}

FIO=(fio --bs=1M --size="${BIG_MIB}M" --ioengine=psync --filename=big.bin)
one_run() { # one_run: every workload once for $TOOL in new buckets
  BUCKET="$TOOL-${RTT}ms-r$RUN-c"
  if wants create_many; then # a bucket of its own: a capped run leaves a partial copy
    [[ $TOOL == local ]] || helper mkbucket "$MOTO" "$BUCKET"
    mount_tool "$TOOL" "$BUCKET"
    timed create_many "cp -r '$WORK/src/c' c" "c/f[1-$NC]=256"
    if [[ $(tail -1 "$RAW" | cut -f5) == timeout ]]; then unmount_tool --hard; else unmount_tool; fi
  fi
  BUCKET="$TOOL-${RTT}ms-r$RUN"
  [[ $TOOL == local ]] || helper mkbucket "$MOTO" "$BUCKET"
  local need_d=0 need_e=0 need_p=0 need_big=0 w
  for w in ls cold warm rm; do wants $w && need_d=$N; done
  for w in mv append; do wants $w && need_e=$((K + KA)); done
  for w in seq64 par64; do wants $w && need_p=128; done
  wants fio_r && ! wants fio_w && need_big=$((BIG_MIB << 20))

  mount_tool "$TOOL" "$BUCKET"
  timed create "cp -r '$WORK/src/d' d" "d/f[1-$N]=256"
  seed "$need_d" "$need_e" "$need_p" "$need_big"
  timed fio_w "${FIO[*]} --name=write --rw=write --fallocate=none --output='$WORK/fio.out'" \
    "big.bin=$((BIG_MIB << 20))"
  unmount_tool

  # A new machine: fresh mount, empty caches (the local disk keeps its page cache: it
  # is the reference for listing and warm reads only).
  mount_tool "$TOOL" "$BUCKET"
  timed ls "ls -l d"
  timed cold "cat d/*"
  [[ $TOOL == local ]] && wants warm && cat "$MNT"/d/* >/dev/null
  timed warm "cat d/*"
  # The directory is known; the 64 KiB files' contents are not. Two separate halves, so
  # the parallel reads are as cold as the sequential ones.
  ls "$MNT/p" >/dev/null 2>&1 || true
  timed seq64 "for i in \$(seq 1 64); do cat p/k\$i; done"
  timed par64 "seq 65 128 | xargs -P 64 -I{} cat p/k{}"
  timed fio_r "${FIO[*]} --name=read --rw=read --readonly --output='$WORK/fio.out'"
  [[ $TOOL == local ]] && wants read_warm && cat "$MNT/big.bin" >/dev/null
  # dd, not fio: fio drops the file's page cache before it starts (invalidate=1), and
  # its start-up would weigh more than a read from memory.
  timed read_warm "dd if=big.bin of=/dev/null bs=1M"
  # Renames and appends act on files of their own (e/), never read in this mount: the
  # same state in every run, whichever reads were skipped (s4db keeps values it has
  # read, and appending to one then costs no GET).
  timed mv "for i in \$(seq 1 $K); do mv e/f\$i e/g\$i; done" "e/g[1-$K]=256" "!e/f[1-$K]"
  timed append "for i in \$(seq $((K + 1)) $((K + KA))); do echo more >> e/f\$i; done" \
    "e/f[$((K + 1))-$((K + KA))]=261"
  timed rm "rm -r d" '!d/*'
  unmount_tool
  [[ $TOOL != local ]] || rm -rf "$WORK/local-$BUCKET" "$WORK/local-$BUCKET-c"
  huge_run
  scan_run
  walk_run
}

last_ok() { # last_ok WID: did WID's last row (this run) end ok?
  tail -1 "$RAW" | awk -F'\t' -v w="$1" -v r="$RUN" '$2 == w && $3 == r && $5 == "ok" { ok = 1 } END { exit !ok }'
}
unmount_after() { # unmount_after WID: unmount, hard when WID hit its cap; drop the caches
  if [[ $(tail -1 "$RAW" | cut -f2,5) == "$1"$'\t'timeout ]]; then unmount_tool --hard; else unmount_tool; fi
  rm -rf "$CACHE"
}

# The large file: written (fio, bs=1M) and published, then read cold after a remount
# (dd bs=1M, which checks that every byte came back). A peer whose write hit its cap
# gets the file straight into its bucket (from HUGE_SRC, made on first need).
HUGE_BYTES=$((HUGE_MIB << 20))
HUGE_SRC="$WORK/huge.src"
HUGE_FIO=(fio --bs=1M --size="${HUGE_MIB}M" --ioengine=psync --filename=huge.bin)
declare -A SINGLE # rtt -> done: the one-connection reference is measured once per pass
huge_run() {
  wants huge_w || wants huge_r || return 0
  BUCKET="$TOOL-${RTT}ms-r$RUN-h"
  [[ $TOOL == local ]] || helper mkbucket "$MOTO" "$BUCKET"
  mount_tool "$TOOL" "$BUCKET"
  timed huge_w "${HUGE_FIO[*]} --name=write --rw=write --fallocate=none --output='$WORK/fio.out'" \
    "huge.bin=$HUGE_BYTES"
  if [[ $TOOL == local ]]; then
    rm -rf "$MNT"
    return 0
  fi
  if ! last_ok huge_w && wants huge_r; then
    if [[ $TOOL == s4db ]]; then
      (cd "$MNT" && head -c "$HUGE_BYTES" /dev/urandom >huge.bin && echo >.s4db/upload)
    else
      unmount_after huge_w
      [[ -f $HUGE_SRC ]] || head -c "$HUGE_BYTES" /dev/urandom >"$HUGE_SRC"
      helper seed-file "$MOTO" "$BUCKET" huge.bin "$HUGE_SRC"
      mount_tool "$TOOL" "$BUCKET"
    fi
  fi
  unmount_after huge_w
  wants huge_r || return 0
  mount_tool "$TOOL" "$BUCKET"
  timed huge_r "LC_ALL=C dd if=huge.bin of=/dev/null bs=1M 2>&1 | grep -q '^$HUGE_BYTES bytes'"
  unmount_after huge_r
  # The reference: one GET on one connection through the proxy, of the largest object
  # s4db left (the data file holding the large file).
  if [[ $TOOL == s4db && -n $REQLOG && -z ${SINGLE[$RTT]:-} ]]; then
    helper get-speed "$EP" "$BUCKET" >"$WORK/single-$RTT.json"
    SINGLE[$RTT]=1
    log "one connection through the proxy: $(cat "$WORK/single-$RTT.json")"
  fi
}

# Cold `grep -r` and `tar c` of the G small files, each on a fresh mount. s4db's
# database is written once per pass through the mount (cp -r, then published); the peers
# share one bucket of plain objects (PUT straight into moto), which they only read.
declare -A SCAN_MADE
scan_run() {
  [[ $TOOL != local ]] || return 0
  wants grep || wants tar || return 0
  if [[ $TOOL == s4db ]]; then
    BUCKET="s4db-${RTT}ms-g"
  else
    BUCKET="plain-${RTT}ms-g"
  fi
  if [[ -z ${SCAN_MADE[$BUCKET]:-} ]]; then
    helper mkbucket "$MOTO" "$BUCKET"
    if [[ $TOOL == s4db ]]; then
      mount_tool s4db "$BUCKET"
      (cd "$MNT" && cp -r "$WORK/src/g" g && echo >.s4db/upload)
      unmount_after none
    else
      helper seed-dir "$MOTO" "$BUCKET" "$WORK/src/g" g
    fi
    SCAN_MADE[$BUCKET]=1
  fi
  local w
  for w in grep tar; do
    wants $w || continue
    mount_tool "$TOOL" "$BUCKET"
    # grep -c reads every file to its end; tar's output goes through a pipe, since GNU
    # tar skips reading the files when it writes to /dev/null.
    case $w in
    grep) timed grep "grep -r -c a g" ;;
    tar) timed tar "tar cf - g | wc -c" ;;
    esac
    unmount_after $w
  done
}

# os.walk + os.stat of every path of W keys in WALK_DIRS directories: s4db (the first
# walk after a fresh mount: every name is a lookup in the daemon) against the same tree
# on the local disk (its dentries cached). s4db's database is imported once per pass with
# the CLI, straight into moto. The peers are not run: 100,000 objects per bucket would
# take minutes to seed, and s3fs would send a HEAD per file.
cat >"$WORK/walk.py" <<'PYEOF'
import os, sys
n = 0
for d, _, files in os.walk(sys.argv[1]):
    for f in files:
        os.stat(os.path.join(d, f))
        n += 1
if n != int(sys.argv[2]):
    sys.exit(f"walked {n} files, not {sys.argv[2]}")
PYEOF
WALK_PY='import json, sys
n, dirs = int(sys.argv[1]), int(sys.argv[2])
per = -(-n // dirs)
def key(i): return "w/d%03d/f%06d" % (i // per, i)
def value(i): return "value %d\n" % i'
declare -A WALK_MADE
walk_run() {
  wants walk || return 0
  if [[ $TOOL == local ]]; then
    mount_tool local walk
    if [[ -z ${WALK_MADE[local]:-} ]]; then
      (cd "$MNT" && "$PY" -c "$WALK_PY
import os
for i in range(n):
    os.makedirs(os.path.dirname(key(i)), exist_ok=True)
    open(key(i), 'w').write(value(i))" "$NW" "$WALK_DIRS")
      WALK_MADE[local]=1
    fi
  else
    BUCKET="s4db-${RTT}ms-w"
    if [[ -z ${WALK_MADE[$BUCKET]:-} ]]; then
      helper mkbucket "$MOTO" "$BUCKET"
      local s3=(--endpoint-url "$MOTO" --force-path-style --region us-east-1 --local-dir "$WORK/walk-import")
      "$PY" -c "$WALK_PY
for i in range(n):
    print(json.dumps({'key': key(i), 'value': value(i)}))" "$NW" "$WALK_DIRS" |
        "$BIN/s4db" "${s3[@]}" --no-upload import --batch 10000 "$BUCKET" >/dev/null
      "$BIN/s4db" "${s3[@]}" upload "$BUCKET" >/dev/null
      rm -rf "$WORK/walk-import"
      WALK_MADE[$BUCKET]=1
    fi
    mount_tool s4db "$BUCKET"
  fi
  timed walk "python3 '$WORK/walk.py' w $NW"
  unmount_after walk
}

VERSIONS=$(printf '{"s4db": "%s", "s3fs": "%s", "rclone": "%s", "fio": "%s", "moto": "%s"}' \
  "$(git rev-parse --short HEAD 2>/dev/null || echo ?)" \
  "$(s3fs --version 2>/dev/null | head -1 | grep -o 'V[0-9.]*' || echo ?)" \
  "$(rclone version 2>/dev/null | head -1 | awk '{print $2}')" "$(fio --version)" \
  "$("$PY" -c 'import moto; print(moto.__version__)')")

LAST_RTT=${RTTS##*,}
for RTT in ${RTTS//,/ }; do
  REQLOG=""
  EP="$MOTO"
  if [[ $RTT != 0 ]]; then
    REQLOG="$OUT/peers-${RTT}ms-requests.log"
    : >"$REQLOG"
    PROXY_PORT=$(free_port)
    python3 "$ROOT/scripts/latency_proxy.py" "$PROXY_PORT" 127.0.0.1 "$MOTO_PORT" \
      --rtt-ms "$RTT" --mb-per-s "$MBPS" --log "$REQLOG" 2>>"$WORK/proxy.log" &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    EP="http://127.0.0.1:$PROXY_PORT"
    for _ in $(seq 100); do
      "$PY" -c "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" \
        "$PROXY_PORT" 2>/dev/null && break
      sleep 0.1
    done
  fi
  cat >"$WORK/rclone.conf" <<EOF
[remote]
type = s3
provider = Other
endpoint = $EP
access_key_id = bench
secret_access_key = bench
force_path_style = true
EOF
  RAW="$WORK/raw-$RTT.tsv"
  : >"$RAW"
  ONCE=()
  start=$(date +%s)
  LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
  log "RTT $RTT ms: endpoint $EP ($MBPS MB/s per connection), N=$N, runs: $RUNS, peers capped at max($CAP_S s, $CAP_RATIO × s4db); load: $(cut -d' ' -f1-3 /proc/loadavg)"
  for TOOL in "${TOOLS[@]}"; do
    for RUN in $(seq 1 "$RUNS"); do
      one_run
    done
  done
  log "RTT $RTT ms took $(($(date +%s) - start)) s"
  if [[ -n "$REQLOG" ]]; then
    kill "$PROXY_PID"
    wait "$PROXY_PID" 2>/dev/null || true
    forget "$PROXY_PID"
  fi

  META=$(
    cat <<EOF
{"rtt_ms": $RTT, "n": $N, "runs": $RUNS, "cap_floor_s": $CAP_S, "cap_ratio": $CAP_RATIO,
 "repeat_under_s": $REPEAT_UNDER_S,
 "big_mib": $BIG_MIB, "huge_mib": $HUGE_MIB, "n_scan": $NG, "scan_kib": $SCAN_KIB,
 "n_walk": $NW, "walk_dirs": $WALK_DIRS, "mb_per_s": $MBPS, "scan_cap_ratio": $SCAN_CAP_RATIO,
 "huge_cap_ratio": $HUGE_CAP_RATIO, "huge_cap_floor_s": $HUGE_CAP_FLOOR,
 "single_conn": $(cat "$WORK/single-$RTT.json" 2>/dev/null || echo null),
 "k": $K, "ka": $KA, "n_create": $NC, "create_cap_ratio": $CREATE_CAP_RATIO, "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "cores": $(nproc),
 "kernel": "$(uname -r)", "versions": $VERSIONS,
 "tools": ["s4db", "s3fs", "rclone", "local"],
 "tool_names": {"s4db": "s4db-mount", "s3fs": "s3fs", "rclone": "rclone", "local": "local disk"},
 "title": "s4db-mount, s3fs and rclone mount on moto_server, $([[ $RTT == 0 ]] && echo "no added latency (requests not counted)" || echo "+$RTT ms RTT, $([[ $MBPS == 0 ]] && echo "no bandwidth cap" || echo "$MBPS MB/s per connection")")",
 "load": {"start": "$LOAD_START", "end": "$(cut -d' ' -f1-3 /proc/loadavg)"},
 "subtitle": "N=$N, $([[ $RUNS -gt 1 ]] && echo "median of $RUNS runs" || echo "one run"), seconds (lower is better) and the S3 requests sent. $(nproc) cores, load average (1, 5, 15 min) $LOAD_START at the start of the pass and $(cut -d' ' -f1-3 /proc/loadavg) at its end; s3fs $(s3fs --version 2>/dev/null | head -1 | grep -o 'V[0-9.]*'), rclone $(rclone version 2>/dev/null | head -1 | awk '{print $2}') with --vfs-cache-mode writes --vfs-write-back 0s.",
 "footnote": "peer ÷ s4db: how many times longer the peer took (> 1: s4db is faster). † one run only: it took over $REPEAT_UNDER_S s (or hit the cap) the first time. > X s: stopped at the cap, max($CAP_S s, $CAP_RATIO × s4db's time; $CREATE_CAP_RATIO × for the $NC-file create, so that a capped ratio still shows whether s4db is $CREATE_CAP_RATIO× faster; $SCAN_CAP_RATIO × for the scans; max($HUGE_CAP_FLOOR s, $HUGE_CAP_RATIO ×) for the $HUGE_MIB MiB write and read). Peak RSS: the daemon's VmHWM over the workload (RssAnon, sampled every 50 ms, in parentheses), the largest over the runs. Write workloads end when the result is in S3 (local disk: after sync); reads run on a fresh mount with empty caches; the local disk's reads are from its page cache.",
 "workloads": {
  "create_many": "create $NC files of 256 B (cp -r) + publish",
  "create": "create $N files of 256 B (cp -r) + publish",
  "ls": "ls -l of $N files after a remount",
  "cold": "cold read of $N files (cat)",
  "warm": "warm read of $N files (cat)",
  "mv": "rename $K cold files (mv) + publish",
  "append": "append to $KA cold files (>>) + publish",
  "rm": "rm -r of $N files + publish",
  "seq64": "64 cold reads of 64 KiB, one by one",
  "par64": "64 cold reads of 64 KiB, 64 in parallel",
  "fio_w": "fio sequential write, $BIG_MIB MiB (bs=1M) + publish",
  "fio_r": "fio cold sequential read, $BIG_MIB MiB (bs=1M)",
  "read_warm": "warm sequential read of the same $BIG_MIB MiB (dd bs=1M)",
  "huge_w": "sequential write, $HUGE_MIB MiB (fio bs=1M) + publish",
  "huge_r": "cold sequential read of the $HUGE_MIB MiB after a remount (dd bs=1M)",
  "grep": "cold grep -r of $NG files of $SCAN_KIB KiB",
  "tar": "cold tar c of $NG files of $SCAN_KIB KiB",
  "walk": "os.walk + os.stat of $NW keys in $WALK_DIRS directories, first after mount"
 }}
EOF
  )
  echo
  helper report --raw "$RAW" ${REQLOG:+--log "$REQLOG"} --meta "$META" --out "$OUT/peers-${RTT}ms"
  echo
done
