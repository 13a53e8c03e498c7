#!/usr/bin/env bash
# The one prepared check for a machine with a GPU (the device tool's H200, or yours):
#   1. `uniadapter verify` on the demo, fp16 then bf16: the backbone's and the three demo sets' golden records
#      (fp32 CPU ones) recomputed on the GPU, and a mixed batch of them against each row alone, so the first GPU
#      run diagnoses itself (a table: worst probe, difference / tolerance, pass or mismatch);
#   2. the GPU tests (pytest -m gpu): fp16/bf16 against fp32 with adapters, mixed batches, frame uploads,
#      CPU-tier -> device copies, FAISS on the GPU (or why not), the service on the GPU;
#   3. BLIP-base fp16 and bf16: images/s, VQA answers/s, GPU memory of the backbone + 3 sets;
#   4. /vqa req/s through HTTP at 1 and 32 clients, fp16 then bf16 (short scenarios).
# Prints figures; every step runs even if an earlier one fails; the exit code is the first failure's.
# Needs a CUDA torch in .venv (TORCH_SPEC with a CUDA build) or any python with the project installed
# (PYTHON=...). Output is also written under ${OUT:-gpu-check-out}/.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
status=0
step() {
  local name=$1; shift
  echo "=== $name: $*"
  local started=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - started)) s"
  [ "$status" -ne 0 ] || status=$rc
}

"$PY" - <<'EOF' | tee "$OUT/device.log"
import torch, faiss
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
print("faiss", faiss.__version__, "gpu support", hasattr(faiss, "StandardGpuResources"))
# which build (the README's table gives its compute capabilities: faiss exposes no list of them), what it sees
from importlib.metadata import packages_distributions
print("faiss build", packages_distributions().get("faiss"), "gpus", faiss.get_num_gpus(),
      "compile options", faiss.get_compile_options().strip())
EOF

for dtype in float16 bfloat16; do  # an empty data root: the demo's own records, nothing from a local data/ folder
  step "verify-$dtype" "$PY" -m uniadapter_serve.service.cli verify --backbone demo --device cuda --dtype "$dtype" \
    --data-root "$OUT/verify-data"
done
step gpu-tests "$PY" -m pytest -m gpu tests/gpu -v -p no:randomly -p no:cacheprovider
step throughput "$PY" bench/gpu_throughput.py --backbone blip-base --dtypes float16,bfloat16 --rounds 10
for dtype in float16 bfloat16; do
  step "http-$dtype" "$PY" bench/service_load.py --backbone blip-base --device cuda --dtype "$dtype" \
    --concurrency 1,32 --vqa-requests 300 --retrieve-requests 200 --sequential-vqa-requests 60 \
    --sequential-retrieve-requests 60 --time-limit 20
done
echo "gpu-check: exit $status (logs in $OUT/)"
exit "$status"
