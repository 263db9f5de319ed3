# Developer entry points. `make demo` and `make test` work on a fresh
# Debian 12 machine as root with only python3, git and make installed.

PYTHON ?= python3
VENV ?= .venv
STAMPS := .stamps

VPY := $(VENV)/bin/python
RUFF := $(VENV)/bin/ruff
LINT_PATHS := $(wildcard ovirt_cinder tests bench tools)

# Test tiers; slower tiers append their directories here.
TEST_PATHS := tests/unit tests/functional
PYTEST := $(VPY) -m pytest -q

BENCH_ARGS ?=

# Debian's sanlock binding: there is none on PyPI.
SANLOCK_SO := /usr/lib/python3/dist-packages/sanlock.cpython-311-x86_64-linux-gnu.so

.PHONY: all deps venv test lint demo bench docs releasenotes clean

all: test

deps: $(STAMPS)/deps

venv: $(VENV)/.installed

$(STAMPS)/deps: tools/install-system-deps.sh bindep.txt
	tools/install-system-deps.sh
	@mkdir -p $(STAMPS) && touch $@

# The stamp lives in the venv, so removing .venv rebuilds it.
$(VENV)/.installed: requirements.txt test-requirements.txt setup.cfg | $(STAMPS)/deps
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt -r test-requirements.txt -e .
	$(VPY) -c 'import sanlock' 2>/dev/null || \
		cp $(SANLOCK_SO) "$$($(VPY) -c 'import sysconfig; print(sysconfig.get_path("platlib"))')"
	$(VPY) -c 'import sanlock'
	touch $@

lint: venv
	$(RUFF) check $(LINT_PATHS)

test: deps venv lint
	$(PYTEST) $(TEST_PATHS)

demo: deps venv
	$(VPY) -m ovirt_cinder.demo

bench: deps venv
	$(VPY) bench/engine.py $(BENCH_ARGS)

docs: venv
	$(VPY) -m pip install -q -r doc/requirements.txt
	$(VPY) -m sphinx -W -b html doc/source doc/build/html

releasenotes: venv
	$(VPY) -m pip install -q -r doc/requirements.txt
	$(VPY) -m sphinx -W -b html releasenotes/source releasenotes/build/html

clean:
	rm -rf --one-file-system $(VENV) $(STAMPS) .demo .bench build dist \
		*.egg-info .pytest_cache .ruff_cache doc/build releasenotes/build \
		AUTHORS ChangeLog
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# The VM tier (tests/vm): os-brick's ISCSIConnector in a QEMU guest with a
# full kernel attaches our iSCSI export. tools/vm/build.py builds the
# guest's image into .vm/ (installing what it needs with apt-get) and does
# nothing when it is up to date.
VM_TEST_PATHS := tests/vm

.PHONY: test-vm
test-vm: deps venv
	$(PYTHON) tools/vm/build.py
	$(PYTEST) $(VM_TEST_PATHS)

# A single-host cloud on 127.0.0.1 (tools/cloud/cloud.py): RabbitMQ,
# MariaDB, Keystone, Glance with our store, Cinder with our driver. State,
# logs and the openrc under .cloud/.
.PHONY: cloud cloud-stop test-cloud
CLOUD_PY := .cloud/venv/bin/python
cloud: deps
	$(PYTHON) tools/cloud/cloud.py up

cloud-stop:
	$(PYTHON) tools/cloud/cloud.py down

# The cloud tier: the walkthrough, Tempest's volume API tests with
# cinder-tempest-plugin, and our API-level tests (tests/cloud), all
# against `make cloud`. Leaves the cloud running; `make cloud-stop` stops it.
test-cloud: deps
	$(PYTHON) tools/cloud/cloud.py up --tempest
	. .cloud/openrc && $(CLOUD_PY) tools/cloud/walkthrough.py
	. .cloud/openrc && $(CLOUD_PY) tools/cloud/tempest.py
	. .cloud/openrc && $(CLOUD_PY) -m pytest -q -p no:cacheprovider tests/cloud
