# Two commands for a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch: on the project's machines this version lies on disk; elsewhere set
# TORCH_SPEC / PIP_EXTRA (e.g. PIP_EXTRA="--index-url https://download.pytorch.org/whl/cpu").
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA ?=
DEMO_DIR ?= demo_output

.PHONY: demo test install benchmark clean

# A venv whose interpreter no longer runs (its Python upgraded or removed) is made again.
$(BIN)/cycleinr: pyproject.toml
	$(BIN)/python -c "" 2>/dev/null || $(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_EXTRA) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[train,test]"
	touch $@

install:
	@$(BIN)/python -c "" 2>/dev/null || rm -f $(BIN)/cycleinr
	@$(MAKE) --no-print-directory $(BIN)/cycleinr

demo: install
	$(BIN)/python -m CycleINRLib.demo --output-dir $(DEMO_DIR)

test: install
	$(BIN)/python -m pytest -q Testing

benchmark: install
	$(BIN)/python benchmarks/upsample_bench.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
