#!/usr/bin/env bash
# The GPU checks of the open work, in one run of about 5 minutes on one H200 (GPU time is short:
# prepare once, run once). Writes everything to ${1:-gpu_check}/log.txt as it goes, so a run cut
# off still leaves the rows measured so far. Needs tipslab importable and a CUDA device.
#   bash bench/gpu_check.sh OUT_DIR
set -u
out=${1:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
{
  date
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "=== extraction: the CUDA plan's order and vectors (tests/test_extract_pipeline.py -k gpu)"
  timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_extract_pipeline.py -k gpu
  echo "=== crops on the device: roi_align on CUDA against the CPU's, auto on for a CUDA trainer"
  timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_device_crops.py -k gpu
  echo "=== JPEGs decoded on the device: nvJPEG against the CPU's libjpeg-turbo (tests/test_decode_on_device.py -k gpu)"
  timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_decode_on_device.py -k gpu
  echo "=== the loader's worker against decode, the device's part timed on the GPU (docs/SCALE.md, target 0.8)"
  timeout 120 $py bench/bench_data.py --images 192 --size 800x600,400x300,600x800 --device cuda
  echo "=== extraction against the bare bf16 forward (docs/SCALE.md, target 0.9)"
  timeout 240 $py bench/bench_extract.py --size b --image-size 224 --images 1024 --jpeg-size 448 --repeats 2 --tmp "$out"
  echo "=== the recipe's step against contrastive only (docs/RECIPE.md)"
  timeout 240 $py bench/bench_train_step.py --recipes --device cuda --size b --img 224 --batch 128 --steps 10 \
    --rounds 1 --only "contrastive only" "full recipe, head EMA" "full, head EMA + act. ckpt"
  date
} 2>&1 | tee "$out/log.txt"
