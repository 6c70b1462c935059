# Two entry points for a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARGS ?=

.PHONY: serve test install install-test system-deps bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml constraints-cpu.txt
	$(PIP) install --quiet -c constraints-cpu.txt -e .
	$(PY) -m model.kernels.cpu.extension || echo "note: the CPU quantized kernels did not build (g++ missing?): GGUF files will be dequantized on the CPU"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed tests/agents/package-lock.json
	$(PIP) install --quiet -c constraints-cpu.txt -e '.[test]'
	if command -v npm >/dev/null; then npm ci --prefix tests/agents --no-audit --no-fund \
	  || echo "note: npm could not install Claude Code: its test will be skipped"; \
	else echo "note: npm missing: the Claude Code test will be skipped"; fi
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

system-deps:
	bash scripts/install-system-deps.sh

serve: install
	@echo "Chat page: http://127.0.0.1:8000/ once the model has loaded (or the 'Chat page:' URL logged below)"
	$(VENV)/bin/dots-serve $(ARGS)

test: install-test system-deps
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .build
