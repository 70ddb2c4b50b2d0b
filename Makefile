# Fresh machine: `make demo` (main job on the embedded shapes data, CPU) and `make test`.
# Both install first; a second install finishes in seconds (stamp file).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.p2seg-installed
TORCH_SPEC := torch==2.14.1 torchvision==0.29.1
export OMP_NUM_THREADS ?= 2
# busy-waiting OpenMP threads make 2-thread runs many times slower on a loaded 2-core machine
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install test demo clean-venv

install: $(STAMP)

$(STAMP): setup.py tools/install_detectron2.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')" 2>/dev/null \
	  || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	$(PY) -c "import detectron2, p2seg; print('detectron2', detectron2.__version__, '| p2seg', p2seg.__version__)"
	touch $(STAMP)

# The suite is mostly small processes and waits: two workers of one thread each use both cores.
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15 tests

demo: install
	$(PY) tools/run_pipeline.py --output-dir output/pipeline

clean-venv:
	rm -rf $(VENV)
