#!/usr/bin/env bash
# The GPU work of a session that is lent a GPU machine, prepared here so that its few minutes
# of device time go to the GPU. From the repository root:
#
#   benchmarks/gpu_session.sh prepare   # here, once, after make install: .whl (SimpleITK, PyWavelets for the GPU
#                                       # image's Python 3.12) and .gpu_data (real volumes that fit)
#   benchmarks/gpu_session.sh check     # there (about 2 min); carry .whl .gpu_data/check
#   TRAIN_SECONDS=S benchmarks/gpu_session.sh train   # there, the next call; carry .gpu_data/train .gpu_data/val
#
# check: the CUDA tests (bfloat16 autocast, recomputation, NCCL through torchrun, CUDA
# upsampling) and the training-step benchmarks on the GPU; the s/step at batch BATCH (128)
# stays on the machine and sizes train. FIT_ONE_BATCH=1 adds whether the paper config leaves
# the linear start (fit_one_batch.py, 100 steps in float32; under 30 s on an H200).
# train: a stage of ct_cpu.yaml, patches of LR_SLICES (15) LR slices (check times that step),
# on the GPU from the shipped weights (or from INIT_WEIGHTS, a
# file that travels: name it in carry), batch BATCH, Adam LR (1e-4) halved every quarter, as many
# steps as fit in S seconds (default 300, at most 500, 440 with MEASURE=1, so that the call ends
# within its 600 s; stopped 30 s after S whatever happens; a retry starts over); its
# weights and log come back under $OUT, then `cycleinr upsample` is timed on the GPU, with and
# without --flip-ensemble. A session has 15 minutes of device time, the machine's start
# included: check (about 2 min) then train with S = 420 used 9 of them; with MEASURE=0,
# FIT_ONE_BATCH=1 check took 97 s and train with S = 560 (3584 steps) 457 s, 10 min in all
# with the start and transfers (both 2026-11-26); with MEASURE=0 check took 53 s and then
# MEASURE=1 train with S = 540 (3568 steps and the upsampling timing) 506 s, 10 min in all,
# which left time for one more short call (a fresh start, about 35 s) (2026-11-27).
# A call carries at most 64 MiB: the wheels (57 MB) and the training volumes (51 MB) travel in
# separate calls; the installed wheels (.site) and the test volume stay on the warm machine,
# which is given back 30 s after a call, so issue train at once.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu PYTHON=.venv/bin/python: a dry run of the plumbing without a GPU
PYTHON=${PYTHON:-python3}  # the GPU image's, which holds PyTorch
BATCH=${BATCH:-128}
SEED=${SEED:-11}  # train's batches: a stage that follows another GPU stage draws other ones
LR=${LR:-1.0e-4}  # train's first learning rate, halved every quarter of its steps
LR_SLICES=${LR_SLICES:-15}  # LR slices a training patch holds: the light encoder's reach, 7 each way (README, the deep-patch stage)
MEASURE=${MEASURE:-1}  # 0: skip what README already holds (the step at other batches and of ct.yaml,
                       # train's upsampling timing), so that the minutes go to the tests and training
mkdir -p "$OUT"
SHARED=../shared/data/ct

