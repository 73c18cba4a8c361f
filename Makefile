# Two set-up commands (see README): `make demo` runs the main job, `make test` runs the tests.
# Each test environment is a virtualenv made from requirements-test.txt plus one transformers version;
# CI runs all three: the last 4.x, the 5.x that vLLM pins (< 5.20), and the newest 5.x.
PYTHON ?= python3
TF5 ?= 5.24.0
TF519 ?= 5.19.0
TF4 ?= 4.57.6
ENVS := .venv-tf5 .venv-tf519 .venv-tf4

.PHONY: test test-tf5 test-tf519 test-tf4 demo bench bench-generate clean

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

test: test-tf5 test-tf519 test-tf4

demo: .venv-tf5/.done
	.venv-tf5/bin/python scripts/chat.py

bench: .venv-tf5/.done
	.venv-tf5/bin/python bench/bench_llm.py

bench-generate: .venv-tf5/.done
	.venv-tf5/bin/python bench/bench_generate.py --size tiny

clean:
	rm -rf $(ENVS)
