# make demo   convert the bundled demo model and generate with it (sets everything up first)
# make test   lint + the test suite (sets everything up first)
# make bench  the flash reader benchmark (needs fio for the side-by-side figure)

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.flashio-installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup demo test test-all test-gpu bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is the local CPU wheel; a plain `torch` (or a package that
	# pulls one) would download the newest CUDA build, several GB. constraints.txt keeps it there.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flashio convert

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q -m "not slow"

test-all: lint
	$(PY) -m pytest -q

test-gpu: $(STAMP)  # on a machine with CUDA (and a CUDA torch): the tests marked gpu
	$(PY) -m pytest -q -m gpu -rs

bench: $(STAMP)
	$(PY) tests/bench/bench_reader.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
