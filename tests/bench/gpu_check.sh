#!/usr/bin/env bash
# The GPU checks in one command, for a machine with CUDA and a CUDA build of torch (numpy,
# safetensors, tokenizers, transformers, hypothesis, pytest and matplotlib installed):
#
#     bash tests/bench/gpu_check.sh OUT_DIR [SCALE]
#
# 1. the tests marked gpu (outputs vs the CPU reference, 64-token greedy generation, cache
#    invariants and the allocator's statistics after device-side updates);
# 2. `flashio bench model --device cuda` on a synthetic artifact of OPT-6.7B's shape (SCALE 1.0:
#    13.6 GB written under OUT_DIR; 0.25 for a quicker look), the paper's latency table on the GPU.
# Everything lands in OUT_DIR: pytest.log, bench/{results.json,table.md,latency.png}.
set -euo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [SCALE]}
scale=${2:-1.0}
here=$(cd "$(dirname "$0")/../.." && pwd)
py=${PYTHON:-python3}
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$out"
cd "$here"
"$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA here"; print(torch.__version__, torch.cuda.get_device_name())'
"$py" -m pytest -q -m gpu -rs -p no:cacheprovider tests/unit/test_device.py 2>&1 | tee "$out/pytest.log"
art="$out/opt-6.7b-synth"
[ -f "$art/manifest.json" ] || "$py" -m flashio.cli synth --shape opt-6.7b --scale "$scale" --out "$art"
"$py" -m flashio.cli bench model "$art" --device cuda --out "$out/bench" --tokens 16 --baseline-tokens 2 \
    --configs naive,hybrid,+predictor,+windowing,+bundling,+coalescing,+reordering,+overlap,dense
