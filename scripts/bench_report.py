#!/usr/bin/env python3
"""Writes docs/BENCHMARKS.md from the results scripts/bench.sh collected.

    bench_report.py --results target/bench --out docs/BENCHMARKS.md --chart docs/bench-peers-20ms.png

Reads engine-<rtt>ms.{json,md} (scripts/bench_engine.sh), peers-<rtt>ms.{json,md}
(scripts/bench_peers.sh) and scale.{json,md} (scripts/bench_scale.sh); checks every target
of the benchmark issue against them; prices each tool's S3 requests at AWS list prices;
describes the machine. Every number in the document comes from those files: nothing here
is typed in by hand, so the document is always the last run's.
"""

import argparse
import glob
import json
import os
import platform
import re
import subprocess

# S3 Standard request prices, us-east-1, USD per 1,000 requests (aws.amazon.com/s3/pricing).
PRICE_PER_1000 = {"PUT": 0.005, "COPY": 0.005, "POST": 0.005, "LIST": 0.005,
                  "DELETE(multi)": 0.005, "GET": 0.0004, "HEAD": 0.0004, "DELETE": 0.0}


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def load(path):
    with open(path) as f:
        return json.load(f)


def read(path):
    with open(path) as f:
        return f.read().strip()


def ratio(a, b):
    return a / b if a and b else None


def fmt_x(r):
    if r is None:
        return "–"
    return f"{r:.0f}×" if r >= 10 else f"{r:.1f}×" if r >= 1 else f"{r:.2f}×"


def fmt_s(v):
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s" if v < 10 else f"{v:.1f} s"


def drop_unmeasured_rows(md):
    """A peers table without the rows of workloads this pass did not run."""
    def unmeasured(line):
        cells = [c.strip() for c in line.strip().strip("|").split("|")][1:]
        return line.startswith("| ") and cells and all(c in ("not run", "-") for c in cells)
    return "\n".join(l for l in md.splitlines() if not unmeasured(l))


def cost(kinds):
    return sum(PRICE_PER_1000.get(k, 0.0005) * n / 1000 for k, n in kinds.items())


def fmt_usd(v):
    return "$0" if v == 0 else f"${v:.6f}".rstrip("0") if v < 0.01 else f"${v:.4f}"


class Targets:
    """The issue's targets, each checked against one run's numbers."""

    def __init__(self):
        self.rows = []

    def add(self, workload, target, measured, met):
        verdict = "**met**" if met else ("**missed**" if met is not None else "not measured")
        self.rows.append(f"| {workload} | {target} | {measured} | {verdict} |")


def peer_entry(peers, wid, tool):
    return peers["results"].get(wid, {}).get(tool, {"status": "not run"})


def peer_time(e):
    """(seconds, is_lower_bound) or None."""
    if e["status"] == "ok":
        return e["median_s"], False
    if e["status"] == "timeout":
        return e["cap_s"], True
    return None


