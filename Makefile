# kacl: one command to set up, one to demo, one to test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
WS     ?= demo-workspace
STAMP  := $(VENV)/.kacl-installed

.PHONY: install demo test bench mutate lint clean

install: $(STAMP)

# pyradiomics ships no wheel and its sdist only builds without isolation, after its build
# requirements are in the venv; torch/torchvision are pinned to the releases on this disk.
# The editable install also compiles kacl's one C module (setup.py), so its source is a
# prerequisite: editing it re-runs the install, which rebuilds it. kacl's own bytecode is
# compiled once here: pip does it for site-packages but not for an editable package, and where
# PYTHONDONTWRITEBYTECODE is set every command would compile its modules again (about 0.05 s
# of CPU on a stage's first call, benchmarks/fixed_cost.py). A stale .pyc is recompiled by
# Python from its source mtime, so editing a module stays safe.
$(STAMP): pyproject.toml setup.py kacl_cli/stages/radiomics/backends/fast/_texture.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q numpy versioneer setuptools wheel
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --no-build-isolation pyradiomics
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -m compileall -q kacl_cli
	touch $(STAMP)

demo: install
	KACL_WORKSPACE=$(WS) bash examples/demo.sh

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m benchmarks.run_all

# Plants a fixed list of small bugs in a temporary copy and checks the covering tests catch
# each (benchmarks/mutation_check.py). A tool, not a test: not part of `make test`.
mutate: install
	$(BIN)/python -m benchmarks.mutation_check

lint: install
	$(BIN)/ruff check kacl_cli tests benchmarks

clean:
	rm -rf $(WS) .pytest_cache
