#!/usr/bin/env bash
# Prepare an offline GPU machine for bench/gpu_check.py: install the wheels carried in .whl/ (trl, hydra-core,
# omegaconf, datasets, bitsandbytes, liger-kernel, ... without their dependencies: the machine's torch stays) into
# /tmp/site, then print what the check will run on. From the repository root:
#
#   bash bench/gpu_setup.sh && PYTHONPATH=/tmp/site:. python3 bench/gpu_check.py --out /tmp/gpu_check
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_setup: no wheels in .whl/ (run from the repository root)" >&2; exit 1; }
if "$PYTHON" -m pip --version >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
else  # no pip for this interpreter: a wheel installed with --target is its unpacked archive
  echo "gpu_setup: no pip for $PYTHON; unpacking the wheels into /tmp/site" >&2
  "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site") for w in sys.argv[1:]]' .whl/*.whl
fi
PYTHONPATH="/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - <<'EOF'
import importlib.metadata as md
import platform
print(f"python {platform.python_version()}")
for dist in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "hydra-core",
             "liger-kernel", "flash-attn"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} not installed")
import torch
print(f"torch CUDA {torch.version.cuda}, devices: {torch.cuda.device_count()}")
EOF
nvidia-smi || echo "gpu_setup: nvidia-smi not available"
