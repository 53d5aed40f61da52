#!/usr/bin/env bash
# The accelerator check of issue 13 in one command, inside a fixed time, every result kept.
#
#   benchmarks/device_check.sh            # on the GPU machine, from the repository root
#   benchmarks/device_check.sh --quick    # the same pipeline on a CPU: generated data, tiny widths
#
# Steps: install the carried wheels (.whl/*.whl, for what the machine lacks: clu, ml-collections),
# check that the library imports without TensorFlow, decode the CIFAR-10 JPEG copy
# (data/cifar10_jpeg.npz) into the arrays --config.npz_path reads, then the stages:
#   twin   the library and its PyTorch twin on the product recipe at batch 512, lr 0.4, warm-up 2,
#          bf16 (issue 13's settings), TWIN_EPOCHS epochs            (benchmarks/twin_compare.py)
#   causes the same recipe, CAUSES_EPOCHS epochs, changing one suspect of issue 22 at a time over
#          CAUSES_SEEDS seeds, then the best combination at CAUSES_LONG_EPOCHS
#          (benchmarks/causes.py: table causes/causes.md, rewritten as each run ends)
#   fast   configs/cifar10_fast.py through benchmarks/time_to_accuracy.py
#   bench  JAX vs PyTorch step speed at batch 512 bf16                (benchmarks/benchmark.py)
# Everything lands under $OUT (default ./device_out) as soon as it exists: each stage's log as it
# runs, its tables when it ends (twin: after each side; causes: after each run). Runs and
# checkpoints stay in $WORK, with the JAX compilation cache that the stages share. The stages run
# in order, most informative first, each under `timeout` with its planned seconds or what is left
# of DEADLINE_S if less (under 20 s left: skipped); the twin's PyTorch side, the causes and the
# benchmark stop gracefully inside their budgets and report how far they got.
#
# Settings (environment): OUT, WORK, STAGES ("twin causes fast bench"), DEADLINE_S (480),
# TWIN_EPOCHS (30), TWIN_S (190), CAUSES_S (290), CAUSES_EPOCHS (30), CAUSES_SEEDS (2),
# CAUSES_LONG_EPOCHS (100), CAUSES_VARIANTS (all of benchmarks/causes.py), FAST_S (120), BENCH_S
# (95), TORCH_COMPILE (0: eager twin), TORCH_INIT (config: the twin draws its first weights as the
# config's model.kernel_init; torch / flax force PyTorch's or Flax's defaults), BENCH_ARGS,
# TWIN_ARGS / CAUSES_ARGS / FAST_ARGS (extra --config overrides), NPZ (data/cifar10_jpeg.npz),
# HIDE_TENSORFLOW (1 with --quick: a stub package makes `import tensorflow` fail in every stage, as
# on the GPU).
set -uo pipefail  # no -e: a failed stage must not cost the stages after it
cd "$(dirname "$0")/.."

