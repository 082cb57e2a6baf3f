#!/usr/bin/env bash
# A curated mutant run (issue 15): each tests/mutants/*.patch is a one-line bug
# whose header names what it breaks, the ctest regex that should kill it and the
# build targets that regex needs:
#
#   Mutant: <name>
#   Breaks: <one sentence>
#   Killed-by: <ctest -R regex>
#   Targets: <ninja targets, space separated>
#
# For each mutant: apply it to a scratch copy of the repository, rebuild only
# the named targets (incrementally: one scratch build folder for every mutant,
# ccache on), run `ctest -R <regex>`, revert. A mutant is KILLED when a test of
# the subset fails, SURVIVED when all pass. A patch that no longer applies, a
# mutant that does not compile, a regex that selects no test, and a build of
# the unmutated copy that fails its subset are errors. Exit status: 0 when every
# mutant ran and was killed, 1 otherwise.
#
#   tests/mutants.sh                     # every mutant (after a baseline: the subsets pass unmutated)
#   tests/mutants.sh NAME [NAME...]      # some, by name (file name without .patch)
#   tests/mutants.sh --list              # names and what they break
#   tests/mutants.sh --check-applies     # only check that every patch applies
#   tests/mutants.sh --table             # Markdown table: each mutant's latest result over past runs
#
# Environment: MUTANT_ROOT (scratch folder; default ~/.cache/moe-mutants: the
# copy and its build folder live there and are reused between runs),
# MUTANT_JOBS (build and ctest parallelism, default 2), MUTANT_TIMEOUT (per-test
# ctest timeout in seconds, default 600), MUTANT_RESULTS (a Markdown table of the
# run is written there when set), MUTANT_REPO (the repository; default this
# script's, so a copy of the script can run while the original is edited).
# This is not part of ctest.
set -uo pipefail
REPO="${MUTANT_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
MDIR="$REPO/tests/mutants"
ROOT="${MUTANT_ROOT:-$HOME/.cache/moe-mutants}"
SRC="$ROOT/src"
BUILD="$SRC/build"
JOBS="${MUTANT_JOBS:-2}"
TIMEOUT="${MUTANT_TIMEOUT:-600}"
LOGS="$ROOT/logs"
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}" CCACHE_BASEDIR="$SRC"
export CCACHE_SLOPPINESS="pch_defines,time_macros,include_file_mtime,include_file_ctime"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

field() { sed -n "s/^$2: *//p" "$1" | head -1; }

