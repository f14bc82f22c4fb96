#!/usr/bin/env bash
# The GPU measurements of docs/results.md in one run, from the repository root:
#   1. the tests marked `gpu` (CUDA-only paths, no host synchronisation in the step);
#   2. the peers table of "Step time against other libraries" at d = D (default 1024), with the issue's
#      target ratios, and each kronopt step split by stage slot (`--stages`);
#   3. many small matrices: kronopt's stacked buckets against the peers' per-parameter loops (and the split);
#   4. the width scaling of soap, dykaf and kl_shampoo against their matrix work alone;
#   5. what `compile = true`, bfloat16 state storage, bfloat16 rotations (`rotation_dtype`) and factor products
#      (`[factors] product_dtype`) and Newton–Schulz on the Gram matrix (`ns_form = "gram"`, in bfloat16 and in
#      float16) buy (TOML copies of the presets);
#   6. the peers table again on the CPU table's own workload (d = D2, default 256);
#   7. what a bucket cap (`bucket_cap_mib`, docs/configs.md) saves in a step's memory and costs in time.
#
#   bash docs/gpu_check.sh [OUTDIR]          (default: $OUT, else ./gpu-results)
#
# It runs from the checkout (PYTHONPATH), so nothing needs installing beyond torch, attrs,
# einops and pytest (pytest-xdist and pytest-timeout where present). The peers are optional:
# put pytorch_optimizer and heavyball (the `peers` extra) and the folder holding
# nikhilvyas/SOAP's soap.py on PYTHONPATH (or name the folders in PEERS, ':'-separated); a missing
# one is reported as not installed. Each part writes its own file under OUTDIR (a bench part its record as JSON
# too, `--json`) and has a time box
# (seconds × TSCALE, default 1), so a lease that runs short still returns the parts before it: on an
# H200 the whole run is meant to fit in about nine minutes. Smaller runs: D, D2, LAYERS, STEPS, WARMUP,
# WIDTHS, SMALL (count of each small shape), CAP (MiB) and DEVICE (default cuda; cpu only checks the script, e.g.
# DEVICE=cpu D=32 D2=32 STEPS=2 WARMUP=1 WIDTHS=32,64 SMALL=2 bash docs/gpu_check.sh /tmp/gpu-dry).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out/cfg"
export PYTHONPATH="$PWD${PEERS:+:$PEERS}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
d=${D:-1024} d2=${D2:-256} layers=${LAYERS:-4} steps=${STEPS:-30} warmup=${WARMUP:-10}
widths=${WIDTHS:-256,512,1024,2048} small=${SMALL:-64} tscale=${TSCALE:-1}

# part NAME SECONDS COMMAND...: run COMMAND into $out/NAME.txt within its time box, its exit status last
part() {
    local name=$1 seconds=$(($2 * tscale))
    shift 2
    echo "== $name ($(date -u +%T), at most ${seconds} s)"
    timeout "$seconds" "$@" >"$out/$name.txt" 2>&1
    echo "exit status $?" >>"$out/$name.txt"
    tail -n 3 "$out/$name.txt"
}

part 0_device 60 $py -c "
import sys, torch
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)
if '$device' == 'cuda':
    assert torch.cuda.is_available(), 'no CUDA device'
    p = torch.cuda.get_device_properties(0)
    print(p.name, p.total_memory >> 30, 'GiB,', p.multi_processor_count, 'multiprocessors')
