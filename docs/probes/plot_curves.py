"""Per-kind held-out yes/no accuracy against cumulative training CPU-minutes for a chain of probe runs.

    .venv/bin/python docs/probes/plot_curves.py out=docs/img/base_curves.png \
        stage1=s1l,s1n,s1q stage2=s2d,s3b

Each run's log (runs/probe/<name>.log) holds JSON lines with "cpu_min" and one accuracy per kind; a run that
continued from the previous one is drawn after it, its CPU-minutes added to the chain's.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KINDS = ("existence", "color", "count", "position", "all")
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)


def chain(names: list[str], start: float = 0.0) -> tuple[list[float], dict, list[tuple[float, str]]]:
    """Cumulative CPU-minutes, accuracy per kind, and where each run begins, for runs that continue each other."""
    xs, ys, marks, offset = [], {k: [] for k in KINDS}, [], start
    for name in names:
        rows = [json.loads(line) for line in open(f"runs/probe/{name}.log") if line.startswith("{")]
        rows = [r for r in rows if "cpu_min" in r or r.get("step") == 0]
        marks.append((offset, name))
        for r in rows:
            xs.append(offset + r.get("cpu_min", 0.0))
            for k in KINDS:
                ys[k].append(r.get(k))
        offset = xs[-1]
    return xs, ys, marks


fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
s1 = args.get("stage1", "s1l,s1n,s1q").split(",")
s2 = args.get("stage2", "s2d").split(",")
x1, y1, m1 = chain(s1)
x2, y2, m2 = chain(s2, start=x1[-1])
for ax, (xs, ys, marks, title) in zip(axes, [(x1, y1, m1, "stage 1: LLM on oracle scene slots"),
                                             (x2, y2, m2, "stages 2-3: from pixels")]):
    for k in KINDS:
        ax.plot(xs, ys[k], marker="o", ms=3, lw=2.5 if k == "all" else 1.4, label=k,
                color="black" if k == "all" else None)
    for x, name in marks:
        ax.axvline(x, color="grey", lw=0.6, ls=":")
        ax.text(x, 0.42, f" {name}", fontsize=8, color="grey")
    ax.axhline(0.85, color="red", lw=0.8, ls="--")
    ax.axhline(0.5, color="grey", lw=0.6)
    ax.set_title(title)
    ax.set_xlabel("cumulative training CPU-minutes (whole base)")
    ax.set_ylim(0.4, 1.02)
    ax.grid(alpha=0.3)
axes[0].set_ylabel("held-out yes/no accuracy")
axes[0].legend(loc="lower right", fontsize=8)
fig.tight_layout()
fig.savefig(args.get("out", "docs/img/base_curves.png"), dpi=110)
print("wrote", args.get("out", "docs/img/base_curves.png"))
