#!/usr/bin/env bash
# The real-mount tests again on the other install path: the system's libfuse 3.14
# (LIBFUSE=system), where the C hook binds fuse_session_new and the daemon has no
# FUSE passthrough and no KILLPRIV_V2. `make test` runs the suite on libfuse 3.17;
# this makes sure the fallback keeps working (tests/features.py: the passthrough
# tests then demand the fallback's behaviour, e.g. passthrough=on refused).
#
# The C hook is built in place, so this path needs its own copy of the sources:
# they are staged in a fresh directory with a virtualenv of their own (pyfuse3's
# ordinary build, linked to the system's libfuse). With arguments, pytest runs those
# instead of the default selection.
set -euo pipefail
cd "$(dirname "$0")/../.."
STAGE=${UNIONFS_LIBFUSE314_STAGE:-/var/tmp/unionfs-libfuse314}
PYTHON=${PYTHON:-python3}

rm -rf "$STAGE/src"
mkdir -p "$STAGE/src" "$STAGE/tmp"
tar --exclude=./.venv --exclude=./.git --exclude='*.so' --exclude=__pycache__ \
    --exclude=./build --exclude='*.egg-info' --exclude=./.bench-cache \
    --exclude=./bench-results -cf - . | tar -xf - -C "$STAGE/src"
# The venv is kept between runs (tools/venv.sh updates it); its hook is rebuilt. It is
# the copy's .venv, installed as far as make is concerned, so the tests that run
# `make install` there find nothing to do (instead of building a 3.17 venv over it).
PYTHON=$PYTHON "$STAGE/src/tools/venv.sh" "$STAGE/venv" system >"$STAGE/venv.log" 2>&1 ||
    { cat "$STAGE/venv.log"; exit 1; }
touch "$STAGE/venv/.installed"
ln -s "$STAGE/venv" "$STAGE/src/.venv"
cd "$STAGE/src"
if [ $# -eq 0 ]; then
    set -- tests --ignore=tests/engines --ignore=tests/bench --ignore=tests/user \
        --ignore=tests/unit --ignore=tests/conformance/test_selfcheck.py \
        --ignore=tests/image --ignore=tests/image_tools
fi
exec env UNIONFS_EXPECT_PASSTHROUGH=0 "$STAGE/venv/bin/python" -m pytest -q -p no:cacheprovider \
    --basetemp="$STAGE/tmp/pytest" "$@"
