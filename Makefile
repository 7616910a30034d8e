# Set-up and entry points. `make demo` and `make test` create (or reuse) .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_WORKDIR ?= workdirs/demo

.PHONY: install demo lint test clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel; an unpinned torch would pull GBs of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,tpu]'
	touch $(STAMP)

install: $(STAMP)

# The user's workflow at demo size: a small base model stands in for a downloaded HF checkpoint;
# the demo recipe fine-tunes from it (init.from_hf), exports, and the export is evaluated and
# reported. Rerunning resumes or skips finished work (`make clean-demo` starts over).
RUN := JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m
demo: $(STAMP)
	@echo "== 1/4 A stand-in for a pretrained checkpoint: a small base model, trained briefly, exported to HF"
	$(RUN) csft_jax.train --config=configs/demo.py:stage=base --workdir=$(DEMO_WORKDIR)/base
	@echo "== 2/4 Fine-tune from that HF directory, as from any downloaded one"
	$(RUN) csft_jax.train --config=configs/demo.py --workdir=$(DEMO_WORKDIR)/sft --config.init.from_hf=$(DEMO_WORKDIR)/base/hf_export
	@echo "== 3/4 Evaluate the fine-tuned export on the bundled CMB and MedS-Bench samples"
	$(RUN) csft_jax.evaluate --config=configs/eval/cmb.py --config.checkpoint=$(DEMO_WORKDIR)/sft/hf_export
	$(RUN) csft_jax.evaluate --config=configs/eval/meds_bench.py --config.checkpoint=$(DEMO_WORKDIR)/sft/hf_export
	@echo "== 4/4 Report"
	$(RUN) csft_jax.report --workdir=$(DEMO_WORKDIR)
	@echo
	@echo "Demo results in $(DEMO_WORKDIR)/sft: metrics.jsonl, run_summary.json, checkpoints/, hf_export/, eval/cmb-answer/step_150/, eval/meds_bench/step_150/; summary in $(DEMO_WORKDIR)/summary.md"
	@echo "Shown: a base model exported to HF, fine-tuned from that export, exported again and evaluated with the official CMB and MedS-Bench prompts, extraction and metrics (the 'answers extracted' line says the fine-tuned model answers in CMB's format); a 1.5M-parameter model learns formats, not medicine, so its accuracies say nothing about the method: use a 7B recipe for that."

# One pytest worker per core (pytest-xdist), a test file per worker at a time so that module
# fixtures (the workflow test's trained run) are built once: 9-11 min instead of 15 on 2 cores.
TEST_WORKERS ?= auto
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The style gate (configuration: [tool.ruff] in pyproject.toml): lint, then formatting. `ruff format .`
# and `ruff check --fix .` repair most of what it reports.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-demo:
	rm -rf $(DEMO_WORKDIR)
