# `make demo`: create .venv, install, train the tiny model on the bundled Wikipedia sample (CPU).
# `make test`: install with dev extras and run the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_RUN ?= demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test install install-dev clean-venv slurm-deps

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, with the exact pin: any looser spec pulls the CUDA wheels on a CPU machine.
	$(PIP) install --quiet torch==2.13.0
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e .
	# PyPI's torchvision is a CUDA build: keep it importable next to the CPU torch (model/vit/torchvision_compat.py).
	$(PY) -m model.vit.torchvision_compat --install
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(PY) -m launcher.pretrain --config configs/opt_tiny.yaml --set logging.run_name=$(DEMO_RUN)

test: install-dev slurm-deps
	$(PY) -m pytest -q

# tests/test_slurm_cluster.py runs the sbatch scripts on a real local Slurm. As root (CI) install Debian's
# packages when missing; otherwise those tests skip with the reason (and fail under CI=true).
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
slurm-deps:
	@missing=; for bin in slurmctld slurmd munged sbatch; do \
	  command -v $$bin >/dev/null 2>&1 || [ -x /usr/sbin/$$bin ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(SLURM_PACKAGES) for the Slurm tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SLURM_PACKAGES) >/dev/null; \
	  else \
	    echo "note: $(SLURM_PACKAGES) missing and not root: the Slurm tests skip (and fail under CI=true)"; \
	  fi; \
	fi

clean-venv:
	rm -rf $(VENV)
