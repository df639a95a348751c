# Two commands do everything on a fresh machine (see README):
#   make demo   - set up, then run the main job on the bundled MiniLM
#   make test   - set up, then run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test install sysdeps bench clean

# Re-install only when pyproject.toml changes: repeated runs reuse the venv and are fast.
# One pip call resolves everything together, so torch stays at the pinned CPU build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing blockprune and its dependencies into $(VENV) (first run takes a few minutes)"
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "is ignored: it is neither" || true
	@$(PY) -c "import blockprune, torch, tvm, onnxruntime, onnx_graphsurgeon; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $@

install: $(STAMP)

sysdeps:
	@bash scripts/system-deps.sh

demo: install sysdeps
	$(VENV)/bin/blockprune demo

test: install sysdeps
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache build *.egg-info
