#!/usr/bin/env bash
# The GPU pass: every CUDA number of the docs (docs/speed.md) in one command, on one CUDA GPU, with no network.
#
#   bash gpu_pass.sh OUT       # writes OUT/gpu_pass.tar.gz (a few MB: no checkpoints) and prints a summary
#
# In order, most important first, each step given what is left of BUDGET seconds (default 510, so the
# whole pass ends inside 9 minutes) and stopped cleanly (SIGTERM: a run keeps its last epoch) at its limit:
#   1. the main job, python gan_conv.py --loss wgan-gp --epochs 50 (width 128): wall time, seconds per
#      epoch (metrics.csv), peak GPU memory (nvidia-smi, sampled), samples, progress.gif, losses.png;
#   2. evaluate.py on its checkpoint, with the floor and the noise rows;
#   3. bench.py on the GPU for the main job's step (conv, wgan-gp): fp32, --amp, each lever one at a time;
#   4. pytest, with the CUDA tests running;
#   5. the lessons' GPU training cells as they run them (lesson 1, section 6: 3 epochs at width 128; lesson 2,
#      section 3: the conditional DCGAN at width 32), each with its --max-minutes: their wall time;
#   6. bench.py for conv with bce, fc and convG-fcD;
#   7. the torch.compile rows (slow to compile) for the main job's step and fc.
# ONLY="pytest bench_fc" runs just the named steps (main, evaluate, bench_conv_wgan-gp, pytest, lesson_short,
# lesson2_cond, bench_conv_bce, bench_fc, bench_convG-fcD, bench_conv_wgan-gp_compile, bench_fc_compile), to
# finish a pass that ran out of time.
# Fashion-MNIST comes from ./data/FashionMNIST/raw, Debian's package, or the four *-ubyte.gz files in
# $FMNIST_GZ (default: data/gz), unpacked here.
#
# A dry run on a CPU (about 10 minutes on 2 cores), to check the pass itself:
#   DEVICE=cpu EPOCHS=2 WIDTH=8 TRAIN_IMAGES=2048 LESSON_EPOCHS=1 LESSON2_EPOCHS=1
#   BENCH="--steps 2 --rounds 1 --warmup 2 --width 8 --compile-backend aot_eager" PYTEST_ARGS="-k cuda"
#   GAN_TEST_GPU=cpu bash gpu_pass.sh /tmp/pass
set -uo pipefail
cd "$(dirname "$0")"
OUT=${1:?usage: bash gpu_pass.sh OUT}
BUDGET=${BUDGET:-510} DEVICE=${DEVICE:-cuda} EPOCHS=${EPOCHS:-50} WIDTH=${WIDTH:-128}
TRAIN_IMAGES=${TRAIN_IMAGES:-60000} BENCH=${BENCH:-} PYTEST_ARGS=${PYTEST_ARGS:-}
LESSON_EPOCHS=${LESSON_EPOCHS:-3} LESSON2_EPOCHS=${LESSON2_EPOCHS:-10}  # as the lessons' cells ask on a GPU
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
W=$(mktemp -d)  # the pass's files; only the small ones are packed into OUT
start=$(date +%s)

step() {  # step NAME CAP COMMAND...: at most CAP seconds, and never past BUDGET (20 s kept for packing)
    local name=$1 cap=$2 t0 rc limit
    shift 2
    [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]] && return  # ONLY="pytest bench_fc": just those steps
    limit=$(( BUDGET - ($(date +%s) - start) - 20 ))
    (( limit > cap )) && limit=$cap
    if (( limit < 15 )); then
        echo "$name: skipped, the budget is spent" | tee -a "$W/steps.txt"
        return
    fi
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$W/$name.txt" 2>&1
    rc=$?
    echo "$name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s): $*" | tee -a "$W/steps.txt"
}

{   # what ran where
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn',
torch.backends.cudnn.version(), 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    nproc
    git log -1 --oneline 2>/dev/null || true
} > "$W/env.txt" 2>&1
cat "$W/env.txt"

