# loraflow — one entry point for humans and CI.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PROTOS  := $(wildcard protos/loraflow/v1/*.proto)

.PHONY: install native test test-fast test-compose proto lint demo bench clean up

install: $(STAMP) native

# The LoraRows ONNX Runtime kernel (loraflow/native): built where a C++ compiler is, skipped with a message
# where none is (the standard-operator graph serves then).
NATIVE_LIB := loraflow/native/liblora_rows.so
native: $(NATIVE_LIB)

$(NATIVE_LIB): loraflow/native/lora_rows.cc loraflow/native/swiglu.h loraflow/native/op_shapes.h loraflow/native/build.sh
	loraflow/native/build.sh

# torch first and by exact version: pip takes the CPU build from local disk.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[trainer,compiler,inference,dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -ra --durations=15 tests

# The compose stack for real (root: it may install Docker from Debian's packages and start dockerd): the
# README's compose quickstart verbatim, a mixed batch equal to PEFT, a worker killed mid-job, a Redis crash.
test-compose: install
	deploy/compose-test/run.sh

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

proto: install
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)

lint: install
	$(BIN)/ruff check loraflow services tests bench examples deploy
	$(BIN)/lint-imports --no-cache

demo: install
	$(BIN)/python examples/demo.py

bench: install
	$(BIN)/pip install -q -c requirements.lock -e '.[bench]'
	$(BIN)/python bench/inference.py

up: install
	$(BIN)/loraflow up

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info $(NATIVE_LIB)
