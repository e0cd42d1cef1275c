#!/usr/bin/env bash
# The model-based fault test, long: seeded runs of every operation against every
# fault (see tests/api/model/mod.rs), on a Redis, a PostgreSQL and replicas of its
# own, in a release build. Stops by itself after the steps or the minutes given.
#
#   scripts/chaos.sh [--seed S] [--steps N] [--run-steps N] [--minutes M] [--keep-going]
#
# --seed       first seed (default 1); each run of --run-steps steps takes the next
# --steps      steps in all (default 20000)
# --run-steps  steps per run, each on fresh servers (default 1000)
# --minutes    stop starting runs after this long (default 90)
# --keep-going report a failing seed and go on, to list every seed that fails
set -euo pipefail
cd "$(dirname "$0")/.."

export BOXOFFICE_CHAOS_SEED=1 BOXOFFICE_CHAOS_STEPS=20000 BOXOFFICE_CHAOS_RUN_STEPS=1000
export BOXOFFICE_CHAOS_MINUTES=90 BOXOFFICE_CHAOS_KEEP_GOING=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --seed) BOXOFFICE_CHAOS_SEED=$2; shift 2 ;;
        --steps) BOXOFFICE_CHAOS_STEPS=$2; shift 2 ;;
        --run-steps) BOXOFFICE_CHAOS_RUN_STEPS=$2; shift 2 ;;
        --minutes) BOXOFFICE_CHAOS_MINUTES=$2; shift 2 ;;
        --keep-going) BOXOFFICE_CHAOS_KEEP_GOING=1; shift ;;
        *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done
# A single run shorter than the steps asked for is the rerun of a failing seed.
if [[ $BOXOFFICE_CHAOS_STEPS -lt $BOXOFFICE_CHAOS_RUN_STEPS ]]; then
    BOXOFFICE_CHAOS_RUN_STEPS=$BOXOFFICE_CHAOS_STEPS
fi
exec cargo test --release --test api model::chaos -- --ignored --nocapture --exact
