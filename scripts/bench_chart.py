#!/usr/bin/env python3
"""Bar chart of scripts/bench_peers.sh's results: seconds per workload and tool, log scale.

    scripts/bench_chart.py target/bench/peers-20ms.json target/bench/peers-20ms.png

matplotlib lives in its own venv, .venv-test/bench (made on first use, so the test venvs
stay exactly what scripts/test.sh pins); the script re-runs itself there when the Python
that started it has no matplotlib.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-test", "bench")
VENV_PY = os.path.join(VENV, "bin", "python")

# Short x labels; every workload bench_peers.sh measures, in its table's order.
SHORT = {
    "create_many": "create {nc}\n+ publish",
    "create": "create {n}\n+ publish",
    "ls": "ls -l {n}\n(remount)",
    "cold": "cold cat\n{n} files",
    "warm": "warm cat\n{n} files",
    "mv": "mv {k}\n+ publish",
    "append": ">> {ka}\n+ publish",
    "rm": "rm -r {n}\n+ publish",
    "seq64": "64 × 64 KiB\none by one",
    "par64": "64 × 64 KiB\nparallel",
    "fio_w": "fio write\n{big} MiB",
    "fio_r": "fio read\n{big} MiB",
    "read_warm": "warm read\n{big} MiB",
    "huge_w": "write {huge} MiB\n+ publish",
    "huge_r": "cold read\n{huge} MiB",
    "grep": "cold grep -r\n{ng} files",
    "tar": "cold tar c\n{ng} files",
    "walk": "walk+stat\n{nw} keys",
}
COLORS = {"s4db": "#2a7ab9", "s3fs": "#d9822b", "rclone": "#5b9e47", "local": "#9a9a9a"}


def ensure_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return
    except ImportError:
        pass
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        sys.exit(f"bench_chart.py: matplotlib is missing from {VENV}; delete it to rebuild")
    if not os.path.exists(VENV_PY):
        print(f"bench_chart.py: creating {VENV} (matplotlib)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([VENV_PY, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "matplotlib"], check=True)
    os.execv(VENV_PY, [VENV_PY, os.path.abspath(__file__), *sys.argv[1:]])


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().split("\n\n")[1])
    ensure_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    doc = json.load(open(sys.argv[1]))
    tools, names, res = doc["tools"], doc["tool_names"], doc["results"]
    wids = [w for w in doc["workloads"] if w in SHORT]
    fmt = {"n": doc["n"], "k": doc["k"], "ka": doc.get("ka", doc["k"]),
           "nc": doc.get("n_create", doc["n"]), "big": doc["big_mib"],
           "huge": doc.get("huge_mib"), "ng": doc.get("n_scan"), "nw": doc.get("n_walk")}

    fig, ax = plt.subplots(figsize=(18, 6.5))
    width = 0.8 / len(tools)
    values = []
    for i, tool in enumerate(tools):
        for j, wid in enumerate(wids):
            e = res[wid][tool]
            x = j + (i - (len(tools) - 1) / 2) * width
            if e["status"] == "ok":
                v, label, hatch = e["median_s"], fmt_s(e["median_s"]), None
            elif e["status"] == "not run":
                continue
            elif e["status"] == "timeout":
                # Drawn up to the cap, hatched: the real bar is taller.
                v, label, hatch = e["cap_s"], f"> {e['cap_s']:g} s", "///"
            else:
                ax.text(x, 0, e["status"], rotation=90, ha="center", va="bottom", fontsize=7,
                        transform=ax.get_xaxis_transform())
                continue
            values.append(v)
            ax.bar(x, v, width, color=COLORS.get(tool, None), hatch=hatch,
                   edgecolor="white" if hatch is None else "black", linewidth=0.5)
            ax.text(x, v * 1.08, label, rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    if values:
        ax.set_ylim(min(values) / 2, max(values) * 6)  # room for the labels above the bars
    ax.set_xticks(range(len(wids)))
    ax.set_xticklabels([SHORT[w].format(**fmt) for w in wids], fontsize=8)
    ax.set_ylabel("seconds (log scale, lower is better)")
    runs = f"median of {doc['runs']} runs" if doc["runs"] > 1 else "one run"
    ax.set_title(f"{doc['title']}\nN={doc['n']}, {runs}, {doc['cores']} cores", fontsize=11)
    ax.grid(axis="y", which="major", alpha=0.3)
    handles = [Patch(color=COLORS.get(t), label=names[t]) for t in tools]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                         label="stopped at the cap (> value shown)"))
    ax.legend(handles=handles, loc="upper left", fontsize=8, ncol=len(handles))
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=120)
    print(f"bench_chart.py: wrote {sys.argv[2]}", file=sys.stderr)


def fmt_s(v):
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s" if v < 10 else f"{v:.0f} s"


if __name__ == "__main__":
    main()