QUICK=0
if [[ "${1:-}" == "--quick" ]]; then QUICK=1; shift; fi
if [[ $# -gt 0 ]]; then echo "usage: $0 [--quick]  (settings via environment, see the header)" >&2; exit 2; fi

OUT=${OUT:-./device_out}
WORK=${WORK:-$(mktemp -d /tmp/device_check.XXXXXX)}
STAGES=${STAGES:-twin causes fast bench}
TORCH_COMPILE=${TORCH_COMPILE:-0}
TORCH_INIT=${TORCH_INIT:-config}
CAUSES_VARIANTS=${CAUSES_VARIANTS:-}
NPZ=${NPZ:-data/cifar10_jpeg.npz}
if [[ $QUICK == 1 ]]; then
  # Generated images, width 8 (16 for the benchmark's r=16), fp32 (bf16 convolutions are slow on
  # CPUs), one or two epochs: the same code paths in minutes.
  DEADLINE_S=${DEADLINE_S:-1100} TWIN_S=${TWIN_S:-400} FAST_S=${FAST_S:-250} BENCH_S=${BENCH_S:-250}
  CAUSES_S=${CAUSES_S:-200}
  TWIN_EPOCHS=${TWIN_EPOCHS:-2}
  # 64 generated training images (32 of them for validation) and 32 test images at batch 32: one
  # step per epoch and one evaluation batch per split. Every stage's time goes to start-up,
  # compilation and reporting, which more images would not exercise any further.
  SYNTHESIZE_ARGS="--num_train=64 --num_test=32"
  SMALL="--config.model.num_filters=8 --config.model.se_reduction=4 --config.half_precision=False
         --config.validation_size=32 --config.batch_size=32 --config.eval_batch_size=32
         --config.measure_inference=False --config.log_every_steps=1"
  TWIN_ARGS="$SMALL ${TWIN_ARGS:-}"
  # The causes at the twin's size, so that they reuse the twin's compiled programs: one seed, one
  # step, the baseline and a variant of the first weights (every variant's config and the
  # longest combination's are still checked; tests/test_device_check.py runs the combination's
  # path with stand-in runs). Each run here costs ~8 s of tracing, evaluation and reporting, and
  # torch_init ~5 s more to compile its initialisation.
  CAUSES_EPOCHS=${CAUSES_EPOCHS:-$TWIN_EPOCHS} CAUSES_SEEDS=${CAUSES_SEEDS:-1}
  CAUSES_LONG_EPOCHS=${CAUSES_LONG_EPOCHS:-0}
  CAUSES_VARIANTS=${CAUSES_VARIANTS:-baseline,torch_init}
  CAUSES_ARGS="$SMALL --config.max_steps=1 ${CAUSES_ARGS:-}"
  FAST_ARGS="$SMALL --config.num_epochs=1 --config.warmup_epochs=0.5 ${FAST_ARGS:-}"
  BENCH_ARGS=${BENCH_ARGS:---quick --num_filters=16 --batch_sizes=16 --notorch_compile --nocompare_xla_defaults}
  export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  HIDE_TENSORFLOW=${HIDE_TENSORFLOW:-1}  # run every stage as on the GPU image: no TensorFlow
  # Compilation is most of the rehearsal and each program runs a few steps: without LLVM's
  # optimisation a train step compiles in about half the time and runs 2-3x slower, a net gain of
  # several seconds per distinct program. Every program goes into the cache (JAX keeps only those
  # that took over a second), so that the later stages load the small ones too.
  export XLA_FLAGS="--xla_backend_optimization_level=0${XLA_FLAGS:+ $XLA_FLAGS}"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
else
  DEADLINE_S=${DEADLINE_S:-480} TWIN_S=${TWIN_S:-190} FAST_S=${FAST_S:-120} BENCH_S=${BENCH_S:-95}
  CAUSES_S=${CAUSES_S:-290}
  TWIN_EPOCHS=${TWIN_EPOCHS:-30}
  TWIN_ARGS="--config.batch_size=512 ${TWIN_ARGS:-}"
  CAUSES_EPOCHS=${CAUSES_EPOCHS:-30} CAUSES_SEEDS=${CAUSES_SEEDS:-2}
  CAUSES_LONG_EPOCHS=${CAUSES_LONG_EPOCHS:-100}
  CAUSES_ARGS="--config.batch_size=512 ${CAUSES_ARGS:-}"
  FAST_ARGS=${FAST_ARGS:-}
  BENCH_ARGS=${BENCH_ARGS:---batch_sizes=512 --dtypes=bf16 --rounds=3 --min_round_s=1 --notorch_compile}
fi

mkdir -p "$OUT" "$WORK"
# Same programs in the stages compile once, into a cache of this run (the twin's library step is
# the causes' baseline step).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache}
if [[ ${HIDE_TENSORFLOW:-0} == 1 ]]; then
  mkdir -p "$WORK/no_tensorflow/tensorflow"
  echo "raise ImportError('TensorFlow is hidden by device_check.sh (HIDE_TENSORFLOW=1)')" \
    > "$WORK/no_tensorflow/tensorflow/__init__.py"
  export PYTHONPATH=$WORK/no_tensorflow${PYTHONPATH:+:$PYTHONPATH}
fi
START=$SECONDS
LOG="$OUT/device_check.log"
log() { echo "[device_check +$((SECONDS - START))s] $*" | tee -a "$LOG"; }
remaining() { echo $((DEADLINE_S - (SECONDS - START))); }

if compgen -G ".whl/*.whl" > /dev/null; then
  log "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 || log "wheel install FAILED (see the log)"
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  quick: $QUICK  stages: $STAGES"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 - <<'EOF'
import importlib, os, platform, sys
print('python', platform.python_version(), 'cores', len(os.sched_getaffinity(0)))
for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'clu', 'ml_collections', 'torch'):
  try:
    print(name, getattr(importlib.import_module(name), '__version__', '?'))
  except Exception as e:  # noqa: BLE001
    print(name, 'MISSING', type(e).__name__, e)
import jax
print('devices', jax.devices())
EOF
} > "$OUT/environment.txt" 2>&1
log "environment: $(tr '\n' ';' < "$OUT/environment.txt" | cut -c1-400)"

# The library, trained end to end, must not need TensorFlow (the GPU image has none).
python3 - > "$OUT/no_tensorflow.txt" 2>&1 <<'EOF'
import sys
sys.modules['tensorflow'] = None  # any import of it now fails, as where it is not installed
from se_resnet_jax import main, train, writers  # noqa: F401
print('library imports without TensorFlow; writer:', type(writers.create_writer('/tmp')).__name__)
EOF
log "no-TensorFlow import check: $(tail -n 1 "$OUT/no_tensorflow.txt")"

DATA=$WORK/cifar10.npz
if [[ $QUICK == 1 ]]; then
  python3 benchmarks/cifar_jpeg.py synthesize "$WORK/fake_cifar10_jpeg.npz" $SYNTHESIZE_ARGS \
    >> "$LOG" 2>&1
  NPZ=$WORK/fake_cifar10_jpeg.npz
