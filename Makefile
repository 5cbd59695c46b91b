# The two set-up commands of the README. Each creates the environment it needs (.venv) on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: env demo test

env:
	@scripts/setup_env.sh

# The main job on the embedded default corpus ("classics"); uses a GPU when there is one.
demo: env
	$(OFFLINE) $(PY) -m ddistill.cli demo $(ARGS)

test: env
	$(OFFLINE) $(PY) -m pytest -q tests $(ARGS)
