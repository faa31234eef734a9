# bertstream developer commands. `make test` is the README's test command.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3

.PHONY: install test test-fast test-deploy lint typecheck bench bench-quick demo clean device-pack device-rehearsal device-train-pack device-train-rehearsal

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch is pinned so the local CPU wheel (2.13.0) satisfies it.
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# docker-compose.yml brought up here on locally built images (needs dockerd, root).
test-deploy:
	bash deploy/test-deploy.sh

lint: install
	$(VENV)/bin/ruff check api contract producer worker training bench tests
	$(VENV)/bin/mypy api contract producer worker training bench

bench: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/bertstream bench

bench-quick: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/bertstream bench --quick

# Everything a lent GPU machine lacks, in .devpack/ (size-checked); bench/README.md says how to run it.
device-pack: install
	PY=$(PY) bash bench/device_pack.sh

# The device run's CPU rehearsal: the same script and steps, tiny sizes.
device-rehearsal: device-pack
	PYTHON=$(PY) bash bench/device.sh --device cpu --rehearse --out bench/results/device-rehearsal

# The sentiment model's GPU training run (training/device_train.sh): its pack, and the CPU rehearsal.
# DEVPACK_EXTRA: more pack options for one experiment, e.g. DEVPACK_EXTRA="--deeds 400".
DEVPACK_EXTRA ?=

device-train-pack: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/bertstream model device-pack --out .devpack-train --more-data --compose 4000 --compose-dev 1000 \
		--lexicon 1000 --absence 400 $(DEVPACK_EXTRA)

device-train-rehearsal: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/bertstream model device-pack --out .devpack-train-rehearsal --limit 48 --compose 200 --compose-dev 50
	PYTHON=$(PY) PACK=.devpack-train-rehearsal OUT=bench/results/device-train-rehearsal \
		bash training/device_train.sh --device cpu --rehearse --threads 2

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/bertstream demo

clean:
	rm -rf $(VENV) .devpack .devpack-train .devpack-train-rehearsal .pytest_cache .mypy_cache .ruff_cache *.egg-info
