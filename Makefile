# unionfs — every target installs what it needs first.
PYTHON  ?= python3
# 3.17: libfuse 3.17 built from Debian trixie's source into .venv/libfuse (FUSE
# passthrough), falling back to the system's with one message; system: Debian 12's 3.14.
LIBFUSE ?= 3.17
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
APT_PKGS := fuse3 libfuse3-dev pkg-config attr gcc
CASES   ?= 200
SEED    ?= 1
DURATION ?= 60
STRESS_FILES ?= 100000
KILLS   ?= 100

.PHONY: install system-deps test test-passthrough-on test-python-creates test-libfuse314 test-unit test-user test-engines test-images demo lint conformance explain-oracle crash bench stress install-system clean

# System packages: installed with apt only when something is missing.
system-deps:
	@missing=""; \
	command -v fusermount3 >/dev/null 2>&1 || missing="$$missing fuse3"; \
	pkg-config --exists fuse3 2>/dev/null || missing="$$missing libfuse3-dev pkg-config"; \
	command -v getfattr >/dev/null 2>&1 || missing="$$missing attr"; \
	command -v strace >/dev/null 2>&1 || missing="$$missing strace"; \
	command -v cc >/dev/null 2>&1 || missing="$$missing gcc"; \
	if [ "$(LIBFUSE)" = 3.17 ]; then \
		command -v meson >/dev/null 2>&1 || missing="$$missing meson"; \
		command -v ninja >/dev/null 2>&1 || missing="$$missing ninja-build"; \
		command -v dpkg-source >/dev/null 2>&1 || missing="$$missing dpkg-dev"; \
	fi; \
	$(PYTHON) -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"],"Python.h")))' \
		|| missing="$$missing python3-dev"; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml $(wildcard unionfs/fuse/csrc/*) tools/venv.sh tools/build-libfuse.sh | system-deps
	PYTHON=$(PYTHON) tools/venv.sh $(VENV) $(LIBFUSE)
	touch $(STAMP)

install: system-deps $(STAMP)

# Lint; the whole suite (on libfuse 3.17, where passthrough tests demand passthrough);
# the safety suite and a conformance sample with -o passthrough=on; the real-mount
# tests again with the C hook disabled and libfuse making the mount itself (no
# premount), and on the system's libfuse 3.14 (every fallback must keep working); then as an ordinary user, the container engines and
# the image tools.
EXPECT_PASSTHROUGH := $(if $(filter 3.17,$(LIBFUSE)),1,0)
test: install lint
	UNIONFS_EXPECT_PASSTHROUGH=$(EXPECT_PASSTHROUGH) $(PY) -m pytest -q -p no:cacheprovider tests \
		--ignore=tests/engines --ignore=tests/bench --ignore=tests/user --ignore=tests/image_tools
	$(if $(filter 3.17,$(LIBFUSE)),$(MAKE) test-passthrough-on)
	$(MAKE) test-python-creates
	UNIONFS_NO_HOOK=1 UNIONFS_NO_PREMOUNT=1 $(PY) -m pytest -q -p no:cacheprovider tests \
		--ignore=tests/engines --ignore=tests/bench --ignore=tests/conformance --ignore=tests/user \
		--ignore=tests/image --ignore=tests/image_tools --ignore=tests/inspect/test_explain_oracle.py \
		--ignore=tests/crash
	$(if $(filter 3.17,$(LIBFUSE)),$(MAKE) test-libfuse314)
	$(MAKE) test-user
	$(MAKE) test-engines
	$(MAKE) test-images

# With -o passthrough=on: lower files opened read-only are read by the kernel too.
test-passthrough-on: install
	UNIONFS_TEST_OPTIONS=passthrough=on UNIONFS_EXPECT_PASSTHROUGH=$(EXPECT_PASSTHROUGH) \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_safety.py tests/test_passthrough.py \
		tests/conformance/test_unionfs.py

# The conformance sample with every CREATE made by the daemon's Python side, also where
# the C hook would make the file (a directory only in the upper layer).
test-python-creates: install
	UNIONFS_PYTHON_CREATES=1 $(PY) -m pytest -q -p no:cacheprovider \
		tests/conformance/test_unionfs.py -k "random_sample and not in_mode"

# The real-mount tests on the system's libfuse 3.14, in a staged copy with its own venv.
test-libfuse314:
	bash tests/libfuse314/run.sh

# The unit tier and the unprivileged real-mount tests, as an ordinary user.
test-user:
	bash tests/user/run.sh

# Real container engines (podman/buildah) driving unionfs as their mount_program.
test-engines: install
	bash tests/engines/install-deps.sh
	$(PY) -m pytest -q -p no:cacheprovider tests/engines

# The image tools (unionfs image/diff/commit) against real podman, skopeo and umoci.
test-images: install
	bash tests/image_tools/install-deps.sh
	$(PY) -m pytest -q -p no:cacheprovider tests/image_tools

# The core on plain directories: no mount, no root, a few seconds.
test-unit: install
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

demo: install
	$(PY) examples/demo.py

lint: install
	$(VENV)/bin/ruff check unionfs tests examples
	$(VENV)/bin/ruff format --check unionfs tests examples
	$(VENV)/bin/mypy unionfs tests examples

# MODE=redirect_dir=on or MODE=metacopy=on: both sides mounted with that option.
conformance: install
	$(PY) -m tests.conformance --cases $(CASES) --seed $(SEED) $(if $(MODE),--mode $(MODE),)

# kill -9 of the daemon at KILLS points of a mixed workload; prints every inconsistency.
crash: install
	$(PY) -m tests.crash --kills $(KILLS) --seed $(SEED)

bench: install
	$(PY) tests/bench/bench.py $(if $(QUICK),--quick,) $(if $(TRACE),--trace,) $(if $(BENCH_GROUPS),--groups $(BENCH_GROUPS),)
	$(PY) tests/bench/images.py $(if $(QUICK),--quick,)

# unionfs explain against the kernel overlay over more generated cases than make test runs.
explain-oracle: install
	UNIONFS_EXPLAIN_ORACLE_CASES=$(CASES) UNIONFS_EXPLAIN_ORACLE_SEED=$(SEED) \
		$(PY) -m pytest -q -p no:cacheprovider tests/inspect/test_explain_oracle.py

# Load tests, long and big: prints operation counts, errors (must be 0) and the daemon's RSS.
stress: install
	UNIONFS_STRESS_SECONDS=$(DURATION) UNIONFS_STRESS_FILES=$(STRESS_FILES) \
		$(PY) -m pytest -q -p no:cacheprovider -s tests/test_load.py

install-system: install
	install -m 0755 -d /usr/local/sbin
	ln -sf $(abspath $(VENV))/bin/unionfs /usr/local/sbin/unionfs

clean:
	rm -rf $(VENV) *.egg-info build /var/tmp/unionfs-libfuse314
