# Two commands set everything up on a fresh machine:
#   make demo   -> creates .venv (once), trains and evaluates the offline default on a synthetic set
#   make test   -> creates .venv (once), runs the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[test,lite]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastflow demo --output demo-output

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-output
