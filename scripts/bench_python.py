#!/usr/bin/env python3
"""The workloads of benches/engine.rs, run with the real Python s4db package, and the table.

    bench_python.py run --endpoint URL [--filter REGEX] [--quick] [--json OUT]
        Runs the workloads against the moto (or other S3) server at URL, in a new
        bucket. Prints one line per workload and writes the results to OUT.
        With s4db 0.8.0 (the old format) only the put workloads run, str values.
    bench_python.py table [--criterion DIR] [--filter REGEX] --rust-log LOG --python JSON [--python08 JSON]
        Prints a Markdown table: criterion's results (DIR/<id>/new/estimates.json)
        and the `s4db-bench-bytes` lines of the `cargo bench` log next to the
        Python results.

Benchmark ids are the criterion ids of benches/engine.rs, so one --filter regex
selects the same workloads on both sides. Every time is the median over samples
of the time per operation (criterion's median per iteration on the Rust side).
Values are incompressible random bytes (stored raw), keys `key-00000042`.
"""

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from importlib.metadata import version as dist_version

S4DB_VERSION = dist_version("s4db")
IS_V08 = tuple(int(p) for p in S4DB_VERSION.split(".")[:2]) < (0, 9)

BOTO = {
    "region_name": "us-east-1",
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
}
UPLOAD_KEYS = 1000
UPLOAD_VALUE = 1024
BIG_KEYS, BIG_VALUE = 1000, 16 * 1024
MANY = 64


def close(db):
    """S4DB.close() (0.8.0 has none): removes a temporary local_dir it made."""
    getattr(db, "close", lambda: None)()


def key(i):
    return f"key-{i:08d}"


