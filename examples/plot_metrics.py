"""Plot training metrics written by a run.

Usage:
    /usr/bin/python3 examples/plot_metrics.py RUN_DIR

Reads RUN_DIR/metrics.jsonl (one JSON object per training step, with keys
step, loss, lm_loss, aux_loss, z_loss, lr, grad_norm, tokens_per_s, drop_frac,
val_loss on the steps that evaluated (train.eval_every), and expert_load = [per MoE layer: [per-expert token counts]]) and writes:

    RUN_DIR/loss.png         loss / lm_loss (+ EMA), val_loss, aux_loss, lr and
                             drop_frac
    RUN_DIR/expert_load.png  per-layer heatmap of the fraction of tokens
                             routed to each expert at each step

Lines that fail to parse (e.g. a partially written last line) are skipped
with a warning. Exits with status 2 if the file is missing or has no valid
lines.
"""
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def load_records(path):
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                int(rec["step"])
                records.append(rec)
            except (ValueError, KeyError, TypeError) as e:
                print(f"warning: {path}:{lineno}: skipping bad line ({e})",
                      file=sys.stderr)
    return records


def column(records, key):
    return np.array([float(r.get(key, np.nan)) for r in records])


def ema(x, alpha=0.05):
    out = np.empty_like(x)
    acc = x[0]
    for i, v in enumerate(x):
        acc = alpha * v + (1 - alpha) * acc
        out[i] = acc
    return out


def plot_loss(records, steps, out_path):
    loss, lm_loss = column(records, "loss"), column(records, "lm_loss")
    fig, (ax1, ax3) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    ax1.plot(steps, loss, color="tab:blue", alpha=0.3, label="loss")
    ax1.plot(steps, ema(loss), color="tab:blue", label="loss (EMA)")
    ax1.plot(steps, lm_loss, color="tab:green", alpha=0.6, label="lm_loss")
    val = [(int(r["step"]), float(r["val_loss"])) for r in records if "val_loss" in r]
    if val:
        ax1.plot([s for s, _ in val], [v for _, v in val], color="black", marker="o",
                 markersize=3, label="val_loss (held out)")
    ax1.set_ylabel("loss")
    ax1.set_title("training loss")
    ax1.grid(alpha=0.3)
    ax2 = ax1.twinx()
    ax2.plot(steps, column(records, "aux_loss"), color="tab:red", alpha=0.6,
             label="aux_loss")
    ax2.set_ylabel("aux_loss", color="tab:red")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper right")

    ax3.plot(steps, column(records, "lr"), color="tab:purple", label="lr")
    ax3.set_ylabel("lr", color="tab:purple")
    ax3.set_xlabel("step")
    ax3.grid(alpha=0.3)
    ax4 = ax3.twinx()
    ax4.plot(steps, column(records, "drop_frac"), color="tab:orange",
             label="drop_frac")
    ax4.set_ylabel("drop_frac", color="tab:orange")
    h3, l3 = ax3.get_legend_handles_labels()
    h4, l4 = ax4.get_legend_handles_labels()
    ax3.legend(h3 + h4, l3 + l4, loc="upper right")
    ax3.set_title("learning rate and token drop fraction")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def plot_expert_load(records, steps, out_path):
    n_layers = max((len(r.get("expert_load") or []) for r in records),
                   default=0)
    if n_layers == 0:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.text(0.5, 0.5, "dense model: no expert load", ha="center",
                va="center", fontsize=14)
        ax.axis("off")
        fig.savefig(out_path, dpi=100)
        plt.close(fig)
        return
    fig, axes = plt.subplots(n_layers, 1, figsize=(10, 2.5 * n_layers + 0.5),
                             squeeze=False, sharex=True)
    for i, ax in enumerate(axes[:, 0]):
        rows = [r.get("expert_load") or [] for r in records]
        n_exp = max((len(l[i]) for l in rows if len(l) > i), default=0)
        frac = np.full((max(n_exp, 1), len(records)), np.nan)
        for j, layers in enumerate(rows):
            if len(layers) > i and layers[i]:
                counts = np.asarray(layers[i], dtype=float)
                total = counts.sum()
                if total > 0:
                    frac[:len(counts), j] = counts / total
        extent = (steps[0] - 0.5, steps[-1] + 0.5, frac.shape[0] - 0.5, -0.5)
        im = ax.imshow(frac, aspect="auto", interpolation="nearest",
                       cmap="viridis", extent=extent, vmin=0)
        ax.set_title(f"layer {i}")
        ax.set_ylabel("expert id")
        fig.colorbar(im, ax=ax, label="token fraction")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def main():
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} RUN_DIR", file=sys.stderr)
        sys.exit(2)
    run_dir = sys.argv[1]
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        print(f"error: {path} not found", file=sys.stderr)
        sys.exit(2)
    records = sorted(load_records(path), key=lambda r: int(r["step"]))
    if not records:
        print(f"error: {path} has no valid lines", file=sys.stderr)
        sys.exit(2)
    steps = np.array([int(r["step"]) for r in records])

    loss_png = os.path.join(run_dir, "loss.png")
    load_png = os.path.join(run_dir, "expert_load.png")
    plot_loss(records, steps, loss_png)
    plot_expert_load(records, steps, load_png)
    print(f"wrote {loss_png}")
    print(f"wrote {load_png}")

    loss = column(records, "loss")
    tps = column(records, "tokens_per_s")
    tail = tps[-max(1, len(tps) // 10):]
    print(f"{len(records)} steps: loss first {loss[0]:.4f} last {loss[-1]:.4f} "
          f"min {np.nanmin(loss):.4f}; "
          f"mean tokens/s (last 10%) {np.nanmean(tail):.1f}")
    val = [(int(r["step"]), float(r["val_loss"])) for r in records if "val_loss" in r]
    if val:
        print(f"val_loss at step {val[-1][0]}: {val[-1][1]:.4f} "
              f"(min {min(v for _, v in val):.4f} over {len(val)} evaluations)")


if __name__ == "__main__":
    main()
