#!/bin/bash
# One call on a lent GPU machine (H100/H200; under 8 minutes): the GPU tests, the llama-1b bench
# with its ablations, and the llama-8b QLoRA bench. Results (bench JSON) and a log go to $OUT when
# that is set (the device tool brings it back), else to benchmarks/results/.
#
#   bash ../shared/gpu-wheels.sh          # here, once: the wheels the GPU image lacks, into .whl/
#   run: bash scripts/gpu_check.sh        # there, carrying .whl
#
# Each stage has its own time limit so that a slow one cannot eat the others' (the benches write
# their JSON after every row, so a stage cut short still leaves what it measured).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log="$out/gpu_check-$(date +%Y%m%d-%H%M%S).log"
exec > >(tee -a "$log") 2>&1

if compgen -G ".whl/*.whl" > /dev/null; then
  # The image's Python 3.12 + torch; the project's other packages at the versions it was tested with.
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
elif [ -z "${GPU_CHECK_STACK_READY:-}" ]; then
  # The GPU image's transformers is older than the project's pin: without the wheels every stage
  # would fail at import and burn the machine's time. A machine with the stack installed says so.
  echo "error: no .whl/*.whl here; run 'bash ../shared/gpu-wheels.sh' in the project root and carry .whl" \
    "(or set GPU_CHECK_STACK_READY=1 where peftcli's pinned stack is installed)" >&2
  exit 2
fi
# `make test-gpu` runs $(BIN)/python: point it at this interpreter, and tell make the venv is ready.
bin=$(mktemp -d)
ln -s "$(command -v python3)" "$bin/python"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 - <<'EOF'
import torch, transformers, trl, peft
print("torch", torch.__version__, "| transformers", transformers.__version__, "| trl", trl.__version__,
      "| peft", peft.__version__, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")
import importlib.util
print("flash_attn:", bool(importlib.util.find_spec("flash_attn")),
      "| torch varlen_attn:", bool(importlib.util.find_spec("torch.nn.attention.varlen")))
EOF
nvidia-smi --query-gpu=name,memory.total,memory.free,compute_cap --format=csv || true

status=0
stage() {  # stage SECONDS NAME COMMAND...
  local limit=$1 name=$2; shift 2
  local started=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - started))s"
  [ "$rc" -eq 0 ] || status=1
}
if command -v make > /dev/null; then
  stage 90 "make test-gpu" make --no-print-directory -o .venv/.peftcli-installed test-gpu BIN="$bin" PYTEST_ARGS="-q"
else
  stage 90 "make test-gpu (no make here: its command)" python3 -m pytest -m gpu -q
fi
stage 200 "bench llama-1b --ablate" python3 scripts/bench.py --config llama-1b --ablate --out "$out"
stage 180 "bench llama-8b" python3 scripts/bench.py --config llama-8b --out "$out"
ls -l "$out"
exit $status
