# Two commands do all setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	# test-only: qwen-agent ships qwen.tiktoken (the real Qwen2 ranks); only that file is used, so no dependencies
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps qwen-agent==0.0.34
	# the deepspeed extra, which CI runs for real (ZeRO-2/3 on the CPU); its ops are built just in time
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps deepspeed==0.19.8
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mllm demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

bench: $(STAMP)  # one pinned thread each; every comparison interleaved in one process (benchmarks/harness.py)
	$(BIN)/python benchmarks/bench_decode.py --threads 1
	$(BIN)/python benchmarks/bench_answer.py --threads 1
	$(BIN)/python benchmarks/bench_vision.py --threads 1
	$(BIN)/python benchmarks/bench_train.py --threads 1
	$(BIN)/python benchmarks/bench_base_step.py --threads 1

clean:
	rm -rf $(VENV) runs output .pytest_cache
