#!/usr/bin/env bash
# The `gpu` profile on a machine with PyTorch and transformers but no internet, in steps that
# each end within a time limit (default 540 s) and resume from the run folder.
#
#   bash benchmarks/gpu/run.sh PACK_DIR OUT_DIR [STEP_SECONDS] [--set key=value ...]
#
# PACK_DIR: made by `make gpu-pack`. Call it again until it prints "done": each call goes on
# from the last pretraining epoch or finished model. OUT_DIR receives results.{json,md}, the
# logs, the pretraining losses and the environment after every call. Needs a writable
# $FLIPCTR_DATA (default /tmp/flipctr-data) and keeps its run folder in $RUN_DIR (default
# $FLIPCTR_DATA/runs/gpu): both must survive between calls on the same machine.
# FLIPCTR_NO_INSTALL=1 skips `pip install --no-deps -e .` (the package is already installed).
# The first call measures pretraining throughput (benchmarks/pretrain_throughput.py, about a
# minute on a GPU) into OUT_DIR/pretrain_throughput.{json,md} before the run; THROUGHPUT=0 skips it.
set -euo pipefail
pack=$(realpath "$1"); out=$(mkdir -p "$2" && realpath "$2"); shift 2
step_seconds=540
if [[ $# -gt 0 && $1 != --* ]]; then step_seconds=$1; shift; fi
cd "$(dirname "$0")/../.."
export FLIPCTR_DATA=${FLIPCTR_DATA:-/tmp/flipctr-data} PYTHONUNBUFFERED=1
RUN_DIR=${RUN_DIR:-$FLIPCTR_DATA/runs/gpu}
dataset=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['dataset'])" "$pack/PACK.json")
if [[ ${FLIPCTR_NO_INSTALL:-0} != 1 ]]; then
    python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
fi
if [[ ! -f $FLIPCTR_DATA/raw/$dataset/SOURCE.json ]]; then
    mkdir -p "$FLIPCTR_DATA/raw"
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
        "$pack/raw-$dataset.tar.xz" "$FLIPCTR_DATA/raw"
fi
if [[ ${THROUGHPUT:-1} == 1 && ! -f $out/pretrain_throughput.json ]]; then
    python3 benchmarks/pretrain_throughput.py --dataset "$dataset" --plm "$pack/plm" --batch-size "${THROUGHPUT_BATCH:-256}" \
        --steps 4 --out "$out" || echo "throughput measurement failed; going on with the run"
fi
status=0
timeout --signal=TERM "$step_seconds" python3 -m flipctr.cli run --dataset "$dataset" --profile gpu \
    --plm "$pack/plm" --run-dir "$RUN_DIR" --resume "$@" || status=$?
for f in results.json results.md train.log environment.json config.yaml pretrain/pretrain_history.json \
         pretrain/pretrain_losses.png; do
    [[ -f $RUN_DIR/$f ]] && cp "$RUN_DIR/$f" "$out/$(echo "$f" | tr / _)"
done
for variant in scratch flip_id flip_plm flip; do
    [[ -f $RUN_DIR/$variant/metrics.json ]] && cp "$RUN_DIR/$variant/metrics.json" "$out/${variant}_metrics.json"
    [[ -f $RUN_DIR/$variant/train.log ]] && cp "$RUN_DIR/$variant/train.log" "$out/${variant}_train.log"
done
if [[ $status == 124 ]]; then
    echo "step stopped at its ${step_seconds}s limit; call again to go on"
elif [[ $status != 0 ]]; then
    echo "failed with status $status (see $out/train.log)"; exit "$status"
else
    echo "done: $out/results.md"
fi
