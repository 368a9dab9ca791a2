# caffe2metal: `make convert [MODEL=deploy.prototxt WEIGHTS=x.caffemodel OUT=dir]`, `make test`
# (everything; what CI runs), `make test-fast` (all but the tests marked slow),
# `make check` (ruff and mypy).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast check convert proto bench fuzz clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The edit loop: everything but the tests marked slow (real models at full cost, fuzz runs,
# the wheel build); about a minute on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Lint and type-check (configured in pyproject.toml).
check: $(STAMP)
	$(BIN)/ruff check caffe2metal tools tests
	$(BIN)/mypy caffe2metal

# Without MODEL: build the built-in MobileNet-SSD-style example, convert and verify it.
# With MODEL (WEIGHTS, OUT optional): convert and verify that model the same way.
convert: $(STAMP)
ifdef MODEL
	$(BIN)/caffe2metal convert $(MODEL) $(WEIGHTS) $(if $(OUT),-o $(OUT)) --verify
else
	$(BIN)/caffe2metal example build/example
	$(BIN)/caffe2metal convert build/example/mobilenet_ssd_example.prototxt $(if $(OUT),-o $(OUT)) --verify
endif

# Speed report of issues 5 and 11 (VGG16-BN convert vs the I/O floor, convert --verify's time
# and memory, MobileNet-SSD start-up and `run` vs OpenCV); builds its models once under
# build/bench/ and writes build/bench/latest.md.
bench: $(STAMP)
	$(BIN)/python -m tools.bench

# Fuzz inspect + convert with broken and hostile files (issue 6) for FUZZ_SECONDS;
# prints the number of inputs run; failing inputs are saved under build/fuzz/crashes/.
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	$(BIN)/python -m tools.fuzz --seconds $(FUZZ_SECONDS) --crashes build/fuzz/crashes

# Regenerate proto/caffe_pb2.py with the pinned protoc (grpcio-tools).
proto: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,proto]'
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto proto/caffe.proto

clean:
	rm -rf $(VENV) build out .pytest_cache
