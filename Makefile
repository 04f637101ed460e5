# Set-up and entry points. `make demo` runs the main job, `make test` the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
SYSDEPS_APT := pkg-config libopencv-dev libturbojpeg0-dev

.PHONY: setup sysdeps test test-fast demo reproduce clean

setup: $(STAMP)

# Re-installs only when requirements.txt changed (the stamp is newer otherwise).
$(STAMP): requirements.txt
	@$(MAKE) --no-print-directory sysdeps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# FFCV compiles against OpenCV and libjpeg-turbo found through pkg-config.
sysdeps:
	@if command -v pkg-config >/dev/null && pkg-config --exists opencv4 libturbojpeg; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing FFCV's system libraries: $(SYSDEPS_APT)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSDEPS_APT); \
	else \
		echo "FFCV needs system libraries that are missing. Install them, then re-run 'make setup':"; \
		echo "    sudo apt-get install -y $(SYSDEPS_APT)"; \
		exit 1; \
	fi

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

# The main job: convert a small dataset, pre-train a small ViT with PatchMix, compare its kNN
# accuracy with a random encoder of the same shape. DATA=DIR uses an image folder instead of the
# bundled digits; DATASET=cifar10 downloads CIFAR-10 (needs a network). DEMO_ARGS=... adds train.py
# overrides (e.g. DEMO_ARGS="epochs=5").
DATA ?=
DEMO_ARGS ?=
DATASET ?= digits
DEMO_OUT ?= runs/demo
DATASETS ?= datasets
demo: setup
	@set -e; \
	if [ -n "$(DATA)" ]; then \
		$(PY) convert_datasets.py imagefolder --source "$(DATA)" --out $(DATASETS) --name demo-data; \
		root=$(DATASETS)/demo-data; backend=torchvision; \
	elif [ "$(DATASET)" = cifar10 ]; then \
		$(PY) convert_datasets.py cifar10 --source $(DATASETS)/cifar10-release --download --out $(DATASETS); \
		root=$(DATASETS)/cifar10; backend=memory; \
	else \
		$(PY) convert_datasets.py digits --out $(DATASETS); root=$(DATASETS)/digits; backend=memory; \
	fi; \
	$(PY) train.py --config configs/demo.yaml data.root=$$root data.backend=$$backend output_dir=$(DEMO_OUT) $(DEMO_ARGS); \
	$(PY) eval.py knn --weights $(DEMO_OUT)/last.pt --compare-random

# Reproduce a published row: pre-training, kNN, linear probe, fine-tuning, then the report next to the
# paper's numbers, all in the config's output_dir. Resumable: a rerun skips the finished stages.
# NPROC processes (GPUs) per stage; ARGS go to train.py, e.g. ARGS="data.root=/fast/datasets/cifar10".
CONFIG ?=
NPROC ?= 8
ARGS ?=
reproduce: setup
	@test -n "$(CONFIG)" || { echo "usage: make reproduce CONFIG=configs/vitt_cifar10.yaml [NPROC=8] [ARGS='data.root=DIR']"; exit 1; }
	$(PY) -m evaluation.reproduce --config $(CONFIG) --nproc $(NPROC) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
