# Two entry points (see README): `make demo` and `make test`. Each sets itself up idempotently.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.ddfast-installed

.PHONY: setup data demo test perf clean

# torch first (the CPU wheel pinned beside its Triton), then ddfast without build isolation so
# pip does not fetch a second, multi-GB CUDA torch just to compile ddfast._C.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0 "triton==3.7.1; platform_system == 'Linux' and platform_machine == 'x86_64'" numpy tqdm nvidia-ml-py pytest
	$(PIP) install -q --no-build-isolation -e .
	$(PY) -c "import ddfast._C as C; print('ddfast._C built, OpenMP threads:', C.num_threads())"
	touch $(STAMP)

setup: $(STAMP)

data:
	@if ls $(FMNIST_DIR)/train-images-idx3-ubyte* >/dev/null 2>&1; then \
		echo "Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q dataset-fashion-mnist || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; }; \
	else \
		echo "Fashion-MNIST is missing from $(FMNIST_DIR) and apt-get is not available:"; \
		echo "put the four IDX files there or set DDFAST_DATA_DIR"; exit 1; \
	fi

demo: setup data
	$(PY) -m ddfast.env_report
	$(PY) -m ddfast.distill --method gvbsm --dataset fashion-mnist --ipc 10 --segment 50 --recipe fkd --eval-epochs 100 --eval-runs 1 --out runs/demo

test: setup data
	$(PY) -m pytest tests -q

perf: setup
	$(PY) -m pytest perf -q -s

clean:
	rm -rf build *.egg-info ddfast/*.so