def check_targets(t, peers, engine, scale):
    p20 = peers.get(20) or peers.get(max(peers) if peers else None)
    if p20:
        nc = p20.get("n_create", p20["n"])
        ours = peer_entry(p20, "create_many", "s4db")
        if ours["status"] == "ok":
            puts = ours.get("s4db_stats", {}).get("put")
            # Data file, its hint object, the attribute object s4db.attrs, the index.
            parts, ok = [], puts is not None and puts <= 4
            for peer in ("s3fs", "rclone"):
                pt = peer_time(peer_entry(p20, "create_many", peer))
                if pt is None:
                    ok = None if ok else ok
                    parts.append(f"{peer}: not measured")
                    continue
                r = pt[0] / ours["median_s"]
                parts.append(f"{'> ' if pt[1] else ''}{fmt_x(r)} vs {peer}")
                ok = ok and r >= 20
            t.add(f"create {nc:,} small files + publish (+{p20['rtt_ms']} ms RTT)",
                  "≥ 20× faster than s3fs and rclone; ≤ 4 PUTs",
                  f"{fmt_s(ours['median_s'])}, {puts} PUTs; " + ", ".join(parts), ok)
    if scale:
        m, d = scale["ls_mount"], scale["ls_disk"]
        r = m["median_s"] / d["median_s"]
        reqs = m["first_s3_requests"] + m["next_3_s3_requests"]
        t.add(f"`ls -l` of {m['entries']:,} keys", "≤ 3× local disk; 0 S3 requests",
              f"{fmt_s(m['median_s'])} vs {fmt_s(d['median_s'])} on local disk ({r:.2f}×); "
              f"{reqs} requests", r <= 3 and reqs == 0)
    if p20:
        n = p20["n"]
        ours = peer_entry(p20, "cold", "s4db")
        if ours["status"] == "ok":
            gets = ours.get("s4db_stats", {}).get("get_range")
            slower = []
            for peer in ("s3fs", "rclone"):
                pt = peer_time(peer_entry(p20, "cold", peer))
                if pt and not pt[1] and pt[0] < ours["median_s"]:
                    slower.append(peer)
            t.add(f"cold read of {n:,} files (+{p20['rtt_ms']} ms RTT)",
                  "at most 1 range GET per file; not slower than either peer",
                  f"{gets} range GETs for {n} files; {fmt_s(ours['median_s'])} vs s3fs "
                  f"{fmt_peer(p20, 'cold', 's3fs')}, rclone {fmt_peer(p20, 'cold', 'rclone')}",
                  gets is not None and gets <= n and not slower)
    if p20:
        check_large_targets(t, p20)
    for rtt in sorted(peers):
        p = peers[rtt]
        ours, local = peer_entry(p, "read_warm", "s4db"), peer_entry(p, "read_warm", "local")
        if ours["status"] == "ok" and local["status"] == "ok":
            r = local["median_s"] / ours["median_s"]
            mib = p["big_mib"]
            t.add(f"warm read of an unchanged {mib} MiB file (+{rtt} ms RTT)",
                  "≥ 0.5× local-disk throughput",
                  f"{mib / ours['median_s']:.0f} MiB/s vs {mib / local['median_s']:.0f} MiB/s "
                  f"on local disk ({r:.2f}×)", r >= 0.5)
    if p20:
        seq, par = peer_entry(p20, "seq64", "s4db"), peer_entry(p20, "par64", "s4db")
        if seq["status"] == "ok" and par["status"] == "ok":
            r = seq["median_s"] / par["median_s"]
            t.add(f"64 parallel cold reads, +{p20['rtt_ms']} ms RTT",
                  "≥ 8× faster than the same reads one by one",
                  f"{fmt_s(par['median_s'])} vs {fmt_s(seq['median_s'])} ({r:.1f}×)", r >= 8)
    e0 = engine.get(0)
    if e0:
        bl = metric_pair(e0, "bulk_load", "total_s")
        if bl:
            r = bl[1] / bl[0]
            t.add("engine bulk load of 100,000 keys + upload", "≥ 10× faster than Python",
                  f"{fmt_s(bl[0])} vs {fmt_s(bl[1])} ({r:.1f}×)", r >= 10)
        lg = metric_pair(e0, "local_get", "mean_us")
        if lg:
            r = lg[1] / lg[0]
            t.add("engine local get (mean)", "≥ 20× faster than Python",
                  f"{lg[0]:.2f} µs vs {lg[1]:.2f} µs ({r:.1f}×)", r >= 20)
    if scale:
        mem = scale["memory"]
        rss = max(v["rss_mb"] for v in mem.values())
        hwm = max(v["hwm_mb"] for v in mem.values())
        full = scale["keys"] >= 1_000_000  # a smaller run says nothing about the target
        t.add(f"daemon memory, {scale['keys']:,} keys of {scale['key_bytes']} bytes",
              "≤ 150 MB RSS per 1,000,000 keys",
              f"{rss:.0f} MB RSS at most (steady {mem['hints_loaded']['rss_mb']:.0f} MB once "
              f"loaded, peak {hwm:.0f} MB)",
              rss * 1_000_000 / scale["keys"] <= 150 if full else None)
        mt = scale["mount"]
        t.add(f"mount of {scale['keys']:,} keys", "ready ≤ 2 s after the index GET",
              f"{mt['ready_after_index_get_s']:.2f} s after the index GET "
              f"({mt['command_s']:.2f} s in all)", mt["ready_after_index_get_s"] <= 2)


def vs_peer(p, wid, peer, ours):
    """(ratio text, ratio or None, is_lower_bound) of a peer's time over ours."""
    pt = peer_time(peer_entry(p, wid, peer))
    if pt is None or ours["status"] != "ok":
        return f"{peer}: not measured", None, False
    r = pt[0] / ours["median_s"]
    return f"{'> ' if pt[1] else ''}{fmt_x(r)} vs {peer}", r, pt[1]


def s4db_requests(e):
    st = e.get("s4db_stats") or {}
    return sum(v for k, v in st.items() if k != "max_in_flight" and v)


