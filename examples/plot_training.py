#!/usr/bin/env python3
"""Renders the CSV of train_moe into a PNG: task loss and load imbalance vs step, every run.

    train_moe --csv training.csv
    /usr/bin/python3 examples/plot_training.py training.csv docs/training.png

Needs numpy and matplotlib (Debian: python3-numpy, python3-matplotlib).
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LABELS = {
    "none": "no balancing",
    "aux": "aux loss (HF load balancing, coef 0.02)",
    "aux_free": "aux-loss-free bias (DeepSeek-V3, gamma 2e-3)",
}
COLORS = {"none": "tab:red", "aux": "tab:blue", "aux_free": "tab:green"}


def smooth(v, n=25):
    """Trailing moving average over n steps (the first values average what exists)."""
    c = np.cumsum(np.insert(np.asarray(v, dtype=float), 0, 0.0))
    out = np.empty(len(v))
    for i in range(len(v)):
        lo = max(0, i + 1 - n)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def main(argv):
    if len(argv) != 3:
        print(__doc__)
        return 2
    runs = {}
    with open(argv[1], newline="") as f:
        for row in csv.DictReader(f):
            r = runs.setdefault(row["run"], {"step": [], "loss": [], "cv": [], "dead": []})
            r["step"].append(int(row["step"]))
            r["loss"].append(float(row["task_loss"]))
            r["cv"].append(float(row["load_cv"]))
            r["dead"].append(int(row["dead_experts"]))

    fig, (ax_loss, ax_cv) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in runs.items():
        label, color = LABELS.get(name, name), COLORS.get(name)
        ax_loss.plot(r["step"], smooth(r["loss"]), label=label, color=color)
        ax_cv.plot(r["step"], smooth(r["cv"]), label=label, color=color)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("task loss (MSE, 25-step average)")
    ax_loss.set_title("Task loss")
    ax_cv.set_xlabel("step")
    ax_cv.set_ylabel("coefficient of variation of expert load")
    ax_cv.set_title("Load imbalance (0 = even; 1.73 = 2 of 8 experts take all)")
    ax_cv.axhline(0.3, color="gray", linestyle=":", linewidth=1)
    ax_cv.text(0, 0.33, "test threshold 0.3", color="gray", fontsize=8)
    for ax in (ax_loss, ax_cv):
        ax.grid(True, alpha=0.3)
    ax_cv.legend(loc="center right", fontsize=8)
    fig.suptitle("One MoE layer (8 experts, top-2) from a router skewed to experts 0 and 1")
    fig.tight_layout()
    fig.savefig(argv[2], dpi=110)
    for name, r in runs.items():
        tail = slice(-50, None)
        print("%-9s final loss %.4f  load CV %.3f  dead experts %.1f" % (
            name, np.mean(r["loss"][tail]), np.mean(r["cv"][tail]), np.mean(r["dead"][tail])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
