#!/usr/bin/env bash
# Every GPU test and benchmark of this project in one call, for a lent one-GPU machine, run from
# the repository root (figures go to bench/RESULTS.md by hand):
#
#   bash bench/cuda_run.sh [OUT_DIR]                 # every part: at most about 28 minutes on one H100/H200
#   PARTS="bissl_resnet50 augment_jpeg" bash bench/cuda_run.sh OUT_DIR    # only these parts
#   PARTS="solvers_precision finetune_throughput finetune_loader compile_ratio" bash bench/cuda_run.sh OUT_DIR
#                                                    # issue 20's figures (their time limits add up to 16.5 min)
#
# It uses .venv/bin/python when there is one (make setup), else python3 (PY=... picks another);
# a python without the editable install finds the package through PYTHONPATH, set below.
#
# FashionMNIST comes from data/FashionMNIST/raw, or from gzipped copies in .gpu_data/ (what
# travels to a machine that cannot download). Each part has its own time limit and a failure
# does not stop the others; every part's full log lands in OUT_DIR.
set -u
OUT_DIR=${1:-${OUT:-/tmp/cuda_out}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled WANDB_SILENT=true
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT_DIR/summary.log"
WORK=$(mktemp -d /tmp/bissl-cuda-XXXX)

PARTS=${PARTS:-all}
part() {  # part NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    [[ $PARTS == all || " $PARTS " == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit} s) start $(date +%T)" | tee -a "$SUMMARY"
    local start=$SECONDS
    timeout --kill-after 10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$OUT_DIR/$name.log" >> "$SUMMARY"
    echo "=== $name rc $rc after $((SECONDS - start)) s" | tee -a "$SUMMARY"
}

mkdir -p data/FashionMNIST/raw
for f in .gpu_data/*.gz; do
    [ -e "$f" ] || continue
    target="data/FashionMNIST/raw/$(basename "$f" .gz)"
    [ -e "$target" ] || gunzip -c "$f" > "$target"
done

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nproc
    $PY -c "import torch, torchvision, PIL, numpy; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'PIL', PIL.__version__, 'numpy', numpy.__version__)"
} 2>&1 | tee -a "$SUMMARY"

# 1. The GPU tests (marker gpu: tests/test_cuda.py's GPU-vs-CPU HVPs and solves, bf16, channels_last,
#    pinned loader; skipped on a machine without CUDA).
part gpu_tests 120 $PY -m pytest -q -rs -m gpu tests
# 2. The three scripts end to end on CUDA under torchrun (nccl, bf16 autocast): the demo, 2 seeds.
part demo_cuda 150 $PY demo.py --device cuda --nproc 1 --seeds 2 --out-dir "$WORK/demo"
# 3. The paper's pre-training setting per GPU (ResNet-50, 96 px, batch 256, bf16): bare step
#    (contiguous and channels_last) vs the whole script at several --num-workers.
part pretrain_throughput 140 $PY bench/bench_pretrain_throughput.py --device cuda --arch resnet50 --sizes 96 \
    --batch-size 256 --script-workers ${SCRIPT_WORKERS:-0 4 8 14} --repeats ${REPEATS:-1} --steps 10 --warmup 3 \
    --script-steps 24 --log-every 4 --json "$OUT_DIR/pretrain_throughput_cuda.json"
# 4. Loader cost of one ImageNet-style sample on this machine's CPU cores (cores per GPU): full-size
#    JPEGs (500 x 375) and JPEGs pre-resized to a 160 px side.
part augment_jpeg 50 bash -c "$PY bench/bench_augment.py --skip-lightly --sizes 96 --threads 1 --jpeg-side 500 --images 300 --repeats 3 \
        --json $OUT_DIR/augment_jpeg500.json &&
    $PY bench/bench_augment.py --skip-lightly --sizes 96 --threads 1 --jpeg-side 160 --images 300 --repeats 3 \
        --json $OUT_DIR/augment_jpeg160.json"
# 5. Implicit-gradient solvers and upper-step schemes at the paper's per-GPU scale (time, peak memory).
part solvers_resnet50 100 $PY bench/bench_solvers.py --device cuda --arch resnet50 --img-size 96 --hessian-batch 256 \
    --upper-batch 64 --pretrain-batch 256 --pretrain-steps 5 --max-iters 6 --num-rhs 1 --probe-iters 10 \
    --upper-steps 2 --json "$OUT_DIR/solvers_cuda.json"
# 6. bissl.py at the paper's per-GPU scale (ResNet-50, 96 px, pretext batch 256, downstream batch 64,
#    N_L 20, N_U 8, CG 5, --num-workers auto): seconds per alternation, images/s, data wait, peak memory.
part bissl_resnet50 150 bash -c "set -e
    $PY ssl_pre-training.py --pretext-type simclr --dset fashionmnist --data-dir data --arch resnet50 --img-size 96 \
        --batch-size 256 --epochs 1 --warmup-epochs 0 --max-train-samples 512 --device cuda --model-dir $WORK/m \
        --run-dir $WORK/pre --resume 0
    $PY -m torch.distributed.run --standalone --nproc-per-node 1 bissl.py --data-dir data --model-dir $WORK/m \
        --device cuda --d-dset fashionmnist --p-dset fashionmnist --arch resnet50 --img-size 96 --p-batch-size 256 \
        --d-batch-size 64 --epochs 3 --d-linear-warmup-epochs 1 --d-max-train-samples 2048 --max-train-samples 20480 \
        --max-eval-samples 1024 --run-dir $WORK/bissl --resume 0
    grep -h throughput/ $WORK/bissl/metrics.jsonl"
# 7. HVP precision (issue 20): per --hvp-precision, x's relative error against the same solve in float64 and its
#    true residual (at delta 10 and a positive definite delta), seconds per HVP and per upper step, at the
#    paper's per-GPU scale. fp32 = PyTorch's defaults (cuDNN convolutions in TF32), fp32-strict = IEEE.
part solvers_precision 240 $PY bench/bench_solvers.py --device cuda --arch resnet50 --img-size 96 --hessian-batch 256 \
    --upper-batch 64 --pretrain-batch 256 --pretrain-steps 5 --num-rhs 1 --probe-iters 10 --upper-steps 2 --match-k 5 \
    --precision-only --precisions ${PRECISIONS:-fp32,fp32-strict,tf32,bf16} --json "$OUT_DIR/solvers_precision_cuda.json"
# 8. Fine-tuning (issue 20): the bare ResNet-50 classifier step at 96 px, batch 256 (the GPU rate of the sweep's
#    cores-per-GPU estimate), and fine-tuning.py's share of it with and without the decode cache (500 px JPEGs).
part finetune_throughput 300 $PY bench/bench_finetune_throughput.py --device cuda --arch resnet50 --sizes 96 \
    --batch-size 256 --script-workers ${FT_WORKERS:-8} --images 2560 --epochs 3 --repeats 1 \
    --json "$OUT_DIR/finetune_throughput_cuda.json"
# 9. Loader cost per fine-tuning sample on one of this machine's cores, with and without the cache, and the
#    cores per GPU it implies (GPU_RATE: images/s from part 8's bare step; default the H200 estimate).
part finetune_loader 150 $PY bench/bench_finetune_loader.py --sizes 96 --jpeg-side 500 --images 300 --repeats 3 \
    --gpu-images-per-s ${GPU_RATE:-9400} --json "$OUT_DIR/finetune_loader.json"
# 10. --compile: the bare fine-tuning step (ResNet-50, 96 px, batch 256, bf16) compiled over eager.
part compile_ratio 300 $PY bench/bench_finetune_throughput.py --device cuda --arch resnet50 --sizes 96 \
    --batch-size 256 --steps 20 --repeats 2 --compile-ratio --json "$OUT_DIR/compile_ratio_cuda.json"
echo "done $(date +%T)" | tee -a "$SUMMARY"