all_names() { for p in "$MDIR"/*.patch; do basename "$p" .patch; done; }

if [ "${1:-}" = "--list" ]; then
  for n in $(all_names); do printf '%-28s %s\n' "$n" "$(field "$MDIR/$n.patch" Breaks)"; done
  exit 0
fi
if [ "${1:-}" = "--table" ]; then  # the latest result of every mutant over past runs ($ROOT/history.tsv)
  echo "| mutant | what it breaks | subset (ctest -R) | result | failing test(s) | s |"
  echo "|---|---|---|---|---|---|"
  for n in $(all_names); do
    p="$MDIR/$n.patch"
    IFS=$'\t' read -r _ st who secs when < <(grep -P "^$n\t" "$ROOT/history.tsv" 2>/dev/null | tail -1) || true
    echo "| \`$n\` | $(field "$p" Breaks) | \`$(field "$p" Killed-by | sed 's/|/\\|/g')\` | ${st:-not run} | ${who:-} | ${secs:-} |"
    st=""; who=""; secs=""
  done
  exit 0
fi
CHECK_ONLY=0
if [ "${1:-}" = "--check-applies" ]; then CHECK_ONLY=1; shift; fi
if [ $# -gt 0 ]; then NAMES=("$@"); else mapfile -t NAMES < <(all_names); fi
for n in "${NAMES[@]}"; do
  [ -f "$MDIR/$n.patch" ] || { echo "[mutants] no mutant '$n' (tests/mutants/$n.patch)" >&2; exit 2; }
done

# --- the scratch copy: the repository's tracked and untracked (not ignored) files -----
mkdir -p "$SRC" "$LOGS"
# Only files whose content differs are copied, with a fresh mtime, so the
# incremental build sees exactly what changed.
(cd "$REPO" && git ls-files -co --exclude-standard -z) |
  while IFS= read -r -d '' f; do
    [ -e "$REPO/$f" ] || continue
    if ! cmp -s "$REPO/$f" "$SRC/$f"; then
      mkdir -p "$SRC/$(dirname "$f")" && rm -f "$SRC/$f" && cp -P "$REPO/$f" "$SRC/$f"
    fi
  done
# A file deleted from the repository since the last run: remove it from the copy.
(cd "$SRC" && find . -path ./build -prune -o -type f -print | sed 's|^\./||' | sort) > "$ROOT/copy.lst"
(cd "$REPO" && git ls-files -co --exclude-standard | sort) > "$ROOT/repo.lst"
comm -23 "$ROOT/copy.lst" "$ROOT/repo.lst" | while read -r f; do rm -f "$SRC/$f"; done

if [ "$CHECK_ONLY" = 1 ]; then
  bad=0
  for n in "${NAMES[@]}"; do
    if (cd "$SRC" && patch -p1 --dry-run -s -f < "$MDIR/$n.patch" >/dev/null 2>&1); then
      echo "applies   $n"
    else
      echo "NO-APPLY  $n"; bad=1
    fi
  done
  exit $bad
fi

START=$(date +%s)
echo "[mutants] scratch copy $SRC, build $BUILD, ${#NAMES[@]} mutant(s)"
if [ ! -f "$BUILD/build.ninja" ] && [ ! -f "$BUILD/Makefile" ]; then
  echo "[mutants] configuring the scratch build (first run: a full build follows)"
  (cd "$SRC" && BUILD_DIR="$BUILD" JOBS="$JOBS" launch/build.sh > "$LOGS/configure.log" 2>&1) || {
    echo "[mutants] the unmutated scratch copy does not build: see $LOGS/configure.log" >&2; exit 1; }
fi

build_targets() {  # $1: log file; rest: targets
  local log="$1"; shift
  cmake --build "$BUILD" -j "$JOBS" --target "$@" > "$log" 2>&1
}

# ctest on the subset; prints the failed test names (one per line) to $2.
run_subset() {  # $1: regex, $2: failed-list file, $3: log file
  local regex="$1" failed="$2" log="$3"
  (cd "$BUILD" && ctest -R "$regex" -j "$JOBS" --timeout "$TIMEOUT" --output-on-failure) > "$log" 2>&1
  local rc=$?
  awk '/The following tests FAILED:/{f=1; next} f && /^[[:space:]]*[0-9]+ - / {sub(/^[[:space:]]*[0-9]+ - /, ""); sub(/  # GetParam\(\) = [^(]*/, " "); print}' "$log" > "$failed"
  if grep -q "No tests were found" "$log"; then return 3; fi
  return $rc
}

# Baseline: every named subset passes on the unmutated copy (else a "kill" proves
# nothing). On by default for a full run; MUTANT_BASELINE=1/0 forces it on/off.
if [ "${MUTANT_BASELINE:-$([ $# -eq 0 ] && echo 1 || echo 0)}" = 1 ]; then
  union="$(for n in "${NAMES[@]}"; do field "$MDIR/$n.patch" Killed-by; done | sort -u | paste -sd '|')"
  echo "[mutants] baseline: building every target and running the union of the subsets on the unmutated copy"
  if ! cmake --build "$BUILD" -j "$JOBS" > "$LOGS/baseline.build.log" 2>&1; then
    echo "[mutants] the unmutated copy does not build: see $LOGS/baseline.build.log" >&2; exit 1
  fi
  if ! run_subset "$union" "$LOGS/baseline.failed" "$LOGS/baseline.ctest.log"; then
    echo "[mutants] the unmutated copy fails its subsets: $(paste -sd ' ' "$LOGS/baseline.failed") (see $LOGS/baseline.ctest.log)" >&2
    exit 1
  fi
  echo "[mutants] baseline: $(grep -o '[0-9]*% tests passed.*' "$LOGS/baseline.ctest.log" | head -1 || true) ($(( $(date +%s) - START ))s)"
