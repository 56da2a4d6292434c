# Quick start: `make demo` (install + demo experiment), `make test` (install + tests).
# The project is installed editable (pip install -e .), so `import sft` and its scripts work from any directory.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Without a GPU, pin the CPU wheel; with one, keep whatever CUDA build pip resolves (or you installed).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.6' || echo 'torch==2.13.0')
export MPLBACKEND := Agg

.PHONY: install demo test report clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.txt requirements-dev.txt requirements-embedded.txt requirements-bench.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77"
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt -r requirements-bench.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-embedded.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: install
	$(BIN)/python -m sft.experiments.demo_smollm2

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

# README tables, assets/ and the notebook's outputs, regenerated from the committed results
report: install
	$(BIN)/python -m sft.report --notebook

clean:
	rm -rf $(VENV) .pytest_cache