raw=data/FashionMNIST/raw
if [ ! -f "$raw/train-images-idx3-ubyte" ] && ls "${FMNIST_GZ:-data/gz}"/*-ubyte.gz > /dev/null 2>&1; then
    mkdir -p "$raw"
    for f in "${FMNIST_GZ:-data/gz}"/*-ubyte.gz; do gunzip -c "$f" > "$raw/$(basename "$f" .gz)"; done
fi

# 1. The main job, with GPU memory sampled every half second beside it.
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$W/main_gpu_memory_mib.txt" &
    sampler=$!
fi
step main 300 python gan_conv.py --loss wgan-gp --epochs "$EPOCHS" --width "$WIDTH" --device "$DEVICE" \
    --train-images "$TRAIN_IMAGES" --out "$W/main"
[ -n "${sampler:-}" ] && kill "$sampler" 2> /dev/null

# 2. Its scores, beside the floor and noise.
step evaluate 60 python evaluate.py --device "$DEVICE" --floor --results "$W/main/results.csv" "$W/main/checkpoint.pt"

# 3. Speed of the main job's step, 4. the tests with the CUDA ones (in parallel where pytest-xdist is
# installed), 5. speed of the other architectures, 6. torch.compile last: it compiles for a minute or more,
# so it runs alone, after everything else is safe (a step cut off at its limit prints nothing).
parallel=$(python -c "import xdist; print('-n 8')" 2> /dev/null || echo "-o addopts=")  # pytest.ini's -n needs xdist
quick="channels_last tf32 cudnn_benchmark"
# shellcheck disable=SC2086
{
    step bench_conv_wgan-gp 75 python bench.py --device "$DEVICE" --arch conv --loss wgan-gp --width "$WIDTH" \
        --levers $quick $BENCH
    step pytest 120 python -m pytest -q -rs -p no:cacheprovider $parallel $PYTEST_ARGS
    step lesson_short 75 python gan_conv.py --loss lsgan --epochs "$LESSON_EPOCHS" --width "$WIDTH" --max-minutes 5 \
        --sample-every 1 --device "$DEVICE" --train-images "$TRAIN_IMAGES" --out "$W/lesson_short"
    step lesson2_cond 75 python gan_conv.py --cond --loss wgan-gp --width 32 --epochs "$LESSON2_EPOCHS" \
        --max-minutes 5 --sample-every 1 --device "$DEVICE" --train-images "$TRAIN_IMAGES" --out "$W/lesson2_cond"
    step bench_conv_bce 60 python bench.py --device "$DEVICE" --arch conv --width "$WIDTH" --levers $quick $BENCH
    step bench_fc 45 python bench.py --device "$DEVICE" --arch fc --levers $quick $BENCH
    step bench_convG-fcD 40 python bench.py --device "$DEVICE" --arch convG-fcD --width "$WIDTH" --levers $BENCH
    step bench_conv_wgan-gp_compile 150 python bench.py --device "$DEVICE" --arch conv --loss wgan-gp --width "$WIDTH" \
        --levers compile $BENCH
    step bench_fc_compile 90 python bench.py --device "$DEVICE" --arch fc --levers compile $BENCH
}

# Pack the small files and print the summary (the last lines are what a remote run shows).
tar czf "$OUT/gpu_pass.tar.gz" -C "$W" --exclude='*.pt' --exclude='*.tmp' .
{
    echo "== steps"; cat "$W/steps.txt"
    echo "== main job: last epochs"; grep '^epoch' "$W/main.txt" 2> /dev/null | tail -3
    for f in lesson_short lesson2_cond; do echo "== $f: epochs"; grep '^epoch\|^stopped' "$W/$f.txt" 2> /dev/null; done
    [ -s "$W/main_gpu_memory_mib.txt" ] && echo "peak GPU memory used (nvidia-smi): $(sort -n "$W/main_gpu_memory_mib.txt" | tail -1) MiB"
    echo "== evaluate"; grep -A1 'checkpoint.pt\|floor\|noise' "$W/evaluate.txt" 2> /dev/null | grep -v '^--'
    for f in "$W"/bench_*.txt; do echo "== $(basename "$f" .txt)"; grep -v '^(' "$f" | tail -11; done
    echo "== pytest"; tail -3 "$W/pytest.txt" 2> /dev/null
    echo "== packed: $(du -h "$OUT/gpu_pass.tar.gz" | cut -f1) in $OUT/gpu_pass.tar.gz, $(( $(date +%s) - start )) s in all"
} | tee "$OUT/summary.txt"
rm -rf "$W"
