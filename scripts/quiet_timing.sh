#!/usr/bin/env bash
# Run one timing command on a quiet machine: one timing run at a time (a lock), the background
# training benchmarks (accuracy grid, plan training) paused (SIGSTOP) while it runs and resumed
# after, whatever the exit.
# Usage: scripts/quiet_timing.sh CMD [ARGS...]
set -u
LOCK=${BLOCKPRUNE_TIMING_LOCK:-/tmp/blockprune-timing.lock}
exec 9>"$LOCK"
echo "quiet_timing: waiting for the timing lock ($LOCK)" >&2
flock 9
PATTERN='benchmarks/(accuracy|plan_training)\.py'
# the training runs to pause: matching command lines outside this script's own process group (the
# timed command may itself be e.g. `plan_training.py --time`; stopping it would stop this script too)
MYPGID=$(ps -o pgid= -p $$ | tr -d ' ')
PAUSED=""
for pid in $(pgrep -f "$PATTERN"); do
  [ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" = "$MYPGID" ] && continue
  PAUSED="$PAUSED $pid"
done
resume() { [ -n "$PAUSED" ] && kill -CONT $PAUSED 2>/dev/null; true; }
trap resume EXIT INT TERM
[ -n "$PAUSED" ] && kill -STOP $PAUSED 2>/dev/null
sleep 5   # let the paused grid's threads leave the cores before the load check
echo "quiet_timing: grid paused; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$@"
