# Set-up and entry points. `make demo` and `make test` create (or reuse) .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_WORKDIR ?= workdirs/demo

.PHONY: install demo test clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel; an unpinned torch would pull GBs of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Train the demo model on the bundled sample collection, evaluate it on the bundled CMB and
# MedS-Bench samples, and print where everything is. Rerunning resumes/skips finished work.
demo: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m csft_jax.train --config=configs/demo.py --workdir=$(DEMO_WORKDIR)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m csft_jax.evaluate --config=configs/eval/cmb.py --config.checkpoint=$(DEMO_WORKDIR)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m csft_jax.evaluate --config=configs/eval/meds_bench.py --config.checkpoint=$(DEMO_WORKDIR)
	@echo
	@echo "Demo results in $(DEMO_WORKDIR): metrics.jsonl, run_summary.json, checkpoints/, eval/cmb/, eval/meds_bench/"

test: $(STAMP)
	$(PY) -m pytest -q

clean-demo:
	rm -rf $(DEMO_WORKDIR)
