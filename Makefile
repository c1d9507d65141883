VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup test test-fast test-slow demo lint bench clean espeak-ng

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg constraints.txt
	@$(MAKE) --no-print-directory espeak-ng
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first: 2.13.0 is the CPU wheel on these machines; anything else pulls CUDA
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev]'
	touch $@

# espeak-ng (a Debian package) speaks the evaluation tests' sentences and the demo corpus: installed where the
# system package manager allows; otherwise those tests fail saying it is missing (they are never skipped)
espeak-ng:
	@if command -v espeak-ng >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		{ apt-get update -qq && apt-get install -y -qq espeak-ng; } || echo "espeak-ng: apt-get failed" >&2; \
	elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		{ sudo apt-get update -qq && sudo apt-get install -y -qq espeak-ng; } || echo "espeak-ng: apt-get failed" >&2; \
	elif command -v brew >/dev/null 2>&1; then brew install espeak-ng; \
	else echo "espeak-ng: not installed (no usable apt-get or brew); install it, or tests/test_evaluate_metrics.py fails" >&2; fi

# the unit and integration tiers (what CI runs); the slow tier (a C++ op build, ~10-25 min on 2 cores) is test-slow
test: setup
	$(PY) -m pytest -q --durations=20 -m "not slow" tests

test-slow: setup
	$(PY) -m pytest -q --durations=10 -m slow tests

# the unit tier (tests/conftest.py): the library in this process, no child interpreters or servers; 447 tests in
# 76 s on an idle 2-core machine (make's wall time)
test-fast: setup
	$(PY) -m pytest -q --durations=10 -m "unit and not slow" tests

demo: setup
	$(PY) examples/make_corpus.py --out demo/corpus
	# the whole pipeline under kfp.local: convert, tokenize, llm ∥ flow, joint, export, evaluate (its summary is
	# printed; the model is registered as demo-voice, the eval table in its card); MLflow in ./mlruns
	$(VENV)/bin/audiotune run --local examples/demo.yaml --set export.registered_model_name=demo-voice

lint: setup
	$(VENV)/bin/ruff check src tests components pipelines examples benchmarks
	# the layer order of docs/architecture.md (.importlinter)
	$(VENV)/bin/lint-imports --no-cache

bench: setup
	$(PY) -m benchmarks.convert
	$(PY) -m benchmarks.tokenize
	$(PY) -m benchmarks.train_llm
	$(PY) -m benchmarks.train_flow
	$(PY) -m benchmarks.zero_memory
	$(PY) -m benchmarks.evaluate

clean:
	rm -rf demo mlruns

# Container images (images/*/Dockerfile), tagged with the package version; the tags are audiotune.images.CPU_IMAGE
# and CUDA_IMAGE (set AUDIOTUNE_IMAGE_REGISTRY to the same registry when compiling the pipeline).
IMAGE_REGISTRY ?= ghcr.io/audiotune
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' src/audiotune/__init__.py)
DOCKER ?= docker
CUDA_BUILD_ARGS ?=

.PHONY: images
images:
	$(DOCKER) build -f images/cpu/Dockerfile --build-arg VERSION=$(VERSION) -t $(IMAGE_REGISTRY)/audiotune-cpu:$(VERSION) .
	$(DOCKER) build -f images/cuda/Dockerfile --build-arg VERSION=$(VERSION) $(CUDA_BUILD_ARGS) -t $(IMAGE_REGISTRY)/audiotune-cuda:$(VERSION) .
