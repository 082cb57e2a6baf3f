#!/usr/bin/python3
"""RSS slope of a training run: does memory stay flat after warm-up?

    tests/rss_slope.py MOE CONFIG [key=value ...] [--ranks N] [--warmup S] [--max-kib-per-step X]

Runs `MOE train CONFIG ... --out TMPDIR`, samples the process's VmRSS (and
that of its children, for a launcher) every 20 ms together with the last step
written to metrics.jsonl, and fits a least-squares line to RSS against step
over the steps after the warm-up (default: the first 20% of the steps).
Prints the slope in KiB/step, the RSS at the end of warm-up and at the end,
and the growth over the fitted span. With --max-kib-per-step, exits 1 when
the slope is larger.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time


def rss_kib(pid):
    total = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            with open("/proc/%d/task/%d/children" % (p, p)) as f:
                pids += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def last_step(metrics):
    try:
        with open(metrics, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        if line.endswith(b"}"):
            return int(line.split(b'"step":', 1)[1].split(b",", 1)[0])
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("moe")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the fit")
    ap.add_argument("--max-kib-per-step", type=float, default=None)
    args = ap.parse_args()

    out = tempfile.mkdtemp(prefix="moe-rss.")
    try:
        cmd = [args.moe, "train", args.config, *args.overrides, "--ranks", str(args.ranks), "--out", out]
        env = dict(os.environ, MOE_LOG_LEVEL=os.environ.get("MOE_LOG_LEVEL", "warn"))
        proc = subprocess.Popen(cmd, env=env)
        samples = []  # (step, rss KiB)
        metrics = os.path.join(out, "metrics.jsonl")
        while proc.poll() is None:
            step, rss = last_step(metrics), rss_kib(proc.pid)
            if rss:
                samples.append((step, rss))
            time.sleep(0.02)
        if proc.returncode != 0:
            sys.exit("rss_slope: `%s` exited with %d" % (" ".join(cmd), proc.returncode))
    finally:
        shutil.rmtree(out, ignore_errors=True)

    steps = max(s for s, _ in samples)
    warmup = args.warmup if args.warmup is not None else steps // 5
    fit = [(s, r) for s, r in samples if s > warmup]
    if len(fit) < 2:
        sys.exit("rss_slope: too few samples after step %d (%d); train longer" % (warmup, len(fit)))
    n = len(fit)
    mx = sum(s for s, _ in fit) / n
    my = sum(r for _, r in fit) / n
    sxx = sum((s - mx) ** 2 for s, _ in fit)
    slope = sum((s - mx) * (r - my) for s, r in fit) / sxx if sxx else 0.0
    first = [r for s, r in fit if s == fit[0][0]]
    last = [r for s, r in fit if s == fit[-1][0]]
    print("rss_slope: %d steps, fit over steps %d..%d (%d samples): slope %.2f KiB/step; "
          "RSS %.1f MiB after warm-up -> %.1f MiB at the end (%+.1f MiB); peak %.1f MiB"
          % (steps, fit[0][0], fit[-1][0], n, slope, max(first) / 1024, max(last) / 1024,
             (max(last) - max(first)) / 1024, max(r for _, r in samples) / 1024))
    marks = []
    for q in (0.25, 0.5, 0.75, 1.0):
        target = fit[0][0] + q * (fit[-1][0] - fit[0][0])
        s, r = min(fit, key=lambda sr: (abs(sr[0] - target), -sr[1]))
        marks.append("step %d: %.1f MiB" % (s, r / 1024))
    print("rss_slope: " + ", ".join(marks))
    if args.max_kib_per_step is not None and slope > args.max_kib_per_step:
        print("rss_slope: slope %.2f KiB/step is above %.2f" % (slope, args.max_kib_per_step))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