def check_large_targets(t, p):
    """The targets of the large-file, scan and walk workloads, and the daemon's memory."""
    rtt, mib = p["rtt_ms"], p.get("huge_mib")
    ours = peer_entry(p, "huge_r", "s4db")
    if mib and ours["status"] == "ok":
        speed = mib / ours["median_s"]
        text, r, _ = vs_peer(p, "huge_r", "rclone", ours)
        sc = p.get("single_conn")
        one = sc["mib_per_s"] if sc else None
        k = speed / one if one else None
        t.add(f"{mib:,} MiB cold sequential read (+{rtt} ms RTT, {p['mb_per_s']:g} MB/s per connection)",
              "≥ 2× rclone; ≥ 4× one connection's throughput",
              f"{fmt_s(ours['median_s'])}, {speed:.0f} MiB/s; {text}; "
              + (f"{fmt_x(k)} one connection ({one:.0f} MiB/s)" if one else "one connection: not measured"),
              None if r is None or k is None else (r >= 2 and k >= 4))
    ours = peer_entry(p, "huge_w", "s4db")
    if mib and ours["status"] == "ok":
        text, r, _ = vs_peer(p, "huge_w", "rclone", ours)
        t.add(f"{mib:,} MiB write + publish (+{rtt} ms RTT)", "≥ 2× rclone",
              f"{fmt_s(ours['median_s'])} ({mib / ours['median_s']:.0f} MiB/s); {text}",
              None if r is None else r >= 2)
    ng, kib = p.get("n_scan"), p.get("scan_kib")
    for wid, what in (("grep", "`grep -r`"), ("tar", "`tar c`")):
        ours = peer_entry(p, wid, "s4db")
        if not ng or ours["status"] != "ok":
            continue
        read_mib = ng * kib / 1024
        gets = (ours.get("s4db_stats") or {}).get("get", 0) + (ours.get("s4db_stats") or {}).get("get_range", 0)
        parts, ok = [], gets <= max(1, read_mib)
        for peer in ("s3fs", "rclone"):
            text, r, _ = vs_peer(p, wid, peer, ours)
            parts.append(text)
            ok = None if r is None else ok and r >= 10
        t.add(f"cold {what} of {ng:,} files of {kib} KiB (+{rtt} ms RTT)",
              "≥ 10× s3fs and rclone; ≤ 1 GET per MiB read",
              f"{fmt_s(ours['median_s'])}; " + ", ".join(parts)
              + f"; {gets} GETs for {read_mib:.1f} MiB ({gets / read_mib:.2f} per MiB)", ok)
    ours, local = peer_entry(p, "walk", "s4db"), peer_entry(p, "walk", "local")
    if ours["status"] == "ok" and local["status"] == "ok":
        r = ours["median_s"] / local["median_s"]
        reqs = ours.get("requests", s4db_requests(ours))
        t.add(f"os.walk + os.stat of {p['n_walk']:,} keys in {p['walk_dirs']} directories",
              "≤ 3× local disk; 0 S3 requests",
              f"{fmt_s(ours['median_s'])} vs {fmt_s(local['median_s'])} on local disk "
              f"({r:.2f}×); {reqs} requests", r <= 3 and reqs == 0)
    wids = [w for w in ("huge_w", "huge_r", "grep", "tar", "walk")
            if "peak_hwm_mb" in peer_entry(p, w, "s4db")]
    if wids:
        peak = max(wids, key=lambda w: peer_entry(p, w, "s4db")["peak_hwm_mb"])
        e = peer_entry(p, peak, "s4db")
        anon = max(peer_entry(p, w, "s4db").get("peak_anon_mb", 0) for w in wids)
        t.add("daemon memory during the large-file, scan and walk workloads",
              "≤ 256 MB RSS",
              f"{e['peak_hwm_mb']:.0f} MB peak RSS (VmHWM, in {p['workloads'][peak].split(',')[0]}); "
              f"anonymous memory at most {anon:.0f} MB",
              e["peak_hwm_mb"] <= 256)


def fmt_peer(p, wid, tool):
    pt = peer_time(peer_entry(p, wid, tool))
    if pt is None:
        return "not measured"
    return ("> " if pt[1] else "") + fmt_s(pt[0])


def metric_pair(engine, wid, metric):
    try:
        return (engine["rust"]["workloads"][wid]["metrics"][metric]["median"],
                engine["python"]["workloads"][wid]["metrics"][metric]["median"])
    except (KeyError, TypeError):
        return None