prepare() {
    rm -rf .whl .gpu_data
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl simpleitk==2.5.7 PyWavelets==1.9.0
    mkdir -p .gpu_data/check/data/ct/train .gpu_data/train .gpu_data/val
    cp "$SHARED/train/vtk-fullhead_head_1.5mm.nii.gz" .gpu_data/check/data/ct/train/  # the tests' head CT
    # Central 256 x 256 crops of the chest CTs, every slice (the full volumes are 143 MB), the
    # head whole, and the validation crop that ranks runs as the README's table does.
    .venv/bin/python - <<'EOF'
import SimpleITK as sitk
from pathlib import Path
for path in sorted(Path("../shared/data/ct/train").glob("*chest*.nii.gz")):
    image = sitk.ReadImage(str(path))
    x, y = ((n - 256) // 2 for n in image.GetSize()[:2])
    sitk.WriteImage(image[x:x + 256, y:y + 256, :], f".gpu_data/train/{path.name}", True)
val = sitk.ReadImage("../shared/data/ct/val/lidc-0002_chest_1.25mm.nii.gz")
start = [(n - s) // 2 for n, s in zip(val.GetSize(), (192, 192, 64))]
sitk.WriteImage(val[start[0]:start[0] + 192, start[1]:start[1] + 192, start[2]:start[2] + 64],
                ".gpu_data/val/lidc-0002_crop64x192x192.nii.gz", True)
EOF
    cp "$SHARED/train/vtk-fullhead_head_1.5mm.nii.gz" .gpu_data/train/
    du -sh .whl .gpu_data/*
}

use_site() {
    export PYTHONPATH="$PWD/.site:$PWD" PYTHONUNBUFFERED=1
    [ -e ../shared ] || ln -s "$PWD/.gpu_data/check" ../shared  # where the tests look for real volumes
    "$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
}

check() {
    mkdir -p .site
    # The GPU image lacks SimpleITK and PyWavelets; a Python that has them (.venv here) keeps its own.
    "$PYTHON" -c "import SimpleITK, pywt" 2>/dev/null ||
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
    use_site
    timeout 150 "$PYTHON" -m pytest -q -rs -p no:cacheprovider Testing/test_model.py Testing/test_engine.py Testing/test_training.py \
        -k "cuda or bfloat16" 2>&1 | tee "$OUT/tests.log" || echo "CUDA tests FAILED (tests.log); the benchmarks follow"
    local batches=$BATCH
    # each size once (BATCH=32 would time it twice and give train two lines to read), smallest first
    [ "$MEASURE" = 1 ] && batches=$(printf '%s\n' 32 "$BATCH" 512 | sort -nu | tr '\n' ' ')
    # A run that fails or times out (batch 512 out of memory) is said so and the others go on.
    for batch in $batches; do
        timeout 90 "$PYTHON" benchmarks/train_step_bench.py --config Training/configs/ct_cpu.yaml --steps 30 run.device=$DEVICE \
            data.batch_size=$batch data.lr_slices="$LR_SLICES" data.train=.gpu_data/check/data/ct/train data.workers=0 \
            || echo "train_step_bench at batch $batch did not finish (time limit or error)"
    done 2>&1 | tee "$OUT/train_step_bench.md"
    # The mean s/step at batch BATCH, for train: the fourth column of its table row (none: train guesses).
    grep -F "data.batch_size=$BATCH data.lr_slices=$LR_SLICES " "$OUT/train_step_bench.md" | head -n 1 | awk -F'|' '{gsub(/ /, "", $5); print $5}' \
        > .site/step_seconds || true
    if [ "$MEASURE" = 1 ]; then
        for recompute in 0 4; do
            timeout 90 "$PYTHON" benchmarks/train_step_bench.py --config Training/configs/ct.yaml --steps 5 run.device=$DEVICE \
                data.train=.gpu_data/check/data/ct/train data.workers=0 run.recompute_slices=$recompute \
                || echo "train_step_bench of ct.yaml (recompute $recompute) did not finish (time limit or error)"
        done 2>&1 | tee -a "$OUT/train_step_bench.md"
    fi
    if [ "${FIT_ONE_BATCH:-0}" = 1 ]; then  # Does the paper's setup (L1, full HU window, ReLU) leave the linear start?
        timeout 120 "$PYTHON" Training/fit_one_batch.py --config Training/configs/ct.yaml --steps 100 run.device=$DEVICE \
            data.train=.gpu_data/check/data/ct/train 2>&1 | tee "$OUT/fit_one_batch_paper.log" || echo "fit_one_batch did not finish (fit_one_batch_paper.log)"
    fi
}

train() {
    use_site
    # Steps from check's s/step; the loader, validation and checkpoints add about a quarter.
    local seconds=${TRAIN_SECONDS:-300} step_seconds steps longest
    # A command ends at 600 s and then returns nothing: training (stopped 30 s past S at worst),
    # start-up, export and the timing must end before that.
    longest=$(( MEASURE == 1 ? 440 : 500 ))
    if [ "$seconds" -gt "$longest" ]; then
        echo "TRAIN_SECONDS=$seconds would run past the 600 s a command has: training $longest s" | tee "$OUT/train.log"
        seconds=$longest
    fi
    rm -rf runs/gpu_stage  # a retry on the warm machine starts over, not from the try it replaces
    step_seconds=$(cat .site/step_seconds 2>/dev/null || true)
    step_seconds=${step_seconds:-0.1}  # check did not measure it: a guess on the slow side
    steps=$("$PYTHON" -c "print(max(8, int($seconds / ($step_seconds * 1.25)) // 8 * 8))")
    echo "training $steps steps at batch $BATCH ($step_seconds s/step in check)" | tee -a "$OUT/train.log"
    timeout --signal=INT $((seconds + 30)) "$PYTHON" Training/train.py --config Training/configs/ct_cpu.yaml \
        run.device=$DEVICE run.threads=0 run.out_dir=runs/gpu_stage data.train=.gpu_data/train data.val=.gpu_data/val \
        run.val_crop=null data.batch_size="$BATCH" data.lr_slices="$LR_SLICES" data.workers=12 run.init_weights="${INIT_WEIGHTS:-CycleINRLib/weights/cycleinr_ct.safetensors}" \
        optim.seed="$SEED" optim.steps="$steps" optim.lr="$LR" optim.lr_halve_every=$((steps / 4)) run.val_every=$steps \
        run.checkpoint_every=$((steps / 8)) run.keep_checkpoints=2 run.log_every=50 2>&1 | tr '\r' '\n' | tail -40 >> "$OUT/train.log" \
        || echo "training stopped early (time limit or error): exporting its last checkpoint" | tee -a "$OUT/train.log"
    local last
    last=$(ls runs/gpu_stage/step-*.json | sort -V | tail -1)
    cp "$last" "$OUT/gpu_stage_last_step.json"
    local gpu note
    gpu=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')")
    note="run by benchmarks/gpu_session.sh train (SEED=$SEED LR=$LR LR_SLICES=$LR_SLICES MEASURE=$MEASURE TRAIN_SECONDS=$seconds) on a lent $gpu:"
    note+=" the three chest CTs of $SHARED/train as their central 256 x 256 in-plane crops, every slice, the head CT whole;"
    note+=" .gpu_data/val is the centred 64 x 192 x 192 crop of $SHARED/val/lidc-0002_chest_1.25mm.nii.gz"
    "$PYTHON" Training/export_weights.py "$last" --output "$OUT/gpu_stage.safetensors" --data-note "$note"
    [ "$MEASURE" = 1 ] || return 0
    timeout 60 "$PYTHON" benchmarks/upsample_bench.py --source .gpu_data/train/lidc-0314_chest_1.0mm.nii.gz \
        --factors ${FACTORS:-2 2.5 5} --devices $DEVICE --flip-ensemble 2>&1 | tee "$OUT/upsample_bench.md"
}

case "${1:-}" in
    prepare | check | train) "$1" ;;
    *) echo "usage: $0 prepare|check|train" >&2; exit 2 ;;
esac
