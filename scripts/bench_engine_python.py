#!/usr/bin/env python3
"""Engine workloads, the Python side: benches/workloads.rs's workloads with the real
Python s4db package (0.10.0 in .venv-test/py10), same arguments, same JSON.

    bench_engine_python.py --endpoint URL [--keys N] [--json OUT] [--quick] [--runs R]
        [--naive-keys M] [--only ID,ID...]

    bench_engine_python.py table --rust RUST.json --python PY.json [--title T] [--out MD]
        The side-by-side markdown table (scripts/bench_engine.sh calls this).

The workloads, their sizes, the data (keys `key-00000042`, incompressible random
values: os.urandom here, xorshift bytes in Rust), the repetition rule and the JSON
schema are documented at the top of benches/workloads.rs; keep the two in step.
One-object-per-key PUTs use boto3's put_object with its defaults; 16 in flight are 16
threads sharing one client (boto3 clients are thread-safe). Credentials, region and
endpoint are explicit; nothing comes from the host's AWS configuration.
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version as dist_version

REGION = "us-east-1"
BOTO = {"region_name": REGION, "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
REPEAT_UNDER_S = 5
WORKLOADS = ["put_one_by_one", "put_batch", "bulk_load", "local_get", "remote_get",
             "one_object_per_key"]


def key(i):
    return f"key-{i:08d}"


def rand_indices(n, below, seed):
    """n uniformly random indices below `below`: the xorshift sequence of the Rust side."""
    mask = (1 << 64) - 1
    x = ((seed * 0x2545F4914F6CDD1D) & mask) | 1
    out = []
    for _ in range(n):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        out.append(x % below)
    return out


def percentile(sorted_samples, p):
    """Nearest rank, as on the Rust side."""
    rank = math.ceil(p / 100 * len(sorted_samples))
    return sorted_samples[min(max(rank, 1), len(sorted_samples)) - 1]


def latency_metrics(samples, unit):
    s = sorted(samples)
    out = [(f"mean_{unit}", sum(s) / len(s))]
    out += [(f"p{p}_{unit}", percentile(s, p)) for p in (50, 95, 99)]
    return out


def unit_of(metric):
    for suffix, unit in (("_us", "us"), ("_ms", "ms"), ("per_s", "keys/s"), ("_s", "s")):
        if metric.endswith(suffix):
            return unit
    return "requests"


class Counting:
    """Wraps a boto3 client and counts its API calls."""

    def __init__(self, client):
        self._wrapped = client
        self.calls = 0

    def __getattr__(self, name):
        attr = getattr(self._wrapped, name)
        if callable(attr):
            def counted(*a, **kw):
                self.calls += 1
                return attr(*a, **kw)
            return counted
        return attr


def params(args):
    if args.quick:
        p = dict(keys=2_000, put_keys=300, local_gets=300, remote_gets=10, naive_keys=20, runs=1)
    else:
        p = dict(keys=100_000, put_keys=10_000, local_gets=10_000, remote_gets=100,
                 naive_keys=1_000, runs=3)
    p.update(value_bytes=100, batch=1_000, naive_value_bytes=1024, naive_concurrency=16,
             repeat_under_s=REPEAT_UNDER_S)
    if args.keys is not None:
        p["keys"] = args.keys
    if args.runs is not None:
        p["runs"] = args.runs
    if args.naive_keys is not None:
        p["naive_keys"] = args.naive_keys
    return p


def describe(wid, p):
    return {
        "put_one_by_one": f"{p['put_keys']} puts of one {p['value_bytes']} B value",
        "put_batch": f"one put of {p['put_keys']} values of {p['value_bytes']} B",
        "bulk_load": f"bulk load: {p['keys']} keys of {p['value_bytes']} B in puts of {p['batch']}, then upload",
        "local_get": f"local get (data file local), {p['local_gets']} random keys of {p['keys']}",
        "remote_get": f"remote get (range GET), fresh open of {p['keys']} keys, {p['remote_gets']} random gets",
        "one_object_per_key": f"{p['naive_keys']} values of {p['naive_value_bytes']} B: s4db put+upload vs "
                              f"one S3 object per key (sequential, {p['naive_concurrency']} in flight)",
    }[wid]


class Bench:
    def __init__(self, endpoint, p):
        import boto3

        self.endpoint = endpoint
        self.p = p
        self.bucket = f"wl-py-{os.getpid()}"
        self.client = boto3.client("s3", endpoint_url=endpoint, **BOTO)
        self.client.create_bucket(Bucket=self.bucket)
        self.tmp = tempfile.TemporaryDirectory(prefix="s4db-bench-engine-py-")
        self.n = 0
        self.loaded = None  # (db, prefix) of the last bulk load

    def prefix(self, what):
        self.n += 1
        return f"{what}-{self.n}/"

    def open(self, prefix, local=True):
        """A database with its own local directory (None: read-only, no local files).
        Returns it and the counter of its S3 calls."""
        from s4db import S4DB

        local_dir = None
        if local:
            local_dir = os.path.join(self.tmp.name, prefix.strip("/"))
            os.makedirs(local_dir)
        db = S4DB(self.bucket, prefix, local_dir=local_dir, endpoint_url=self.endpoint, **BOTO)
        counter = Counting(db.storage._client)
        db.storage._client = counter
        return db, counter

    def put_one_by_one(self, run):
        db, _ = self.open(self.prefix("put1"))
        items = [(key(i), os.urandom(self.p["value_bytes"])) for i in range(self.p["put_keys"])]
        t = time.perf_counter()
        for k, v in items:
            db.put({k: v})
        secs = time.perf_counter() - t
        return [("total_s", secs), ("per_key_us", secs * 1e6 / self.p["put_keys"])]

    def put_batch(self, run):
        db, _ = self.open(self.prefix("putb"))
        items = {key(i): os.urandom(self.p["value_bytes"]) for i in range(self.p["put_keys"])}
        t = time.perf_counter()
        db.put(items)
        secs = time.perf_counter() - t
        return [("total_s", secs), ("per_key_us", secs * 1e6 / self.p["put_keys"])]

    def bulk_load(self, run):
        prefix = self.prefix("bulk")
        db, counter = self.open(prefix)
        n, batch, size = self.p["keys"], self.p["batch"], self.p["value_bytes"]
        put = 0.0
        for start in range(0, n, batch):  # values made batch by batch, outside the timing
            items = {key(i): os.urandom(size) for i in range(start, min(n, start + batch))}
            t = time.perf_counter()
            db.put(items)
            put += time.perf_counter() - t
        before = counter.calls
        t = time.perf_counter()
        db.upload()
        upload = time.perf_counter() - t
        if self.loaded:
            self.loaded[0].close()
        self.loaded = (db, prefix)
        return [("put_s", put), ("upload_s", upload), ("total_s", put + upload),
                ("requests", counter.calls - before)]

    def ensure_loaded(self):
        if self.loaded is None:
            print(f"workloads: loading {self.p['keys']} keys for the reads", file=sys.stderr)
            self.bulk_load(0)

    def local_get(self, run):
        self.ensure_loaded()
        db = self.loaded[0]
        keys = [key(i) for i in rand_indices(self.p["local_gets"], self.p["keys"], 7 + run)]
        samples = []
        for k in keys:
            t = time.perf_counter()
            v = db.get(k)
            samples.append((time.perf_counter() - t) * 1e6)
            assert v is not None, k
        t = time.perf_counter()
        for k in keys:
            db.get(k)
        throughput = len(keys) / (time.perf_counter() - t)
        return latency_metrics(samples, "us") + [("keys_per_s", throughput)]

    def remote_get(self, run):
        self.ensure_loaded()
        t = time.perf_counter()
        db, counter = self.open(self.loaded[1], local=False)
        open_ms = (time.perf_counter() - t) * 1e3
        assert len(db) == self.p["keys"]
        samples = []
        for i in rand_indices(self.p["remote_gets"], self.p["keys"], 1000 + run):
            t = time.perf_counter()
            v = db.get(key(i))
            samples.append((time.perf_counter() - t) * 1e3)
            assert v is not None, key(i)
        # The index GET of the open was made before the counter was in place.
        return [("open_ms", open_ms)] + latency_metrics(samples, "ms") + [
            ("requests", counter.calls + 1)]

    def one_object_per_key(self, run):
        m = self.p["naive_keys"]
        values = [os.urandom(self.p["naive_value_bytes"]) for _ in range(m)]
        db, counter = self.open(self.prefix("s4db-vs-naive"))
        t = time.perf_counter()
        db.put({key(i): v for i, v in enumerate(values)})
        db.upload()
        s4db_s = time.perf_counter() - t
        db.close()

        seq_prefix, par_prefix = self.prefix("naive-seq"), self.prefix("naive-par")

        def put_one(prefix, i):
            self.client.put_object(Bucket=self.bucket, Key=prefix + key(i), Body=values[i])

        t = time.perf_counter()
        for i in range(m):
            put_one(seq_prefix, i)
        seq_s = time.perf_counter() - t

        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.p["naive_concurrency"]) as pool:
            list(pool.map(lambda i: put_one(par_prefix, i), range(m)))
        par_s = time.perf_counter() - t
        return [("s4db_s", s4db_s), ("s4db_requests", counter.calls), ("seq_s", seq_s),
                ("seq_requests", m), ("par_s", par_s), ("par_requests", m)]


def run(args):
    p = params(args)
    only = args.only.split(",") if args.only else None
    for w in only or []:
        if w not in WORKLOADS:
            sys.exit(f"unknown workload {w}")
    bench = Bench(args.endpoint, p)
    workloads = {}
    for wid in WORKLOADS:
        if only is not None and wid not in only:
            continue
        per_metric = {}
        runs = 0
        if wid in ("local_get", "remote_get"):
            bench.ensure_loaded()  # not part of the first run's time
        for r in range(p["runs"]):
            t = time.perf_counter()
            for name, v in getattr(bench, wid)(r):
                per_metric.setdefault(name, []).append(float(v))
            runs += 1
            if r == 0 and time.perf_counter() - t > REPEAT_UNDER_S:
                break
        metrics = {name: {"unit": unit_of(name), "median": statistics.median(vs), "values": vs}
                   for name, vs in per_metric.items()}
        line = " ".join(f"{n}={m['median']:.4f}" for n, m in metrics.items())
        print(f"python {wid:20s} {line}", file=sys.stderr, flush=True)
        workloads[wid] = {"desc": describe(wid, p), "runs": runs, "metrics": metrics}
    report = {
        "schema": "s4db-engine-workloads/1",
        "side": "python",
        "engine": f"s4db (Python) {dist_version('s4db')}",
        "endpoint": args.endpoint,
        "quick": args.quick,
        "params": p,
        "workloads": workloads,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


# ------------------------------------------------------------------ table

# (workload, metric, label) rows of the table, in order.
ROWS = [
    ("put_one_by_one", "total_s", "one-at-a-time puts, total"),
    ("put_one_by_one", "per_key_us", "one-at-a-time puts, per key"),
    ("put_batch", "total_s", "one batched put, total"),
    ("put_batch", "per_key_us", "one batched put, per key"),
    ("bulk_load", "put_s", "bulk load: puts"),
    ("bulk_load", "upload_s", "bulk load: upload"),
    ("bulk_load", "total_s", "**bulk load + upload**"),
    ("bulk_load", "requests", "bulk load: upload requests"),
    ("local_get", "mean_us", "**local get, mean**"),
    ("local_get", "p50_us", "local get, p50"),
    ("local_get", "p95_us", "local get, p95"),
    ("local_get", "p99_us", "local get, p99"),
    ("local_get", "keys_per_s", "point reads, keys/s (higher is better)"),
    ("remote_get", "open_ms", "remote: open (index GET + decode)"),
    ("remote_get", "mean_ms", "remote get, mean"),
    ("remote_get", "p50_ms", "remote get, p50"),
    ("remote_get", "p95_ms", "remote get, p95"),
    ("remote_get", "p99_ms", "remote get, p99"),
    ("remote_get", "requests", "remote: requests (open + gets)"),
    ("one_object_per_key", "s4db_s", "s4db put + upload"),
    ("one_object_per_key", "s4db_requests", "s4db requests"),
    ("one_object_per_key", "seq_s", "one object per key, sequential"),
    ("one_object_per_key", "par_s", "one object per key, 16 in flight"),
    ("one_object_per_key", "seq_requests", "one object per key, requests"),
]


def fmt(v, unit):
    if unit == "requests":
        return f"{v:,.0f}"
    if unit == "keys/s":
        return f"{v:,.0f}/s"
    if unit == "s":
        return f"{v * 1e3:,.1f} ms" if v < 1 else f"{v:,.2f} s"
    if unit == "ms":
        return f"{v:,.2f} ms"
    return f"{v:,.2f} µs"


def table(args):
    with open(args.rust) as f:
        rust = json.load(f)
    with open(args.python) as f:
        py = json.load(f)
    lines = []
    if args.title:
        lines += [f"### {args.title}", ""]
    lines += [f"| workload | {rust['engine']} | {py['engine']} | Python ÷ Rust |",
              "|---|---:|---:|---:|"]
    last = None
    for wid, metric, label in ROWS:
        r = rust["workloads"].get(wid, {}).get("metrics", {}).get(metric)
        q = py["workloads"].get(wid, {}).get("metrics", {}).get(metric)
        if r is None and q is None:
            continue
        if wid != last:
            desc = (rust["workloads"].get(wid) or py["workloads"][wid])["desc"]
            runs = "/".join(str(s["workloads"][wid]["runs"]) if wid in s["workloads"] else "-"
                            for s in (rust, py))
            lines.append(f"| *{desc}* (runs {runs}) | | | |")
            last = wid
        unit = (r or q)["unit"]
        rs = fmt(r["median"], unit) if r else "-"
        qs = fmt(q["median"], unit) if q else "-"
        ratio = "-"
        if r and q and r["median"] > 0 and q["median"] > 0:
            x = q["median"] / r["median"]
            if unit == "keys/s":  # higher is better: Rust ÷ Python is the speed-up
                x = r["median"] / q["median"]
            ratio = f"{x:,.1f}×" if unit != "requests" else f"{x:,.2f}"
        lines.append(f"| {label} | {rs} | {qs} | {ratio} |")
    p = rust["params"]
    lines += ["", f"Medians over up to {p['runs']} runs (a workload whose first run took over "
              f"{p['repeat_under_s']} s runs once); latency percentiles per run, nearest rank. "
              "Ratios: how many times longer Python took (for keys/s: how many times more Rust "
              "read); for requests, Python's count ÷ Rust's. Values: incompressible random bytes.", ""]
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "table":
        ap = argparse.ArgumentParser(prog="bench_engine_python.py table")
        ap.add_argument("--rust", required=True)
        ap.add_argument("--python", required=True)
        ap.add_argument("--title")
        ap.add_argument("--out")
        table(ap.parse_args(sys.argv[2:]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--keys", type=int)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--naive-keys", type=int)
    ap.add_argument("--only")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
