# vglaw: every target installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SERVE_STAMP := $(VENV)/.serve-installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

DATASET ?= refcoco
GPUS ?= 1
NODES ?= 1
ARGS ?=
CKPT ?=
DATA_ROOT ?= data
SHAPES ?= data
OUT ?= outputs/demo
OUT_GREF ?= outputs/demo-gref

.PHONY: setup test test-all test-browser lint docs demo demo-gref demo-finetune demo-describe serve train eval bench bench-quick clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The web demo's extra (Gradio), only for the targets that serve pages.
$(SERVE_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,serve]'
	touch $(SERVE_STAMP)

setup: $(SERVE_STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not browser"

test-browser: $(SERVE_STAMP)
	$(PY) -m pytest -q -m browser

lint: $(STAMP)
	$(VENV)/bin/ruff check vglaw tests

# docs/src/*.md -> docs/*.md, with links to the lines that define the code they name.
docs: $(STAMP)
	$(PY) docs/src/render.py

demo: $(STAMP)
	$(PY) -m vglaw.commands.demo --data $(SHAPES) --out $(OUT) $(ARGS)

serve: $(SERVE_STAMP)
	$(VENV)/bin/vglaw serve $(if $(MODEL),--model $(MODEL),) $(ARGS)

demo-gref: $(STAMP)
	$(PY) -m vglaw.commands.demo --generalised --data $(SHAPES) --out $(OUT_GREF) $(ARGS)

# After `make demo`: a new domain as Label Studio exports, imported, the demo model fine-tuned on it.
demo-finetune: $(STAMP)
	$(PY) -m vglaw.commands.demo_finetune --model $(OUT)/logs/demo/model $(ARGS)

# After `make demo`: a describing head on the demo model, trained and checked by its own grounding.
demo-describe: $(STAMP)
	$(PY) -m vglaw.commands.demo_describe --model $(OUT)/logs/demo/model --data $(SHAPES) $(ARGS)

train: $(STAMP)
	$(VENV)/bin/vglaw fit --config configs/$(DATASET).yaml --trainer.devices $(GPUS) --trainer.num_nodes $(NODES) $(ARGS)

eval: $(STAMP)
	@test -n "$(CKPT)" || { echo "usage: make eval DATASET=<name> CKPT=path/to.ckpt"; exit 2; }
	$(VENV)/bin/vglaw test --config configs/$(DATASET).yaml --ckpt_path $(CKPT) --trainer.devices $(GPUS) $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/vglaw bench --overwrite $(ARGS)

bench-quick: $(STAMP)
	$(VENV)/bin/vglaw bench --quick --overwrite $(ARGS)

clean:
	rm -rf $(VENV) outputs lightning_logs
