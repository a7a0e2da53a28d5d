#!/usr/bin/env bash
# The GPU check, prepared to fit a device lease (15 minutes in all, the machine's start included): run it as one
# `device` call, `bash bench/gpu_check.sh` with carry [".gpu"] and timeout_s 570, after `make gpu-kit` here.
# Stages, in order of what we most need to know; name some to rerun only those: bash bench/gpu_check.sh serve
#   tests  the tests of what runs another way on CUDA (LORAFORGE_TEST_DEVICE=cuda): fused nodes, autocast, QLoRA ≤2 min
#   train  bench_train.py, whole processes: training only (with and without checkpointing), PEFT+TRL with TRL's
#          defaults and matched; 60 steps x batch 16, medians of 3                                             ≤4 min
#   micro  the LoRA step against its bound (frozen forward + backward), bf16                                   ≤1 min
#   serve  16 adapters in mixed batches vs one merged model vs PEFT                                            ≤1 min
#   job    (only when named: a second call) the default job, comparison and report included, vs TRL's defaults ≤3 min
# Everything runs on SmolLM2-135M's config and tokenizer with seeded random weights (bench/gpu_kit.py says why).
# Results land in $OUT (the device tool brings them back); the last lines printed are the tables.
# The suite only checks that this script parses (tests/test_bench_scripts.py); to run it end to end here, on the
# CPU with the lock's packages: DEVICE=cpu PYTHON=.venv/bin/python STEPS=2 RUNS=1 REPEATS=1 \
#   SERVE_ARGS="--adapters 2 --requests 4 --max-tokens 4 --skip-peft" bash bench/gpu_check.sh train micro serve
set -u -o pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-60}
RUNS=${RUNS:-3}
REPEATS=${REPEATS:-20}
SERVE_ARGS=${SERVE_ARGS:-}
OUT=${OUT:-/tmp/gpu_check_out}
STAGES=${*:-tests train micro serve}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # loraforge from this checkout
if [ -d .gpu/wheels ] && [ "$DEVICE" = cuda ]; then  # the lock's versions over the image's; its CUDA torch stays
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
$PYTHON - <<'EOF' || exit 1
import importlib
import torch
versions = {name: importlib.import_module(name).__version__ for name in
            ("torch", "transformers", "peft", "trl", "pydantic", "tokenizers", "loraforge")}
print(" ".join(f"{name} {version}" for name, version in versions.items()),
      "| cuda:", torch.cuda.is_available() and torch.cuda.get_device_name())
EOF

MODEL=/tmp/smollm2-random  # the same random weights for every stage and every row
[ -f $MODEL/model.safetensors ] || $PYTHON -c "
import sys; sys.path.insert(0, 'bench')
from bench_train import materialize
materialize('.gpu/model', '$MODEL')" || exit 1

# The tests whose code takes another path on CUDA (kernels, autocast, storage dtypes, quantization, serving).
GPU_TESTS="tests/test_lora_core.py tests/test_fused.py tests/test_attention.py tests/test_packing_and_loss.py
  tests/test_quant.py tests/test_variants.py tests/test_loha_lokr.py tests/test_adalora.py tests/test_mixed_batch.py
  tests/test_train.py tests/test_serve_engine.py tests/test_peft_interop.py tests/test_hardware.py"
status=0
run() {  # run STAGE SECONDS COMMAND...: the stage's output to $OUT/STAGE.log, its table to the end of ours
  local stage=$1 seconds=$2; shift 2
  echo "== $stage (at most ${seconds}s): $*"
  local started=$SECONDS
  timeout "$seconds" "$@" > "$OUT/$stage.log" 2>&1
  local code=$?
  echo "   exit $code after $((SECONDS - started)) s"
  [ $code -ne 0 ] && status=1 && tail -n 25 "$OUT/$stage.log"
  return 0
}
for stage in $STAGES; do
  case $stage in
    tests) run tests 120 env LORAFORGE_TEST_DEVICE=$DEVICE $PYTHON -m pytest -q --maxfail=10 -p no:cacheprovider \
             -m "not slow and not interop" $GPU_TESTS ;;
    train) run train 240 $PYTHON bench/bench_train.py --model $MODEL --device $DEVICE --steps $STEPS --batch 16 \
             --runs $RUNS --rows loraforge_train,loraforge_train_checkpointing,peft_trl_defaults,peft_trl_matched \
             --json "$OUT/train.json" ;;
    job) run job 180 $PYTHON bench/bench_train.py --model $MODEL --device $DEVICE --steps $STEPS --batch 16 \
             --runs $RUNS --rows loraforge,loraforge_again,peft_trl_defaults --json "$OUT/job.json" ;;
    micro) run micro 60 $PYTHON bench/bench_train.py --micro --model $MODEL --device $DEVICE --precision bf16 \
             --runs $RUNS --batch 16 --repeats $REPEATS --json "$OUT/micro.json" ;;
    serve) run serve 75 $PYTHON bench/bench_serve.py --model $MODEL --device $DEVICE --runs $RUNS \
             --output "$OUT/serve.json" $SERVE_ARGS ;;
    *) echo "unknown stage $stage (tests, train, micro, serve, job)"; exit 2 ;;
  esac
done
for stage in $STAGES; do  # the tables last: the device tool returns the end of the output
  echo "== $stage"
  case $stage in
    tests) tail -n 3 "$OUT/tests.log" ;;
    *) grep -E '^\||tok/s|=' "$OUT/$stage.log" | grep -v '^  run' | tail -n 14 ;;
  esac
done
exit $status
