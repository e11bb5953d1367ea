# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv when needed.
PY      := .venv/bin/python
MODEL   ?= ../shared/models/stories260K
OUT     ?= demo_out
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test bench gpu-check clean

setup: .venv/.installed

# The CPU torch wheel must come first, so the project's own torch range pulls nothing bigger.
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	rm -rf $(OUT) $(OUT)-tp1
	.venv/bin/fmconvert convert --tp 2 --int8 $(MODEL) $(OUT)
	.venv/bin/fmconvert verify $(MODEL) $(OUT)
	.venv/bin/fmconvert inspect $(OUT)
	.venv/bin/torchrun --standalone --nproc-per-node 2 -m fmconvert generate $(OUT) --prompt "Once upon a time" -n 48
	.venv/bin/fmconvert convert --quiet $(MODEL) $(OUT)-tp1
	.venv/bin/fmconvert generate $(OUT)-tp1 --prompt "Once upon a time" -n 48

# Two pytest processes side by side, one a core (tests/parallel.py says how the suite is split); each stops at its
# first failure. One process: $(PY) -m pytest -q -x tests
test: setup
	$(PY) tests/parallel.py

# CPU benchmarks (BENCHMARKS.md): conversion speed/memory, load time, decode, each against its baseline. The first
# run builds ~6 GB of synthetic checkpoints under benchmarks/.cache; the convert/load/decode sections take about 10
# minutes on 2 cores, and the speech sections more (ctc alone: 6.5 minutes with its checkpoints built).
# BENCH_ARGS=--smoke: tiny shapes, one run each, to check the scripts still work (~30 s).
bench: setup
	OMP_NUM_THREADS=2 $(PY) benchmarks/run.py --json benchmarks/.cache/results.json $(BENCH_ARGS)

# On a machine with a CUDA GPU: kernel tests on CUDA, kernel timings, a Llama-2-7B-shaped model end to end.
gpu-check:
	PYTHONPATH=$(CURDIR) python3 benchmarks/gpu_check.py --out $${OUT_DIR:-gpu_out}

clean:
	rm -rf $(OUT) $(OUT)-tp1 .pytest_cache
