#!/usr/bin/env bash
# Kill-and-resume soak: a run killed with SIGKILL at seeded random moments and
# resumed each time must end bitwise equal to an uninterrupted run.
#
#   tests/soak.sh [options] MOE [LAUNCHER ...]
#     --steps N     training steps (default 60)
#     --kills K     SIGKILLs (default 4)
#     --seed S      seeds the kill moments (default 1)
#     --config F    config (default configs/tiny.yaml beside this script)
#     --work DIR    working folder, emptied first (default: a mktemp folder, removed on success)
#     LAUNCHER      e.g. `mpirun -np 2 ...`; without one the run uses `--ranks 2` (threads)
#
# Both runs train with train.ckpt_every=1. Each kill targets a step drawn from
# the seed and one of three moments: "start" (a random time after launch,
# before or while the checkpoint loads), "step" (a random fraction of a step
# after the target step's checkpoint) or "ckpt" (as soon as a checkpoint's
# .tmp folder exists: in the middle of a checkpoint write). The launcher and
# every process under it get SIGKILL at once (power loss, not a clean exit).
# After a kill the run resumes with --resume (or starts again when no
# checkpoint was complete). At the end:
#   - metrics.jsonl: every step once, and step, loss, lm_loss, aux_loss,
#     z_loss, lr, grad_norm, drop_frac and expert_load equal to the reference's
#     (doubles compared exactly);
#   - the last checkpoint's .safetensors files (parameters, AdamW moments,
#     balance biases) byte-identical to the reference's.
# Prints one summary line: steps, kills, kills that hit a checkpoint write
# (a .tmp folder left behind), per moment, and the result. Exit 0 when equal.
set -euo pipefail
shopt -s nullglob
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
steps=60; kills=4; seed=1; config="$here/../configs/tiny.yaml"; work=""
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --kills) kills="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --*) echo "soak: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: soak.sh [--steps N] [--kills K] [--seed S] [--config F] [--work DIR] MOE [LAUNCHER ...]" >&2; exit 2; }
moe="$1"; shift
launcher=("$@")
ranks=(); [ ${#launcher[@]} -eq 0 ] && ranks=(--ranks 2)
[ -x "$moe" ] || { echo "soak: $moe is not an executable" >&2; exit 2; }
if [ -z "$work" ]; then work="$(mktemp -d "${TMPDIR:-/tmp}/moe-soak.XXXXXX")"; cleanup=1; else cleanup=0; fi
rm -rf "$work"; mkdir -p "$work"
ref="$work/reference"; run="$work/killed"
overrides=(train.steps="$steps" train.ckpt_every=1 train.log_every=1000000)
export MOE_LOG_LEVEL="${MOE_LOG_LEVEL:-warn}"

descendants() {  # every process under $1
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done
}
newest_step() {  # the newest complete checkpoint's step under $1, or -1
  local d=("$1"/checkpoints/step_????????)
  if [ ${#d[@]} -eq 0 ]; then echo -1; else local n="${d[-1]##*_}"; echo $((10#$n)); fi
}
launch() {  # launch DIR [--resume]: starts training in the background; sets $pid
  local dir="$1"; shift
  local where=(--out "$dir"); [ "${1:-}" = --resume ] && where=(--resume "$dir")
  "${launcher[@]}" "$moe" train "$config" "${overrides[@]}" "${ranks[@]}" "${where[@]}" \
    >>"$dir.log" 2>&1 &
  pid=$!
}

# --- the uninterrupted reference --------------------------------------------
t0=$(date +%s%N)
launch "$ref"
# Start-up: from launch to the first checkpoint (the window "start" kills aim at).
while kill -0 "$pid" 2>/dev/null && [ "$(newest_step "$ref")" -lt 1 ]; do sleep 0.01; done
start_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
wait "$pid" || { echo "soak: the reference run failed (log: $ref.log)" >&2; tail -20 "$ref.log" >&2; exit 1; }
ref_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
step_ms=$(/usr/bin/python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ms = sorted(r["step_ms"] for r in rows)
print(max(1, int(ms[len(ms) // 2])))' "$ref/metrics.jsonl")

# --- the killed and resumed run ------------------------------------------------
RANDOM=$seed
targets=()
for ((i = 0; i < kills; i++)); do targets+=($(( (RANDOM * 32768 + RANDOM) % (steps - 1) ))); done
mapfile -t targets < <(printf '%s\n' "${targets[@]}" | sort -n)
declare -A by_moment=([start]=0 [step]=0 [ckpt]=0)
hit_ckpt=0; done_kills=0
launch "$run"
for target in "${targets[@]}"; do
  moments=(start step ckpt); moment=${moments[$((RANDOM % 3))]}
  frac=$((RANDOM % 1000))
  if [ "$moment" = start ]; then
    # Within 80% of the reference's start-up (launch to first checkpoint).
    sleep "$(awk -v a="$start_ms" -v f="$frac" 'BEGIN{printf "%.3f", 0.8*a*f/1e6}')"
  else
    while kill -0 "$pid" 2>/dev/null && [ "$(newest_step "$run")" -lt "$target" ]; do sleep 0.01; done
    # The process tree is complete once a checkpoint exists: list it now, so
    # the kill itself is one system call after the moment.
    victims=("$pid" $(descendants "$pid"))
    if [ "$moment" = step ]; then
      sleep "$(awk -v a="$step_ms" -v f="$frac" 'BEGIN{printf "%.3f", a*f/1e6}')"
    else
      while kill -0 "$pid" 2>/dev/null; do t=("$run"/checkpoints/*.tmp); [ ${#t[@]} -gt 0 ] && break; done
    fi
  fi
  if ! kill -0 "$pid" 2>/dev/null; then
    # It finished (or failed) before this kill's moment: nothing left to kill.
    wait "$pid" || { echo "soak: run failed before kill $((done_kills + 1)) (log: $run.log)" >&2; tail -20 "$run.log" >&2; exit 1; }
    break
  fi
  [ "$moment" = start ] && victims=("$pid" $(descendants "$pid"))
  kill -KILL "${victims[@]}" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for v in "${victims[@]}"; do while kill -0 "$v" 2>/dev/null; do sleep 0.01; done; done
  done_kills=$((done_kills + 1)); by_moment[$moment]=$((by_moment[$moment] + 1))
  t=("$run"/checkpoints/*.tmp); [ ${#t[@]} -gt 0 ] && hit_ckpt=$((hit_ckpt + 1))
  echo "kill $done_kills: moment $moment, target step $target, newest checkpoint $(newest_step "$run"), tmp left: ${#t[@]}" >>"$run.log"
  if [ "$(newest_step "$run")" -ge 0 ]; then launch "$run" --resume; else launch "$run"; fi
done
wait "$pid" || { echo "soak: the resumed run failed (log: $run.log)" >&2; tail -20 "$run.log" >&2; exit 1; }

# --- compare -------------------------------------------------------------------
result=0
if [ "$done_kills" -lt "$kills" ]; then
  echo "soak: only $done_kills of $kills kills landed (the run finished first)" >&2; result=1
fi
/usr/bin/python3 - "$ref/metrics.jsonl" "$run/metrics.jsonl" "$steps" <<'PY' || result=1
import json, sys
fields = ["step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "drop_frac", "expert_load"]
def load(path):
    return [json.loads(l) for l in open(path)]
ref, run, steps = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3])
if [r["step"] for r in run] != list(range(1, steps + 1)):
    sys.exit("soak: metrics.jsonl of the killed run has steps %s, expected 1..%d once each"
             % ([r["step"] for r in run], steps))
for a, b in zip(ref, run):
    for f in fields:
        if a[f] != b[f]:
            sys.exit("soak: step %d: %s = %r uninterrupted, %r killed and resumed" % (a["step"], f, a[f], b[f]))
PY
last="$(printf 'step_%08d' "$steps")"
files=("$ref/checkpoints/$last"/*.safetensors)
[ ${#files[@]} -gt 0 ] || { echo "soak: no safetensors in $ref/checkpoints/$last" >&2; result=1; }
for f in "${files[@]}"; do
  cmp -s "$f" "$run/checkpoints/$last/${f##*/}" || { echo "soak: $last/${f##*/} differs" >&2; result=1; }
done
verdict=$([ $result -eq 0 ] && echo "bitwise equal" || echo "DIFFERENT")
echo "soak: ${launcher[*]:-threads (--ranks 2)}: $steps steps, $done_kills kills (start ${by_moment[start]}, step ${by_moment[step]}, ckpt ${by_moment[ckpt]}), $hit_ckpt hit a checkpoint write; final parameters and loss trajectory: $verdict (reference ${ref_ms} ms, start-up ${start_ms} ms, step ${step_ms} ms; seed $seed)"
if [ $result -eq 0 ] && [ $cleanup -eq 1 ]; then rm -rf "$work"; fi
[ $result -eq 0 ] || echo "soak: logs and runs kept in $work" >&2
exit $result
