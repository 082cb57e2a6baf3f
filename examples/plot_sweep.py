"""Plot the results of `moe sweep`.

Usage:
    /usr/bin/python3 examples/plot_sweep.py SWEEP_OUT_DIR

Reads SWEEP_OUT_DIR/results.jsonl (one JSON object per point, written by
`moe sweep SWEEP.yaml --out SWEEP_OUT_DIR`) and writes, next to it, the plots
that the sweep's grid supports:

    scaling.png            tokens/s and parallel efficiency against ranks
                           (one line per launcher and value of the other
                           grid keys), when ranks vary
    phases.png             stacked per-phase step time of every point,
                           measured (left bar) and predicted (right, hatched)
    predicted_vs_measured.png
                           the cost model's step time against the measured
                           one, with the +-25% band
    drop_vs_capacity.png   dropped-slot fraction and tokens/s against the
                           capacity factor, when moe.capacity_factor varies

Parallel efficiency is throughput per rank relative to the smallest world:
(tokens/s at N / N) / (tokens/s at N0 / N0); 1.0 is perfect scaling for
weak and strong scaling alike. Failed and invalid points are skipped with a
note. Exits with status 2 when there is nothing to plot.
"""
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PHASES = ["router", "permute", "dispatch", "experts", "combine", "unpermute",
          "attention_dense", "grad_sync", "optimizer"]
COLORS = plt.get_cmap("tab10").colors


def load(out_dir):
    path = os.path.join(out_dir, "results.jsonl")
    if not os.path.exists(path):
        sys.exit(f"error: {path} does not exist (run `moe sweep SWEEP.yaml --out {out_dir}`)")
    rows, skipped = [], 0
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                print(f"warning: {path}:{lineno}: skipping bad line ({e})", file=sys.stderr)
                continue
            if row.get("status") != "ok":
                skipped += 1
                continue
            rows.append(row)
    if skipped:
        print(f"note: {skipped} failed point(s) left out", file=sys.stderr)
    return rows


def series_name(row):
    """A line per launcher and per value of the other grid keys (config keys have dots)."""
    others = [f"{k}={row[k]}" for k in sorted(row) if "." in k]
    return " ".join([row["launcher"]] + others)


def plot_scaling(rows, out_dir):
    names = sorted({series_name(r) for r in rows})
    fig, (ax_tps, ax_eff) = plt.subplots(1, 2, figsize=(10, 4))
    for i, launcher in enumerate(names):
        pts = sorted(((r["ranks"], r["tokens_per_s"], r.get("predicted_step_ms"), r)
                      for r in rows if series_name(r) == launcher), key=lambda p: p[0])
        ranks = [p[0] for p in pts]
        tps = [p[1] for p in pts]
        ax_tps.plot(ranks, tps, "o-", color=COLORS[i % 10], label=f"{launcher} measured")
        if all(p[2] for p in pts):
            # Predicted tokens/s: the point's global tokens per step / predicted step.
            pred = [p[1] * p[3]["measured_step_ms"] / p[2] for p in pts]
            ax_tps.plot(ranks, pred, "x--", color=COLORS[i % 10], alpha=0.7,
                        label=f"{launcher} predicted")
        base = tps[0] / ranks[0]
        ax_eff.plot(ranks, [t / n / base for t, n in zip(tps, ranks)], "o-",
                    color=COLORS[i % 10], label=launcher)
    ax_tps.set(xlabel="ranks", ylabel="tokens/s", title="throughput")
    ax_eff.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax_eff.set(xlabel="ranks", ylabel="efficiency (per-rank throughput vs smallest world)",
               title="parallel efficiency", ylim=(0, None))
    for ax in (ax_tps, ax_eff):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["ranks"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "scaling.png"), dpi=120)
    plt.close(fig)


