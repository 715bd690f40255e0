#!/usr/bin/env bash
# The short MT10 benchmark whose report is committed under benchmarks/mt10-short/.
#
# 4 balancers (mean, cagrad, fairgrad, sdmgrad-os) x 3 seeds, `mtrl` protocol, published
# hyper-parameters from configs/mt10_<balancer>.json, a small step budget. It demonstrates
# the pipeline and gives early-training numbers; it does NOT reproduce the papers' 2M-step
# results. On 2 CPU cores (2 runs at a time, 1 thread each) the default STEPS=3000 (1,500
# warm-up steps + 1,500 updates per run) took 16 min 24 s on 2026-11-29 (README).
#
# Resumable: run it again after an interruption and only unfinished runs continue.
#
#   scripts/run_short_benchmark.sh                     # defaults below
#   STEPS=5000 SEEDS=5 scripts/run_short_benchmark.sh  # bigger budget, same layout
#   scripts/run_short_benchmark.sh --launcher ray      # extra options go to `mtrl bench`
#
# buffer_capacity is set to STEPS x 10 tasks (at least the batch, 1280): every transition
# still fits (nothing is ever evicted, so training is the same as with the 1M default),
# and the process allocates
# ~12 MB of replay instead of 416 MB (checkpoints hold only the filled part either way).
# Commit only the report files (summary.md, summary.json, results.csv, *.png, bench.json),
# not runs/ (checkpoints, TensorBoard logs).
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS="${STEPS:-3000}"
SEEDS="${SEEDS:-3}"
OUT="${OUT:-benchmarks/mt10-short}"
PY="${PY:-.venv/bin/python}"

exec "$PY" -m mtrl.cli bench \
    --benchmark MT10 \
    --balancers mean,cagrad,fairgrad,sdmgrad-os \
    --seeds "$SEEDS" \
    --steps "$STEPS" \
    --protocol mtrl \
    --out "$OUT" \
    --threads-per-run 1 \
    --set eval_every=500 \
    --set log_every=100 \
    --set checkpoint_every=500 \
    --set "buffer_capacity=$(( STEPS * 10 > 1280 ? STEPS * 10 : 1280 ))" \
    "$@"
