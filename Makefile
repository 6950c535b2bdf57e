# make test   - create .venv if needed, then run the test suite
# make demo   - create .venv if needed, then compile the tiny Llama, generate 16 tokens, inspect it
# make clean  - remove build outputs (keeps .venv; `make distclean` removes it too)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Pinned on purpose: torch 2.13.0 CPU is on this machine's disk (pip find-links);
# a looser spec would pull a multi-GB CUDA build.
TORCH_PINS := torch==2.13.0 triton==3.9.0

.PHONY: demo test clean distclean

$(VENV): $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH_PINS)
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	@# headless Chromium renders the HTML report in tests/test_inspect.py (skipped without it)
	-@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y chromium || echo "chromium not installed: the HTML report test will skip"; fi
	@# one worker per core, at most 4 (each holds torch and its own compiled engines)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n auto --maxprocesses=4

demo: $(STAMP)
	mkdir -p build
	$(BIN)/tilec compile examples/llama_tiny.yaml -o build/llama_tiny.engine
	$(BIN)/tilec run build/llama_tiny.engine --prompt-ids 5,9,2 --max-new-tokens 16
	$(BIN)/tilec inspect build/llama_tiny.engine

clean:
	rm -rf build .hypothesis .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
