#!/usr/bin/env bash
# Several reproduction runs at once on one GPU, then their reports packed into one archive.
#
#   scripts/reproduce/parallel.sh OUTROOT ARCHIVE "NAME ARGS..." ["NAME ARGS..." ...]
#   scripts/reproduce/parallel.sh /tmp/rq rq.tgz "s0 --seed 0" "s1 --seed 1" "nocot --cot-pretrain 0"
#
# Each run is a few tens of millions of parameters and leaves most of an H100/H200 idle, so a few
# configurations (seeds, ablations) share one GPU in about the time of one. Each run writes
# OUTROOT/NAME/ (log.txt, report.md, results.json, figures, ckpt/); the archive holds everything
# but the checkpoints. Exits non-zero if any run failed. RUN_TIMEOUT (seconds) stops runs still going
# then; a run rewrites its report after each model it evaluates, so a stopped one still has one.
# RUN_ARGS is appended to every run's options.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root=$1
archive=$2
shift 2
mkdir -p "$root"
pids=()
names=()
for spec in "$@"; do
  read -r name args <<<"$spec"
  # shellcheck disable=SC2086  # args is a list of options on purpose
  timeout "${RUN_TIMEOUT:-0}" python3 "$here/run.py" --out "$root/$name" --size gpu $args ${RUN_ARGS:-} >"$root/$name.stdout" 2>&1 &
  pids+=($!)
  names+=("$name")
done
rc=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "${names[$i]}: ok"
  else
    echo "${names[$i]}: FAILED"
    tail -n 30 "$root/${names[$i]}.stdout"
    rc=1
  fi
done
tar -czf "$archive" -C "$root" --exclude=ckpt --exclude='corpus-*' .
exit $rc
