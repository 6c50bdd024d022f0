#!/usr/bin/env bash
# Nightly evaluation: run the eval set, keep a dated results file, diff it
# against the previous night, and publish the HTML report.
#
#   SEGMIND_API_KEY=... examples/nightly-eval.sh [JOBS.jsonl] [OUT_DIR]
#
# Exit code: 0 when no job changed type since last night, 1 when some did
# (a regression or a fix to look at), 2 or more when the run itself failed.
# Set BATCHRUNNER_FLAGS=--simulate to try it without a key.
set -uo pipefail

jobs=${1:-sample_jobs/eval.jsonl}
out=${2:-eval-runs}
today=$(date -u +%Y-%m-%d)
mkdir -p "$out"

results="$out/eval-$today.results.jsonl"
# shellcheck disable=SC2086  # BATCHRUNNER_FLAGS is a list of flags on purpose
python -m batchrunner "$jobs" -o "$results" --quiet ${BATCHRUNNER_FLAGS:-}
status=$?
if [ "$status" -ge 2 ]; then
    echo "nightly: the run failed (exit $status); resume by running this script again" >&2
    exit "$status"
fi

python -m batchrunner report "$results" --html "$out/eval-$today.html" > "$out/eval-$today.txt"
cp "$out/eval-$today.html" "$out/latest.html"

previous=$(find "$out" -maxdepth 1 -name 'eval-*.results.jsonl' ! -name "eval-$today.results.jsonl" | sort | tail -n 1)
if [ -z "$previous" ]; then
    echo "nightly: first night, nothing to compare with"
    exit 0
fi
python -m batchrunner diff "$previous" "$results" | tee "$out/eval-$today.diff.txt"
exit "${PIPESTATUS[0]}"