def plot_phases(rows, out_dir):
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4.5))
    width = 0.38
    has_pred = all(f"predicted_{p}_ms" in r for r in rows for p in PHASES)
    for x, r in enumerate(rows):
        bottom = bottom_pred = 0.0
        for i, phase in enumerate(PHASES):
            ms = r.get(f"{phase}_ms", 0.0)
            ax.bar(x - (width / 2 if has_pred else 0), ms, width, bottom=bottom,
                   color=COLORS[i], label=phase if x == 0 else None)
            bottom += ms
            if has_pred:
                pm = r[f"predicted_{phase}_ms"]
                ax.bar(x + width / 2, pm, width, bottom=bottom_pred, color=COLORS[i],
                       hatch="//", alpha=0.6, edgecolor="white")
                bottom_pred += pm
        # The step's wall time includes what no phase books (logging, statistics).
        ax.plot([x - width, x + (width if has_pred else 0)], [r["measured_step_ms"]] * 2,
                color="black", lw=1)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["point"].replace("__", "\n") for r in rows], fontsize=7)
    ax.set_ylabel("ms per step (slowest rank)")
    title = "step time by phase"
    if has_pred:
        title += " (left: measured, right hatched: predicted; line: measured step)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "phases.png"), dpi=120)
    plt.close(fig)


def plot_predicted(rows, out_dir):
    pts = [(r["measured_step_ms"], r["predicted_step_ms"], r["point"]) for r in rows
           if r.get("predicted_step_ms")]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(5, 5))
    hi = 1.1 * max(max(m, p) for m, p, _ in pts)
    ax.plot([0, hi], [0, hi], color="grey", lw=0.8)
    ax.fill_between([0, hi], [0, 0.75 * hi], [0, 1.25 * hi], color="grey", alpha=0.15,
                    label="+-25%")
    for i, (m, p, name) in enumerate(pts):
        ax.plot(m, p, "o", color=COLORS[i % 10], label=f"{name} ({100 * (p - m) / m:+.0f}%)")
    ax.set(xlim=(0, hi), ylim=(0, hi), xlabel="measured step ms", ylabel="predicted step ms",
           title="cost model vs measurement")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "predicted_vs_measured.png"), dpi=120)
    plt.close(fig)
    return True


def plot_capacity(rows, out_dir):
    pts = sorted((float(r["moe.capacity_factor"]), r["drop_frac"], r["tokens_per_s"])
                 for r in rows)
    capped = [p for p in pts if p[0] > 0]
    dropless = [p for p in pts if p[0] <= 0]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in capped], [100 * p[1] for p in capped], "o-", color=COLORS[3],
            label="dropped slots %")
    ax.set(xlabel="capacity factor", ylabel="dropped slots (%)")
    twin = ax.twinx()
    twin.plot([p[0] for p in capped], [p[2] for p in capped], "s--", color=COLORS[0],
              label="tokens/s")
    if dropless:
        # Dropless (capacity factor 0) keeps every slot: a reference line, not a point at 0.
        twin.axhline(dropless[0][2], color=COLORS[0], lw=0.8, ls=":",
                     label="tokens/s, dropless")
    twin.set_ylabel("tokens/s")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
    ax.set_title("speed against dropped tokens")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "drop_vs_capacity.png"), dpi=120)
    plt.close(fig)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out_dir = sys.argv[1]
    rows = load(out_dir)
    if not rows:
        print(f"error: no finished points in {out_dir}/results.jsonl", file=sys.stderr)
        sys.exit(2)
    written = []
    if len({r["ranks"] for r in rows}) > 1:
        plot_scaling(rows, out_dir)
        written.append("scaling.png")
    plot_phases(rows, out_dir)
    written.append("phases.png")
    if plot_predicted(rows, out_dir):
        written.append("predicted_vs_measured.png")
    if len({r.get("moe.capacity_factor") for r in rows} - {None}) > 1:
        plot_capacity(rows, out_dir)
        written.append("drop_vs_capacity.png")
    for name in written:
        print(os.path.join(out_dir, name))


if __name__ == "__main__":
    main()
