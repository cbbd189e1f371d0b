# `make demo`: create .venv, install, train the tiny model on the bundled Wikipedia sample (CPU).
# `make test`: install with dev extras and run the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_RUN ?= demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test install install-dev clean-venv

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, with the exact pin: any looser spec pulls the CUDA wheels on a CPU machine.
	$(PIP) install --quiet torch==2.13.0
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(PY) -m launcher.pretrain --config configs/opt_tiny.yaml --set logging.run_name=$(DEMO_RUN)

test: install-dev
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
