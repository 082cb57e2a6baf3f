#!/usr/bin/env bash
# expect_failure.sh PATTERN CMD...: passes when CMD exits non-zero within the
# safety-net time limit and (if PATTERN is non-empty) its output contains PATTERN.
set -u
pattern="$1"; shift
out="$(timeout -k 5 60 "$@" 2>&1)"
rc=$?
printf '%s\n' "$out" | tail -40
if [ "$rc" -eq 0 ]; then echo "expect_failure: command succeeded, expected a failure"; exit 1; fi
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "expect_failure: command hung (killed by the safety net)"; exit 1; fi
if [ -n "$pattern" ] && ! printf '%s' "$out" | grep -qF -- "$pattern"; then
  echo "expect_failure: output lacks '$pattern'"; exit 1
fi
echo "expect_failure: ok (exit $rc)"