fi
log "decoding $NPZ"
if ! python3 benchmarks/cifar_jpeg.py decode "$NPZ" "$DATA" >> "$LOG" 2>&1; then
  log "decoding FAILED: nothing to train on"; exit 1
fi
log "decoded into $DATA ($(du -h "$DATA" | cut -f1))"

# stage NAME SECONDS FUNCTION: runs under `timeout` with min(SECONDS, time left), its output in
# $OUT/NAME.log as it is written. Earlier stages come first: a later one gets what they left.
stage() {
  local name=$1 planned=$2; shift 2  # $1 is now the function to run
  local limit
  limit=$(remaining)
  if (( limit > planned )); then limit=$planned; fi
  if (( limit < 20 )); then log "$name: SKIPPED (only ${limit}s left)"; return; fi
  log "$name: start (limit ${limit}s)"
  local t0=$SECONDS
  STAGE_LIMIT=$limit timeout -k 10 "$limit" bash -c "$1" > "$OUT/$name.log" 2>&1
  local rc=$?
  log "$name: rc=$rc after $((SECONDS - t0))s$([[ $rc == 124 ]] && echo ' (TIMED OUT)')"
}

run_twin() {
  # PyTorch's training budget is what the library leaves of the stage, less start-up margins.
  python3 benchmarks/twin_compare.py --config=configs/cifar10.py --config.npz_path="$DATA" \
    --config.num_epochs="$TWIN_EPOCHS" --config.learning_rate=0.4 --config.warmup_epochs=2 \
    --config.half_precision=True $TWIN_ARGS \
    --out_dir="$OUT/twin" --runs_dir="$WORK/twin" --time_budget_s=$((STAGE_LIMIT - 15)) \
    --torch_compile="$([[ $TORCH_COMPILE == 1 ]] && echo True || echo False)" \
    --torch_init="$TORCH_INIT"
}

run_causes() {
  # The twin's recipe (the same flags, so the baseline's programs come from the shared cache).
  python3 benchmarks/causes.py --config=configs/cifar10.py --config.npz_path="$DATA" \
    --config.num_epochs="$CAUSES_EPOCHS" --config.learning_rate=0.4 --config.warmup_epochs=2 \
    --config.half_precision=True $CAUSES_ARGS \
    --seeds="$CAUSES_SEEDS" --long_epochs="$CAUSES_LONG_EPOCHS" \
    ${CAUSES_VARIANTS:+--variants=$CAUSES_VARIANTS} \
    $([[ $QUICK == 1 ]] && echo --warmup_epochs_variant=1) \
    --out_dir="$OUT/causes" --runs_dir="$WORK/causes" --time_budget_s=$((STAGE_LIMIT - 10))
}

run_fast() {
  python3 benchmarks/time_to_accuracy.py --config=configs/cifar10_fast.py \
    --config.npz_path="$DATA" $FAST_ARGS --workdir="$WORK/fast" --out_dir="$OUT/fast"
  local rc=$?
  cp "$WORK"/fast/report.{json,md} "$WORK"/fast/*.png "$OUT/fast/" 2> /dev/null
  return $rc
}

run_bench() {
  mkdir -p "$OUT/bench"
  python3 benchmarks/benchmark.py $BENCH_ARGS --time_budget_s=$((STAGE_LIMIT * 2 / 3)) \
    --jsonl_out="$OUT/bench/benchmark.jsonl" --json_out="$OUT/bench/benchmark.json"
}

export -f run_twin run_causes run_fast run_bench
export OUT WORK DATA QUICK TWIN_EPOCHS TWIN_ARGS FAST_ARGS BENCH_ARGS TORCH_COMPILE TORCH_INIT
export CAUSES_EPOCHS CAUSES_SEEDS CAUSES_LONG_EPOCHS CAUSES_VARIANTS CAUSES_ARGS
for s in $STAGES; do
  case $s in
    twin) stage twin "$TWIN_S" run_twin ;;
    causes) stage causes "$CAUSES_S" run_causes ;;
    fast) stage fast "$FAST_S" run_fast ;;
    bench) stage bench "$BENCH_S" run_bench ;;
    *) log "unknown stage $s (known: twin causes fast bench)" ;;
  esac
done

{
  echo "# Device check ($(date -u +%Y-%m-%d), quick=$QUICK)"
  echo
  cat "$OUT/environment.txt"
  for f in twin/twin.md causes/causes.md fast/time_to_accuracy.md; do
    echo; echo "## $f"; echo; cat "$OUT/$f" 2> /dev/null || echo "(missing: see the stage log)"
  done
  echo; echo "## benchmark"; echo
  sed -n '/^Device:/,$p' "$OUT/bench.log" 2> /dev/null | tail -n 40 || echo "(missing)"
} > "$OUT/summary.md"
log "done in $((SECONDS - START))s; summary in $OUT/summary.md"
