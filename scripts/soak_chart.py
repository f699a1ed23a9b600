#!/usr/bin/env python3
"""Charts of scripts/soak.sh's CSV: object count, a fresh mount's `ls -lR` cost, the
writer's and the reader's RSS and the writer's local directory, against uploads made.

    scripts/soak_chart.py target/soak/soak.csv target/soak/soak.png

matplotlib comes from .venv-test/bench, as for scripts/bench_chart.py (made on first use).
"""

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-test", "bench")
VENV_PY = os.path.join(VENV, "bin", "python")


def ensure_matplotlib():
    """Re-runs this script in the bench venv (made when missing) unless matplotlib is here."""
    try:
        import matplotlib  # noqa: F401
        return
    except ImportError:
        pass
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        sys.exit(f"soak_chart.py: matplotlib is missing from {VENV}; delete it to rebuild")
    if not os.path.exists(VENV_PY):
        print(f"soak_chart.py: creating {VENV} (matplotlib)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([VENV_PY, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "matplotlib"], check=True)
    os.execv(VENV_PY, [VENV_PY, os.path.abspath(__file__), *sys.argv[1:]])


def main():
    src, out = sys.argv[1], sys.argv[2]
    ensure_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(src) as f:
        rows = list(csv.DictReader(f))
    x = [int(r["uploads"]) for r in rows]
    series = [
        ("objects in the bucket", [int(r["objects"]) for r in rows], "objects"),
        ("fresh mount: S3 requests of ls -lR", [int(r["fresh_ls_requests"]) for r in rows], "requests"),
        ("daemon RSS: writer, reader (dashed)", [int(r["writer_rss_kb"]) / 1024 for r in rows], "MiB"),
        ("writer local directory", [int(r["local_dir_bytes"]) / 2**20 for r in rows], "MiB"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for ax, (title, ys, unit) in zip(axes.flat, series):
        ax.plot(x, ys, marker="o", markersize=3)
        if unit == "MiB" and title.startswith("daemon RSS"):
            ax.plot(x, [int(r["reader_rss_kb"]) / 1024 for r in rows], marker="o", markersize=3,
                    linestyle="--")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("uploads made (one small file each)")
    fig.suptitle(f"s4db-mount soak: {x[-1]:,} uploads", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
