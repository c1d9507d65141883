VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup test demo lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first: 2.13.0 is the CPU wheel on these machines; anything else pulls CUDA
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) examples/make_corpus.py --out demo/corpus
	$(VENV)/bin/audiotune convert --source demo/corpus/manifest.jsonl --output demo/dataset --config examples/demo.yaml --set convert.overwrite=true
	$(VENV)/bin/audiotune tokenize --dataset demo/dataset --output demo/tokens --config examples/demo.yaml --set tokenize.overwrite=true

lint: setup
	$(VENV)/bin/ruff check src tests components pipelines examples benchmarks

bench: setup
	$(PY) -m benchmarks.convert
	$(PY) -m benchmarks.tokenize

clean:
	rm -rf demo mlruns
