# `make test` builds .venv on first use (fairseq compiles for about 5 minutes), then runs the suite.
PYTHON ?= python3
VENV ?= .venv
# The CPU build on machines that have it; set TORCH= to keep a torch you installed (e.g. CUDA).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# Test processes; each module runs whole in one of them (its module fixtures are built once), handed out
# in the order tests/conftest.py gives them, the longest first.
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed

# `make demo PROFILE=full` retrains the demo teacher too (hours on CPU); each profile has its own folder.
PROFILE ?= default
DEMO_OUT ?= demo-out$(if $(filter-out default,$(PROFILE)),-$(PROFILE))

# `make seeds`: the demo's students over SEEDS seeds, two runs at a time (about an hour on 2 CPU cores).
SEEDS ?= 3

.PHONY: install test bench demo seeds clean

install: $(STAMP)

$(STAMP): requirements/build.txt requirements/fairseq.txt requirements/runtime.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH) -r requirements/build.txt
	# Against the torch just installed (no build isolation); CUDA_HOME unset, as the sdist lacks the CUDA sources.
	env -u CUDA_HOME $(BIN)/pip install -q --no-deps --no-build-isolation --require-hashes -r requirements/fairseq.txt
	$(BIN)/pip install -q -r requirements/runtime.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: $(STAMP)
	$(BIN)/ruff check --quiet .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder tests

# Benchmarks measure and print ratios; they are not tests.
bench: $(STAMP)
	$(BIN)/python benchmarks/loss_kernel.py
	$(BIN)/python benchmarks/feature_loss.py
	$(BIN)/python benchmarks/kd_step.py --preset small-32k --steps 5 --warmup 2
	$(BIN)/python benchmarks/kd_step.py --preset tiny-256k --steps 3 --warmup 1 --criteria ce "tie_kd N=3" "tie_kd N=3 logits"

demo: $(STAMP)
	$(BIN)/python examples/demo/run_demo.py --profile $(PROFILE) --out $(DEMO_OUT)

seeds: $(STAMP)
	$(BIN)/python examples/demo/compare_seeds.py --seeds $(SEEDS) --out seeds-out

clean:
	rm -rf $(VENV) build *.egg-info
