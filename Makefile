# vlmlab — one command to set up and run the study on the toy world, one to test it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PRESET ?= toy-cpu
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lab bench check data clean sweep figures

install: $(STAMP)

# torch/torchvision are the pair that installs everywhere the rest does (see README, "Install").
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

data: $(STAMP)
	$(BIN)/python data_prep/make_toyworld.py --preset $(PRESET)
	$(BIN)/python data_prep/pretrain_encoders.py --preset $(PRESET)

demo: data
	$(BIN)/python -m vlmlab.run --preset $(PRESET)

# Notebooks run at their default parameters (the smoke preset); their figures go under runs/, not figures/.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	VLMLAB_FIGURES=$(CURDIR)/runs/smoke/figures $(BIN)/python -m pytest -q --nbval-lax notebooks/ \
		--nbval-sanitize-with tests/nbval_sanitize.cfg

# The study's grid (encoders x inits x connectors x geometries x seeds). SWEEP=toy-gpu on a GPU;
# toy-cpu-sweep is the reduced CPU version. Resumable: finished cells are skipped.
SWEEP ?= toy-cpu-sweep
sweep: $(STAMP)
	$(BIN)/python -m vlmlab.run --preset $(SWEEP) --sweep-only

# The committed figures: notebooks 05-06 over a finished grid (no training) and notebook 07 over the
# saved H100 resolution benchmark. PNGs need the `export` extra and a Chromium for kaleido.
figures: $(STAMP)
	VLMLAB_FIGURES=$(CURDIR)/figures/$(SWEEP) $(BIN)/python -m vlmlab.run --preset $(SWEEP) --no-train \
		--notebooks 05_localization_instability 06_findings
	cp runs/$(SWEEP)/sweep.csv figures/$(SWEEP)/sweep.csv
	$(BIN)/python data_prep/adapt_encoders.py --preset $(SWEEP) --table figures/$(SWEEP)/encoders.csv
	VLMLAB_FIGURES=$(CURDIR)/figures/efficiency $(BIN)/python -m papermill -p bench_json \
		$(CURDIR)/figures/bench/resolution-h100-bf16.json notebooks/07_efficiency.ipynb \
		runs/bench/07_efficiency.ipynb --cwd notebooks

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

bench: $(STAMP)
	$(BIN)/python -m vlmlab.bench scan

check: $(STAMP)
	$(BIN)/ruff check vlmlab tests data_prep
	$(BIN)/ruff format --check vlmlab tests data_prep

clean:
	rm -rf $(VENV) runs data