def cost_table(p):
    """Each tool's S3 requests per workload, priced."""
    tools = [t for t in p["tools"] if t != "local"]
    names = p["tool_names"]
    lines = ["| workload | " + " | ".join(f"{names[t]} requests | {names[t]} $ per 1,000 runs" for t in tools)
             + " |", "|---|" + "---:|---:|" * len(tools)]
    totals = {t: 0.0 for t in tools}
    for wid, label in p["workloads"].items():
        row, any_counted = [label], False
        for t in tools:
            e = peer_entry(p, wid, t)
            kinds = e.get("requests_by_kind")
            if kinds is None:
                row += ["–", "–"]
                continue
            any_counted = True
            c = cost(kinds)
            totals[t] += c
            capped = " (capped)" if e["status"] == "timeout" else ""
            row += [f"{sum(kinds.values()):,}{capped}", fmt_usd(c * 1000)]
        if any_counted:
            lines.append("| " + " | ".join(row) + " |")
    cells = [c for t in tools for c in ("", f"**{fmt_usd(totals[t] * 1000)}**")]
    lines.append("| **all workloads above** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine():
    cpu = sh("lscpu | sed -n 's/^Model name: *//p'") or platform.processor()
    mem = sh("free -g | awk '/^Mem:/ {print $2}'")
    disk = sh("df -T . | awk 'NR == 2 {print $2 \" on \" $1}'")
    rows = [("CPU", f"{cpu}, {os.cpu_count()} cores"), ("Memory", f"{mem} GiB"),
            ("Disk", disk), ("Kernel", platform.release()),
            ("Rust", sh("rustc --version")),
            ("s3fs", sh("s3fs --version 2>&1 | head -1")),
            ("rclone", sh("rclone version 2>/dev/null | head -1")),
            ("fio", sh("fio --version"))]
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--chart")
    ap.add_argument("--duration-s", type=float)
    a = ap.parse_args()
    res = a.results

    def by_rtt(prefix):
        out = {}
        for path in glob.glob(os.path.join(res, f"{prefix}-*ms.json")):
            rtt = int(re.search(r"-(\d+)ms\.json$", path).group(1))
            out[rtt] = load(path)
        return out

    peers, engine = by_rtt("peers"), by_rtt("engine")
    scale = load(os.path.join(res, "scale.json")) if os.path.exists(
        os.path.join(res, "scale.json")) else None
    t = Targets()
    check_targets(t, peers, engine, scale)

    some = next(iter(peers.values()), {})
    versions = some.get("versions", {})
    doc = ["# Benchmarks", "",
           "s4db-mount against s3fs-fuse and rclone mount, and the s4db engine against the Python "
           "`s4db` library it is compatible with: the same workloads, side by side, against one "
           "moto_server on this machine, without and with 20 ms of added round-trip time "
           "(`scripts/latency_proxy.py`, a delaying TCP proxy that also counts each tool's "
           "requests).", "",
           "**This file is generated** by `scripts/bench.sh` (see the README); edit "
           "`scripts/bench_report.py` instead.",
           f"Last run: {some.get('date', '?')}, s4db commit `{versions.get('s4db', '?')}`"
           + (f", {a.duration_s / 60:.1f} minutes for the whole suite." if a.duration_s else "."),
           "", "## Targets", "",
           "| workload | target | measured (one run of the suite) | |", "|---|---|---|---|",
           *t.rows, ""]
    if a.chart:
        doc += ["## The mount against its peers", "",
                f"![s4db-mount, s3fs, rclone and the local disk, +20 ms RTT]"
                f"({os.path.relpath(a.chart, os.path.dirname(a.out))})", ""]
    for rtt in sorted(peers, reverse=True):
        md = os.path.join(res, f"peers-{rtt}ms.md")
        if os.path.exists(md):
            doc += [drop_unmeasured_rows(read(md)), ""]
    for rtt in sorted(peers, reverse=True):
        if any("requests_by_kind" in peer_entry(peers[rtt], w, "s4db")
               for w in peers[rtt]["workloads"]):
            doc += [f"### S3 requests and their cost at AWS list prices (+{rtt} ms pass)", "",
                    "S3 Standard, us-east-1: PUT, COPY, POST and LIST $0.005 per 1,000; GET "
                    "and HEAD $0.0004 per 1,000; DELETE free. Requests as the proxy counted "
                    "them; a capped workload's count is what it sent before the cap. Cost: of "
                    "running the workload 1,000 times.", "",
                    cost_table(peers[rtt]), ""]
    doc += ["## The engine against the Python library", ""]
    for rtt in sorted(engine):
        md = os.path.join(res, f"engine-{rtt}ms.md")
        if os.path.exists(md):
            doc += [read(md), ""]
    if scale:
        doc += ["## Scale", "", read(os.path.join(res, "scale.md")), ""]
    notes = os.path.join(os.path.dirname(os.path.abspath(a.out)), "benchmark-notes.md")
    if os.path.exists(notes):
        doc += [read(notes), ""]
    doc += ["## Machine", "", machine(), "",
            f"Versions in the peer runs: {json.dumps(versions)}." if versions else "", ""]
    with open(a.out, "w") as f:
        f.write("\n".join(doc))
    print(f"bench_report.py: wrote {a.out}")


if __name__ == "__main__":
    main()
