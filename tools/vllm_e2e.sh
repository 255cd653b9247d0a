#!/usr/bin/env bash
# vLLM end to end with s2d_ext's sorted draft as a `custom_class` proposer, against vLLM without speculation.
#
# NOT RUN HERE: this script was written on a 2-core CPU host without a GPU, where vLLM's CUDA wheel cannot
# run; the proposer was tested against the contract without vLLM (python_tests/integrations/test_vllm.py).
# Written against vLLM 0.27.0 (its custom_class_proposer.py and the GPU model runner's call to `propose`;
# 0.22.0 has the same hook). vLLM 0.34.0, the newest on PyPI when this was written, no longer has
# `custom_class` (it has registered V2 speculators instead): pin a version that has it.
#
# Usage: tools/vllm_e2e.sh [TARGET] [DRAFT]
#   TARGET: an HF checkpoint folder vLLM can load (default: the local family's target-small)
#   DRAFT:  a sorted draft checkpoint sharing TARGET's vocabulary (default: the local family's draft)
# Environment: VENV (default /tmp/s2d-vllm-env), VLLM_VERSION (default 0.27.0), K (draft tokens, default 4),
#   MAX_TOKENS (default 64), PYTHON (default python3). On a machine without a GPU, try a CPU build of the
#   same vLLM version (VLLM_PIP_SPEC="vllm==<version>+cpu" with its index) instead of the CUDA wheel.
# Passes when every prompt's greedy output with the S2D proposer equals vLLM's without speculation; prints
# vLLM's speculative-decoding acceptance metrics when it logs them.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-/tmp/s2d-vllm-env}"
VLLM_VERSION="${VLLM_VERSION:-0.27.0}"
VLLM_PIP_SPEC="${VLLM_PIP_SPEC:-vllm==${VLLM_VERSION}}"
PYTHON="${PYTHON:-python3}"
K="${K:-4}"
MAX_TOKENS="${MAX_TOKENS:-64}"
FAMILY="${S2D_FAMILY_DIR:-$HOME/.cache/s2d_ext/family}/tiny"

# 1. Its own environment: vLLM pins its torch; s2d_ext is built against that torch (no build isolation).
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q "$VLLM_PIP_SPEC"
"$VENV/bin/python" -m pip install -q cmake ninja setuptools wheel
"$VENV/bin/python" -m pip install -q --no-build-isolation "$ROOT"
"$VENV/bin/python" - <<'EOF'
import vllm.v1.spec_decode.custom_class_proposer  # noqa: F401  (this vLLM has the custom_class hook)
EOF

# 2. The models: given, or the local family (built on first use, a few minutes on a CPU, no downloads).
TARGET="${1:-$FAMILY/target-small}"
DRAFT="${2:-$FAMILY/draft}"
if [ "$#" -lt 2 ] && [ ! -d "$DRAFT" ]; then
    "$VENV/bin/python" -m s2d_ext family build
fi

# 3. The same prompts, greedy, with and without the proposer; outputs must match token for token.
"$VENV/bin/python" - "$TARGET" "$DRAFT" "$K" "$MAX_TOKENS" <<'EOF'
import sys
import time

from vllm import LLM, SamplingParams

target, draft, k, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
prompts = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n",
    "# Read a file and count its lines\n",
]
params = SamplingParams(temperature=0.0, max_tokens=max_tokens)


def run(**kwargs):
    llm = LLM(model=target, max_model_len=512, gpu_memory_utilization=0.3, enforce_eager=True, **kwargs)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    return tokens, seconds


plain, t_plain = run()
spec, t_spec = run(
    speculative_config={
        "method": "custom_class",
        "model": "s2d_ext.integrations.vllm.S2DProposer",
        "num_speculative_tokens": k,
    },
    additional_config={"s2d_draft": draft},
)
same = sum(a == b for a, b in zip(plain, spec))
print(f"greedy outputs equal: {same}/{len(prompts)}; {t_plain:.2f}s without speculation, {t_spec:.2f}s with S2D")
sys.exit(0 if same == len(prompts) else 1)
EOF
