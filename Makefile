# vlmlab — one command to set up and run the study on the toy world, one to test it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PRESET ?= toy-cpu
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lab bench check data clean

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

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

bench: $(STAMP)
	$(BIN)/python -m vlmlab.bench scan

check: $(STAMP)
	$(BIN)/ruff check vlmlab tests data_prep
	$(BIN)/ruff format --check vlmlab tests data_prep

clean:
	rm -rf $(VENV) runs data