def value(n, i=0):
    if IS_V08:  # 0.8.0 stores only text
        return ("%08d" % i) * (n // 8) + "x" * (n % 8)
    return os.urandom(n)


class Runner:
    def __init__(self, args):
        import boto3

        self.endpoint = args.endpoint
        self.filter = re.compile(args.filter) if args.filter else None
        self.quick = args.quick
        self.results = {}
        self.bucket = f"bench-py{'08' if IS_V08 else ''}-{os.getpid()}"
        boto3.client("s3", endpoint_url=self.endpoint, **BOTO).create_bucket(Bucket=self.bucket)
        self.tmp = tempfile.TemporaryDirectory(prefix="s4db-bench-py-")
        self.n = 0

    def open(self, local=True):
        from s4db import S4DB

        self.n += 1
        prefix = f"p{self.n}/"
        local_dir = os.path.join(self.tmp.name, f"d{self.n}") if local else None
        if local_dir:
            os.makedirs(local_dir)
        return S4DB(self.bucket, prefix, local_dir=local_dir, endpoint_url=self.endpoint, **BOTO)

    def wanted(self, bench_id):
        return self.filter is None or self.filter.search(bench_id)

    def record(self, bench_id, per_op_seconds, ops_per_sample, extra=None):
        """per_op_seconds: one time per sample (seconds per operation)."""
        res = {
            "median_ns": statistics.median(per_op_seconds) * 1e9,
            "mean_ns": statistics.fmean(per_op_seconds) * 1e9,
            "samples": len(per_op_seconds),
            "ops_per_sample": ops_per_sample,
        }
        res.update(extra or {})
        self.results[bench_id] = res
        more = "".join(f"  {k}={v}" for k, v in (extra or {}).items())
        print(f"{bench_id:40s} {fmt_ns(res['median_ns']):>12s}/op  ({len(per_op_seconds)} samples){more}", flush=True)

    def samples(self, n):
        return max(2, n // 5) if self.quick else n

    # ---------------------------------------------------------- workloads

    def put_single(self, bench_id, size):
        db = self.open()
        v = value(size)
        per_sample = 50 if self.quick else 500
        i = 0
        times = []
        for _ in range(self.samples(20)):
            keys = [key(i + j) for j in range(per_sample)]
            i += per_sample
            t = time.perf_counter()
            for k in keys:
                db.put({k: v})
            times.append((time.perf_counter() - t) / per_sample)
        self.record(bench_id, times, per_sample)
        close(db)

    def put_batch(self):
        db = self.open()
        batch = {key(i): value(100, i) for i in range(1000)}
        times = []
        for _ in range(self.samples(20)):
            t = time.perf_counter()
            db.put(batch)
            times.append(time.perf_counter() - t)
        self.record("put/batch_1000x100B", times, 1)
        close(db)

    def put_vs_db_size(self, n):
        db = self.open()
        v = value(100)
        for start in range(0, n, 1000):
            db.put({key(i): v for i in range(start, min(n, start + 1000))})
        db.upload()
        # 0.8.0 rewrites its whole local index on each put: fewer puts per sample there.
        per_sample = 5 if IS_V08 and n > 10_000 else (50 if self.quick else 500)
        i = 0
        times = []
        for _ in range(self.samples(20 if not IS_V08 else 5)):
            ks = []
            for _ in range(per_sample):
                i = (i + 7919) % n
                ks.append(key(i))
            t = time.perf_counter()
            for k in ks:
                db.put({k: v})
            times.append((time.perf_counter() - t) / per_sample)
        self.record(f"put_vs_db_size/{n}", times, per_sample)
        close(db)

    def get_local(self, bench_id, size, n):
        db = self.open()
        for start in range(0, n, 100):
            db.put({key(i): value(size) for i in range(start, min(n, start + 100))})
        per_sample = 50 if self.quick else 500
        i = 0
        times = []
        for _ in range(self.samples(20)):
            t = time.perf_counter()
            for _ in range(per_sample):
                i = (i + 1) % n
                assert db.get(key(i)) is not None
            times.append((time.perf_counter() - t) / per_sample)
        self.record(bench_id, times, per_sample)
        close(db)

    def remote_reader(self, n, size):
        writer = self.open()
        writer.put({key(i): value(size) for i in range(n)})
        writer.upload()
        close(writer)
        from s4db import S4DB

        return S4DB(self.bucket, writer.prefix, local_dir=None, endpoint_url=self.endpoint, **BOTO)

    def moto_gets(self):
        ids = ["moto/get_remote_100B", f"moto/get_{MANY}_sequential", f"moto/get_many_{MANY}"]
        if not any(self.wanted(b) for b in ids):
            return
        db = self.remote_reader(1000, 100)
        batches = [[key(i) for i in range(j * MANY, (j + 1) * MANY)] for j in range(1000 // MANY)]
        if self.wanted(ids[0]):
            per_sample = 20 if self.quick else 100
            i = 0
            times = []
            for _ in range(self.samples(20)):
                t = time.perf_counter()
                for _ in range(per_sample):
                    i = (i + 1) % 1000
                    assert db.get(key(i)) is not None
                times.append((time.perf_counter() - t) / per_sample)
            self.record(ids[0], times, per_sample)
        if self.wanted(ids[1]):
            times = []
            for j in range(self.samples(20)):
                keys = batches[j % len(batches)]
                t = time.perf_counter()
                for k in keys:
                    assert db.get(k) is not None
                times.append(time.perf_counter() - t)
            self.record(ids[1], times, 1)
        if self.wanted(ids[2]):
            times = []
            for j in range(self.samples(20)):
                keys = batches[j % len(batches)]
                t = time.perf_counter()
                got = db.get_many(keys)  # 0.10.0 default: 8 threads
                times.append(time.perf_counter() - t)
                assert all(v is not None for v in got.values())
            self.record(ids[2], times, 1, {"workers": 8})

    def count_puts(self, db):
        """Wraps the storage's one PUT function (an instance attribute shadowing the
        method; `del db.storage._put` undoes it): records (object name, bytes) per PUT."""
        sent = []
        orig = db.storage._put

        def counting(body, filename, if_match, if_none_match):
            if isinstance(body, (bytes, bytearray)):
                n = len(body)
            else:
                n = os.fstat(body.fileno()).st_size
            sent.append((filename, n))
            return orig(body, filename, if_match, if_none_match)

        db.storage._put = counting
        return sent

    @staticmethod
    def bytes_extra(sent):
        data = [n for f, n in sent if f != "index.idx"]
        index = sum(n for f, n in sent if f == "index.idx")
        return {"files": len(data), "data_bytes": sum(data), "index_bytes": index}

    def upload_full(self):
        bench_id = f"moto/upload_{UPLOAD_KEYS}x1KiB"
        times = []
        extra = {}
        for _ in range(self.samples(10)):
            db = self.open()
            db.put({key(i): value(UPLOAD_VALUE) for i in range(UPLOAD_KEYS)})
            sent = self.count_puts(db)
            t = time.perf_counter()
            db.upload()
            times.append(time.perf_counter() - t)
            extra = self.bytes_extra(sent)
            close(db)
        self.record(bench_id, times, 1, extra)

    def upload_incremental(self):
        bench_id = "moto/upload_incremental_1key"
        big_keys = 16 if self.quick else BIG_KEYS
        db = self.open()
        for start in range(0, big_keys, 100):
            db.put({key(i): value(BIG_VALUE) for i in range(start, min(big_keys, start + 100))})
        db.upload()
        times = []
        extra = {}
        nxt = big_keys
        for _ in range(self.samples(10)):
            db.put({key(nxt): value(UPLOAD_VALUE)})
            nxt += 1
            sent = self.count_puts(db)
            t = time.perf_counter()
            db.upload()
            times.append(time.perf_counter() - t)
            del db.storage._put  # the class's own method again
            extra = self.bytes_extra(sent)
        self.record(bench_id, times, 1, extra)
        close(db)

    def run(self):
        plan = [
            ("put/single_100B", lambda: self.put_single("put/single_100B", 100)),
            ("put/single_4KiB", lambda: self.put_single("put/single_4KiB", 4096)),
            ("put/batch_1000x100B", self.put_batch),
        ]
        sizes = [1_000, 3_000, 10_000] if self.quick else [1_000, 10_000, 100_000]
        plan += [(f"put_vs_db_size/{n}", (lambda n=n: self.put_vs_db_size(n))) for n in sizes]
        if not IS_V08:
            plan += [
                ("get_local/100B", lambda: self.get_local("get_local/100B", 100, 1000)),
                ("get_local/64KiB", lambda: self.get_local("get_local/64KiB", 64 * 1024, 64)),
                ("moto/get_", self.moto_gets),  # filters itself
                (f"moto/upload_{UPLOAD_KEYS}x1KiB", self.upload_full),
                ("moto/upload_incremental_1key", self.upload_incremental),
            ]
        for bench_id, fn in plan:
            if bench_id == "moto/get_" or self.wanted(bench_id):
                fn()
        self.tmp.cleanup()


def fmt_ns(ns):
    if ns is None:
        return "–"
    if ns < 1e3:
        return f"{ns:.0f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.1f} µs"
    if ns < 1e9:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.2f} s"


def fmt_bytes(n):
    if n is None:
        return "–"
    if n < 10 * 1024:
        return f"{n} B"
    if n < 10 * 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


# (criterion id, description, Python id or None)
ROWS = [
    ("put/single_100B", "put 1 key, 100 B value", "put/single_100B"),
    ("put/single_4KiB", "put 1 key, 4 KiB value", "put/single_4KiB"),
    ("put/batch_1000x100B", "put a batch of 1000 × 100 B (per batch)", "put/batch_1000x100B"),
    ("put_vs_db_size/1000", "put 1 key (overwrite) into a db of 1k keys", "put_vs_db_size/1000"),
    ("put_vs_db_size/10000", "put 1 key (overwrite) into a db of 10k keys", "put_vs_db_size/10000"),
    ("put_vs_db_size/100000", "put 1 key (overwrite) into a db of 100k keys", "put_vs_db_size/100000"),
    ("get_local/100B", "get, data file local (pread), 100 B", "get_local/100B"),
    ("get_local/64KiB", "get, data file local (pread), 64 KiB", "get_local/64KiB"),
    ("get_remote/local_backend_100B", "get via range read, local backend, 100 B", None),
    (f"get_remote/latency5ms_get_{MANY}_sequential", f"{MANY} gets one after another, local backend + 5 ms/request", None),
    (f"get_remote/latency5ms_get_many_{MANY}", f"get_many of {MANY} keys, local backend + 5 ms/request", None),
    ("moto/get_remote_100B", "get via range GET on moto, 100 B", "moto/get_remote_100B"),
    (f"moto/get_{MANY}_sequential", f"{MANY} gets one after another on moto", f"moto/get_{MANY}_sequential"),
    (f"moto/get_many_{MANY}", f"get_many of {MANY} keys on moto", f"moto/get_many_{MANY}"),
    (f"upload/local_backend_{UPLOAD_KEYS}x1KiB", "upload 1000 × 1 KiB, local backend", None),
    (f"moto/upload_{UPLOAD_KEYS}x1KiB", "upload 1000 × 1 KiB on moto", f"moto/upload_{UPLOAD_KEYS}x1KiB"),
    ("upload/local_backend_incremental_1key", "upload 1 new key after 16 MiB, local backend", None),
    ("moto/upload_incremental_1key", "upload 1 new key after 16 MiB on moto", "moto/upload_incremental_1key"),
]


def criterion_median(cdir, bench_id):
    path = os.path.join(cdir, *bench_id.split("/"), "new", "estimates.json")
    try:
        with open(path) as fh:
            est = json.load(fh)
    except FileNotFoundError:
        return None
    return est["median"]["point_estimate"]


def rust_bytes(log):
    out = {}
    if log and os.path.exists(log):
        with open(log, errors="replace") as fh:
            for line in fh:
                m = re.search(r"s4db-bench-bytes (\{.*\})", line)
                if m:
                    d = json.loads(m.group(1))
                    out[d["bench"]] = d
    return out


def sent(d):
    if not d:
        return "–"
    return f"{fmt_bytes(d['data_bytes'] + d['index_bytes'])} ({d['files']} file{'s' * (d['files'] != 1)} {fmt_bytes(d['data_bytes'])} + index {fmt_bytes(d['index_bytes'])})"


def table(args):
    with open(args.python) as fh:
        py = json.load(fh)["results"]
    py08 = {}
    if args.python08 and os.path.exists(args.python08):
        with open(args.python08) as fh:
            py08 = json.load(fh)["results"]
    rb = rust_bytes(args.rust_log)
    wanted = re.compile(args.filter or "")
    show08 = bool(py08)
    head = "| workload | s4db (Rust) | s4db 0.10.0 (Python) | Python / Rust |" + (" s4db 0.8.0 (Python) |" if show08 else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    upload_rows = []
    for cid, desc, pid in ROWS:
        if not wanted.search(cid):
            continue
        r = criterion_median(args.criterion, cid) if args.criterion else None
        p = py.get(pid, {}).get("median_ns") if pid else None
        if r is None and p is None:
            continue
        ratio = f"{p / r:.1f}×" if (r and p) else "–"
        row = f"| {desc} | {fmt_ns(r)} | {fmt_ns(p) if pid else 'n/a'} | {ratio} |"
        if show08:
            p8 = py08.get(pid, {}).get("median_ns") if pid else None
            row += f" {fmt_ns(p8) if p8 else '–'} |"
        print(row)
        if cid in rb or (pid and "data_bytes" in py.get(pid, {})):
            upload_rows.append((desc, rb.get(cid), py.get(pid) if pid else None))
    if upload_rows:
        print()
        print("| bytes sent by one upload | s4db (Rust) | s4db 0.10.0 (Python) |")
        print("|---|---|---|")
        for desc, r, p in upload_rows:
            print(f"| {desc} | {sent(r)} | {sent(p) if p else 'n/a'} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--endpoint", required=True)
    run.add_argument("--filter", default="")
    run.add_argument("--quick", action="store_true", help="fewer samples and smaller setups (smoke test)")
    run.add_argument("--json")
    tab = sub.add_parser("table")
    tab.add_argument("--criterion", help="criterion's output directory (omit: no Rust times)")
    tab.add_argument("--filter", default="", help="only rows whose id matches this regex")
    tab.add_argument("--rust-log")
    tab.add_argument("--python", required=True)
    tab.add_argument("--python08")
    args = ap.parse_args()
    if args.cmd == "table":
        table(args)
        return
    print(f"s4db {S4DB_VERSION} (Python {sys.version.split()[0]}) against {args.endpoint}", flush=True)
    runner = Runner(args)
    runner.run()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"s4db": S4DB_VERSION, "results": runner.results}, fh, indent=1)


if __name__ == "__main__":
    main()