fi

declare -A STATUS WHO SECS
killed=0; survived=0; errors=0
for n in "${NAMES[@]}"; do
  p="$MDIR/$n.patch"
  regex="$(field "$p" Killed-by)"; targets="$(field "$p" Targets)"
  t0=$(date +%s)
  log="$LOGS/$n"
  if [ -z "$regex" ] || [ -z "$targets" ]; then
    STATUS[$n]="ERROR (header lacks Killed-by or Targets)"; errors=$((errors + 1)); continue
  fi
  if ! (cd "$SRC" && patch -p1 -s -f --no-backup-if-mismatch < "$p" > "$log.patch.log" 2>&1); then
    STATUS[$n]="ERROR (patch no longer applies: $(head -c 300 "$log.patch.log" | tr '\n' ' '))"
    errors=$((errors + 1))
    # Undo any hunk that did apply.
    (cd "$SRC" && patch -p1 -R -s -f --no-backup-if-mismatch < "$p" > /dev/null 2>&1) || true
    echo "[mutants] $n: ${STATUS[$n]}"
    continue
  fi
  # shellcheck disable=SC2086
  if ! build_targets "$log.build.log" $targets; then
    STATUS[$n]="ERROR (does not compile: see $log.build.log)"; errors=$((errors + 1))
  else
    run_subset "$regex" "$log.failed" "$log.ctest.log"; rc=$?
    if [ $rc = 3 ]; then
      STATUS[$n]="ERROR (ctest -R '$regex' selects no test)"; errors=$((errors + 1))
    elif [ $rc = 0 ]; then
      STATUS[$n]="SURVIVED"; survived=$((survived + 1))
    else
      STATUS[$n]="killed"; killed=$((killed + 1))
      WHO[$n]="$(paste -sd ';' "$log.failed" | sed 's/;/; /g')"
    fi
  fi
  (cd "$SRC" && patch -p1 -R -s -f --no-backup-if-mismatch < "$p" > "$log.revert.log" 2>&1) || {
    echo "[mutants] $n: could not revert the patch in $SRC: see $log.revert.log" >&2; exit 1; }
  SECS[$n]=$(( $(date +%s) - t0 ))
  printf '[mutants] %-28s %-9s %4ss  %s\n' "$n" "${STATUS[$n]%% *}" "${SECS[$n]}" "${WHO[$n]:-${STATUS[$n]#* }}"
  printf '%s\t%s\t%s\t%s\t%s\n' "$n" "${STATUS[$n]}" "${WHO[$n]:-}" "${SECS[$n]}" "$(date -u +%FT%TZ)" >> "$ROOT/history.tsv"
done
# Leave the scratch build matching the unmutated sources for the next run.
cmake --build "$BUILD" -j "$JOBS" > "$LOGS/final-build.log" 2>&1 || true
DUR=$(( $(date +%s) - START ))

echo
echo "[mutants] summary: ${#NAMES[@]} mutant(s): $killed killed, $survived survived, $errors error(s); $((DUR / 60))m$((DUR % 60))s"
for n in "${NAMES[@]}"; do
  case "${STATUS[$n]}" in killed) ;; *) echo "  $n: ${STATUS[$n]}" ;; esac
done
if [ -n "${MUTANT_RESULTS:-}" ]; then
  {
    echo "| mutant | what it breaks | subset (ctest -R) | result | failing test(s) | s |"
    echo "|---|---|---|---|---|---|"
    for n in "${NAMES[@]}"; do
      p="$MDIR/$n.patch"
      echo "| \`$n\` | $(field "$p" Breaks) | \`$(field "$p" Killed-by | sed 's/|/\\|/g')\` | ${STATUS[$n]} | ${WHO[$n]:-} | ${SECS[$n]:-} |"
    done
    echo
    echo "${#NAMES[@]} mutants: $killed killed, $survived survived, $errors errors; run took $((DUR / 60))m$((DUR % 60))s ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, MUTANT_JOBS=$JOBS)."
  } > "$MUTANT_RESULTS"
  echo "[mutants] table written to $MUTANT_RESULTS"
fi
[ $survived = 0 ] && [ $errors = 0 ]
