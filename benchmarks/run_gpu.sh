#!/usr/bin/env bash
# The GPU suite in one call, on a host that has jax (CUDA), flax, optax, torch,
# transformers and peft but no TensorFlow/seqio (the packing batches are made
# beforehand with `packing.py --save_batches=.bench_data/packing`):
#
#   benchmarks/run_gpu.sh OUT_DIR [TIME_LIMIT_S]
#
# 1. versions and devices; a smoke run (tiny, LoRA, ours + HF eager, one step):
#    if it fails, stop at once rather than spend the time limit on failures;
# 2. `run_all.py` with two training workers at a time (set-up overlaps, device
#    work is serialized by a lock) and a deadline, so the run ends inside
#    TIME_LIMIT_S with every finished figure written to OUT_DIR as it comes
#    (training stops starting workers 240 s early: packing, decoding and
#    eval_throughput.py, which reads ../shared/data or $IFT_JAX_DATA_DIR, run then);
# 3. if .before/ift_jax holds an earlier version of the package, decoding once
#    more with it (`--tag=before`): before/after on the same device, same call.
set -u
out=${1:?usage: run_gpu.sh OUT_DIR [TIME_LIMIT_S]}
limit=${2:-540}
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
base_path=${PYTHONPATH:-}
export PYTHONPATH="$PWD${base_path:+:$base_path}"
mkdir -p "$out"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv || true
python3 - <<'PY' || exit 1
import importlib, jax
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "qwix", "ml_collections",
             "torch", "transformers", "peft"):
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "?"))
print(jax.devices())
PY

python3 benchmarks/train_throughput.py --presets=tiny --methods=lora --peers=eager \
  --warmup=1 --steps=2 --matmul_size=1024 --output_dir=/tmp/smoke 2>&1 | tail -n 5
python3 - <<'PY' || exit 1
import json, sys
record = json.load(open("/tmp/smoke/train_throughput_tiny_gpu.json"))
errors = {f"{e['method']}/{k}": v["error"] for e in record["entries"]
          for k, v in e["sides"].items() if "error" in v}
print("smoke:", "ok" if not errors else errors, f"{record['entries'][0]['loss_check']}")
sys.exit(1 if errors else 0)
PY
echo "smoke done at $(elapsed) s"

before=0
[ -d .before/ift_jax ] && before=70  # Seconds kept for the decoding re-run.
left=$(( limit - $(elapsed) - before ))
python3 benchmarks/run_all.py --output_dir="$out" --readme= --lanes=2 --warmup=3 \
  --steps=10 --deadline_s="$left" --reserve_s=240 \
  --packing_batches=.bench_data/packing 2>&1 | grep -v "^[IW]0000"
echo "suite done at $(elapsed) s"

if [ "$before" -gt 0 ]; then
  left=$(( limit - $(elapsed) ))
  [ "$left" -gt 20 ] && PYTHONPATH="$PWD/.before${base_path:+:$base_path}" \
    timeout "$left" python3 benchmarks/decoding.py --tag=before --output_dir="$out" \
    2>&1 | grep -E '"(tokens_per_s|ratio_beams[14])"' 
fi
echo "all done at $(elapsed) s"
