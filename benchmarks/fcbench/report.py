"""Tables, summaries, the JSON and the chart of bench_ops.py (and the table helper of bench_train.py)."""
import json
import math
import os

from .timing import fmt_time, geomean


def table(cols, lines, left=1):
    """Plain text table; the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(c[i])) for c in [cols] + lines) for i in range(len(cols))]

    def fmt(cells):
        return "  ".join(str(v).ljust(widths[i]) if i < left else str(v).rjust(widths[i])
                         for i, v in enumerate(cells))

    return "\n".join([fmt(cols), "  ".join("-" * w for w in widths)] + [fmt(c) for c in lines])


def _pct(x):
    return f"{100 * x:.1f}%" if x is not None else "-"


def rows_table(records, peers, stat, peak_kind):
    """One line per row: algorithm, times, ratios, fastconv GFLOP/s and fraction of peak (torch's too)."""
    cols = ["row", "fc algorithm", "fastconv"]
    for p in peers:
        cols += [p, f"fc/{p}"]
    cols += ["fc GFLOP/s", f"fc %{peak_kind}", f"torch %{peak_kind}"]
    lines = []
    for r in records:
        t = r["times"]
        cells = [r["name"], r.get("algorithm", "-"), fmt_time(t.get("fastconv", {}).get(stat))]
        for p in peers:
            cells.append(fmt_time(t[p][stat]) if p in t else "-")
            ratio = r["ratios"].get(p)
            cells.append(f"{ratio:.3f}" if ratio is not None else "-")
        g = r.get("gflops", {}).get("fastconv") if r["op"] == "conv2d" else None
        cells.append(f"{g:.1f}" if g else "-")
        frac = r.get("peak_fraction", {})
        cells += [_pct(frac.get("fastconv")), _pct(frac.get("torch"))]
        lines.append(cells)
    return table(cols, lines, left=2)


def pass_summary(records, peers):
    """[{op, pass, rows, geomean/min/max of fc/peer}] per op and pass, then all rows, the core rows and
    the issue #8 rows."""
    groups = {}
    for r in records:
        groups.setdefault((r["op"], r["pass"]), []).append(r)
    out = []

    def entry(op, pass_, rs):
        e = {"op": op, "pass": pass_, "rows": len(rs)}
        for p in peers:
            vals = [r["ratios"][p] for r in rs if p in r["ratios"]]
            e[p] = {"geomean": geomean(vals), "min": min(vals) if vals else None, "max": max(vals) if vals else None,
                    "rows": len(vals)}
        fr = [r["peak_fraction"]["fastconv"] for r in rs if r.get("peak_fraction", {}).get("fastconv")]
        e["fastconv_peak_fraction"] = {"geomean": geomean(fr), "max": max(fr) if fr else None}
        return e

    for (op, pass_), rs in groups.items():
        out.append(entry(op, pass_, rs))
    out.append(entry("all", "", records))
    if any(r["core"] for r in records) and not all(r["core"] for r in records):
        out.append(entry("core rows", "fwd+bwd", [r for r in records if r["core"]]))
    if any(r.get("issue8") for r in records):
        for p in ("fwd", "bwd-input", "bwd-weight"):
            rs = [r for r in records if r.get("issue8") and r["pass"] == p]
            if rs:
                out.append(entry("issue #8 rows", p, rs))
        out.append(entry("issue #8 rows", "fwd, bwd-input, bwd-weight",
                         [r for r in records if r.get("issue8") and r["pass"] != "fwd+bwd"]))
    return out


def summary_table(summary, peers):
    cols = ["op", "pass", "rows"]
    for p in peers:
        cols += [f"fc/{p} geomean", "min", "max"]
    cols += ["fc %peak geomean", "max"]
    lines = []
    for e in summary:
        cells = [e["op"], e["pass"], str(e["rows"])]
        for p in peers:
            s = e[p]
            cells += [f"{s['geomean']:.3f}" if s["geomean"] else "-",
                      f"{s['min']:.3f}" if s["min"] else "-", f"{s['max']:.3f}" if s["max"] else "-"]
        f = e["fastconv_peak_fraction"]
        cells += [_pct(f["geomean"]), _pct(f["max"])]
        lines.append(cells)
    return table(cols, lines, left=2)


def write_json(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def plot(records, peers, path, title, stat="median"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["ratios"]]
    if not rows:
        return None
    height = max(3.0, 0.22 * len(rows) * max(1, len(peers)) + 1.5)
    fig, ax = plt.subplots(figsize=(11, min(height, 200)))
    bar_h = 0.8 / max(1, len(peers))
    for j, p in enumerate(peers):
        ys = [i + (j - (len(peers) - 1) / 2) * bar_h for i in range(len(rows))]
        vals = [r["ratios"].get(p) or float("nan") for r in rows]
        # Bars grow from parity (1) so faster and slower read left and right of the line.
        ax.barh(ys, [v - 1 for v in vals], left=1, height=bar_h, label=f"fastconv / {p}")
        for yv, v in zip(ys, vals):
            if math.isfinite(v):
                ax.text(v, yv, f" {v:.2f} ", va="center", ha="left" if v >= 1 else "right", fontsize=6)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    finite = [r["ratios"][p] for r in rows for p in peers if r["ratios"].get(p)]
    if finite:
        ax.set_xlim(min(min(finite), 1) / 2, max(max(finite), 1) * 2)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["name"] for r in rows], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top, no margins
    ax.set_xlabel(f"time ratio fastconv / peer ({stat} of blocks; < 1: fastconv faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
