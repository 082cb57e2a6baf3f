#!/usr/bin/env bash
# expect_failure.sh [--rc N] [-e PATTERN]... -- CMD...
# Passes when CMD exits non-zero (exactly N with --rc) within the safety-net
# time limit and its output (stdout + stderr) contains every PATTERN.
set -u
want_rc=""
patterns=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rc) want_rc="$2"; shift 2 ;;
    -e) patterns+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "expect_failure: unknown option '$1' (usage: [--rc N] [-e PATTERN]... -- CMD...)"; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "expect_failure: no command after --"; exit 2; }
out="$(timeout -k 5 60 "$@" 2>&1)"
rc=$?
printf '%s\n' "$out" | tail -40
if [ "$rc" -eq 0 ]; then echo "expect_failure: command succeeded, expected a failure"; exit 1; fi
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "expect_failure: command hung (killed by the safety net)"; exit 1; fi
if [ -n "$want_rc" ] && [ "$rc" -ne "$want_rc" ]; then
  echo "expect_failure: exit code $rc, expected $want_rc"; exit 1
fi
for p in "${patterns[@]+"${patterns[@]}"}"; do
  if ! printf '%s' "$out" | grep -qF -- "$p"; then echo "expect_failure: output lacks '$p'"; exit 1; fi
done
echo "expect_failure: ok (exit $rc)"