"
if [ "$device" = cuda ]; then
    workers=$($py -c "import xdist" 2>/dev/null && echo "-n 8")
    limit=$($py -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120")
    part 1_gpu_tests 150 $py -m pytest -q -p no:cacheprovider -m gpu tests $workers $limit --durations 15 -rfEs
fi

bench="$py -m kronopt.app bench --device $device --steps $steps"
ratios="--ratio adamw/torch.AdamW --ratio muon/torch.Muon --ratio soap/soap:SOAP
    --ratio soap/pytorch_optimizer.SOAP --ratio dykaf/soap --ratio kl_shampoo/heavyball.KLShampoo
    --ratio pro_kl_shampoo/kl_shampoo"
peers="torch.AdamW adamw torch.Muon muon soap:SOAP pytorch_optimizer.SOAP soap dykaf heavyball.KLShampoo
    kl_shampoo pro_kl_shampoo"
# shellcheck disable=SC2086  # the lists split on purpose
part 2_peers_d$d 110 $bench --warmup "$warmup" $peers --d "$d" --layers "$layers" --repeat 2 $ratios \
    --stages 10 --json "$out/2_peers_d$d.json"

# 2·SMALL matrices of two small shapes: one stacked call per shape for kronopt, one per parameter for the peers
shapes=$($py -c "print(','.join(['128x128'] * $small + ['512x128'] * $small))")
part 3_small 60 $bench --warmup "$warmup" soap:SOAP pytorch_optimizer.SOAP heavyball.SOAP soap \
    heavyball.KLShampoo kl_shampoo torch.Muon muon torch.AdamW adamw --shapes "$shapes" --repeat 2 \
    --ratio soap/soap:SOAP --ratio soap/pytorch_optimizer.SOAP --ratio soap/heavyball.SOAP \
    --ratio kl_shampoo/heavyball.KLShampoo --ratio muon/torch.Muon --ratio adamw/torch.AdamW --stages 10 \
    --json "$out/3_small.json"

part 4_scaling 80 $py -m kronopt.app bench soap dykaf kl_shampoo --device "$device" --scaling "$widths" \
    --d 64 --layers 1 --steps 20 --warmup 2 --json "$out/4_scaling.json"

# TOML copies of the presets with compile = true, or with their state kept in bfloat16
cfg=$out/cfg
for preset in soap muon adamw kl_shampoo; do
    $py -m kronopt.app show $preset --set compile=true >"$cfg/$preset+compile.toml"
done
bf16="--set storage.factors=bfloat16 --set storage.basis=bfloat16 --set storage.moments=bfloat16"
$py -m kronopt.app show soap $bf16 >"$cfg/soap+bf16.toml"
$py -m kronopt.app show kl_shampoo $bf16 --set fallback.storage.moments=bfloat16 >"$cfg/kl_shampoo+bf16.toml"
$py -m kronopt.app show muon --set inner.ns_form=gram >"$cfg/muon+gram.toml"
$py -m kronopt.app show muon --set inner.ns_form=gram --set inner.ns_dtype=float16 >"$cfg/muon+gram16.toml"
$py -m kronopt.app show pro_kl_shampoo --set split.ns_form=gram >"$cfg/pro_kl_shampoo+gram.toml"
for preset in soap dykaf kl_shampoo; do  # the rotations' products in bfloat16 (rotation_dtype)
    $py -m kronopt.app show $preset --set rotation_dtype=bfloat16 >"$cfg/$preset+rot16.toml"
done
for preset in soap dykaf kl_shampoo; do  # and the factors' products too ([factors] product_dtype)
    $py -m kronopt.app show $preset --set rotation_dtype=bfloat16 --set factors.product_dtype=bfloat16 \
        >"$cfg/$preset+all16.toml"
done
# 5 warm-up steps take the compilation
part 5_compile_bf16 110 $bench --warmup 5 soap "$cfg/soap+compile.toml" "$cfg/soap+bf16.toml" "$cfg/soap+rot16.toml" \
    "$cfg/soap+all16.toml" dykaf "$cfg/dykaf+rot16.toml" "$cfg/dykaf+all16.toml" "$cfg/kl_shampoo+rot16.toml" "$cfg/kl_shampoo+all16.toml" muon "$cfg/muon+compile.toml" "$cfg/muon+gram.toml" "$cfg/muon+gram16.toml" adamw "$cfg/adamw+compile.toml" \
    kl_shampoo "$cfg/kl_shampoo+compile.toml" "$cfg/kl_shampoo+bf16.toml" pro_kl_shampoo "$cfg/pro_kl_shampoo+gram.toml" \
    --d "$d" --layers "$layers" --json "$out/5_compile_bf16.json"

# shellcheck disable=SC2086
part 6_peers_d$d2 60 $bench --warmup "$warmup" $peers --d "$d2" --layers "$layers" --repeat 3 $ratios \
    --json "$out/6_peers_d$d2.json"

# a cap of CAP MiB (default 256: at d = 1024 a bucket each for soap's 4d × d blocks, 168 MiB of state apiece,
# and two a bucket for its 3d × d ones, where without it four share one)
cap=${CAP:-256}
$py -m kronopt.app show soap --set bucket_cap_mib="$cap" >"$cfg/soap+cap.toml"
$py -m kronopt.app show kl_shampoo --set bucket_cap_mib="$cap" >"$cfg/kl_shampoo+cap.toml"
part 7_bucket_cap 60 $bench --warmup "$warmup" soap "$cfg/soap+cap.toml" kl_shampoo "$cfg/kl_shampoo+cap.toml" \
    --d "$d" --layers "$layers" --memory 10 --ratio "$cfg/soap+cap.toml/soap" --ratio "$cfg/kl_shampoo+cap.toml/kl_shampoo" \
    --json "$out/7_bucket_cap.json"
echo "== done ($(date -u +%T)); one file per part in $out"
