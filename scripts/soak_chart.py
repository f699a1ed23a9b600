#!/usr/bin/env python3
"""Charts of scripts/soak.sh's CSV: object count, a fresh mount's `ls -lR` cost, the
writer daemon's RSS and its local directory, against uploads made.

    scripts/soak_chart.py target/soak/soak.csv target/soak/soak.png

matplotlib comes from .venv-test/bench, as for scripts/bench_chart.py (made on first use).
"""

import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_chart  # noqa: E402  (its ensure_matplotlib re-runs us in the bench venv)


def main():
    src, out = sys.argv[1], sys.argv[2]
    bench_chart.ensure_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(src) as f:
        rows = list(csv.DictReader(f))
    x = [int(r["uploads"]) for r in rows]
    series = [
        ("objects in the bucket", [int(r["objects"]) for r in rows], "objects"),
        ("fresh mount: S3 requests of ls -lR", [int(r["fresh_ls_requests"]) for r in rows], "requests"),
        ("writer daemon RSS", [int(r["writer_rss_kb"]) / 1024 for r in rows], "MiB"),
        ("writer local directory", [int(r["local_dir_bytes"]) / 2**20 for r in rows], "MiB"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for ax, (title, ys, unit) in zip(axes.flat, series):
        ax.plot(x, ys, marker="o", markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("uploads made (one small file each)")
    fig.suptitle("s4db-mount soak: history grows, cost does not", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
