#!/usr/bin/env bash
# Every CUDA check and GPU benchmark, prepared to run on a lent GPU in two short parts:
#   A: CUDA self-test (engine with and without CUDA graphs against the CPU; the pipeline with
#      bf16, channels-last, the image cache) and the COCO-sized fit-linear sweep;
#   B: extraction throughput (ResNet-50 at 448, nvJPEG vs PIL vs the model-only ceiling) and
#      fine-tuning throughput (fp32 vs bf16 + channels-last, JPEG decode vs cached pixels).
# Usage: OUT=/some/dir benchmarks/gpu_check.sh A|B|all   (runs from a checkout; installs nothing)
set -u
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/spl-gpu-out}
mkdir -p "$OUT"
part=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
if [ "$part" = F ]; then  # the fit-linear sweep alone
    timeout 150 python benchmarks/bench_fit_linear.py --parts d --device cuda \
        --out "$OUT/fit_linear.md" 2>&1 | tee "$OUT/fit_linear.log"
fi
if [ "$part" = A ] || [ "$part" = all ]; then
    timeout 150 python benchmarks/gpu_selftest.py 2>&1 | tee "$OUT/selftest.log"
    timeout 150 python benchmarks/bench_fit_linear.py --parts d --device cuda \
        --out "$OUT/fit_linear.md" 2>&1 | tee "$OUT/fit_linear.log"
fi
if [ "$part" = B ] || [ "$part" = all ]; then
    cp benchmarks/results/extract.md "$OUT/extract.md"
    timeout 150 python benchmarks/bench_extract.py --device cuda --synthetic 2000 --image-sizes 448 \
        --backbone resnet50 --pretrained false --results "$OUT/extract.md" 2>&1 | tee "$OUT/extract.log"
    timeout 120 python benchmarks/bench_finetune.py --device cuda --images 512 --steps 20 \
        --out "$OUT/finetune.md" 2>&1 | tee "$OUT/finetune.log"
fi
