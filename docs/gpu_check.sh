#!/usr/bin/env bash
# The GPU measurements of docs/results.md in one run, from the repository root:
#   1. the tests marked `gpu` (CUDA-only paths, no host synchronisation in the step);
#   2. the peers table of "Step time against other libraries" on the GPU;
#   3. many small matrices: kronopt's stacked buckets against the peers' per-parameter loops;
#   4. the width scaling of soap against its matrix work alone.
#
#   bash docs/gpu_check.sh [OUTDIR]          (default: $OUT, else ./gpu-results)
#
# It runs from the checkout (PYTHONPATH), so nothing needs installing beyond torch, attrs,
# einops and pytest. The peers are optional: put pytorch_optimizer and heavyball (the `peers`
# extra) and the folder holding nikhilvyas/SOAP's soap.py on PYTHONPATH; a missing one is
# reported as not installed. Smaller runs: D, LAYERS, STEPS, WARMUP, WIDTHS, SMALL (count of
# each small shape) and DEVICE (default cuda; cpu only checks the script).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
d=${D:-1024} layers=${LAYERS:-4} steps=${STEPS:-30} warmup=${WARMUP:-10}
widths=${WIDTHS:-256,512,1024,2048} small=${SMALL:-64}

$py - <<EOF 2>&1 | tee "$out/device.txt" || exit 1
import torch
print("torch", torch.__version__)
if "$device" == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory >> 30, "GiB")
EOF

if [ "$device" = cuda ]; then
    $py -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/gpu_tests.txt"
fi

bench="$py -m kronopt.app bench --device $device --steps $steps --warmup $warmup"
$bench torch.AdamW adamw torch.Muon muon soap:SOAP pytorch_optimizer.SOAP soap dykaf \
    heavyball.KLShampoo kl_shampoo pro_kl_shampoo --d "$d" --layers "$layers" 2>&1 | tee "$out/peers.txt"

# 2·SMALL matrices of two small shapes: one stacked call per shape for kronopt, one per parameter for the peers
shapes=$($py -c "print(','.join(['128x128'] * $small + ['512x128'] * $small))")
$bench soap:SOAP pytorch_optimizer.SOAP heavyball.SOAP soap kl_shampoo muon torch.Muon --shapes "$shapes" 2>&1 \
    | tee "$out/small.txt"

$py -m kronopt.app bench soap --device "$device" --scaling "$widths" --steps 10 --warmup 2 2>&1 | tee "$out/scaling.txt"
