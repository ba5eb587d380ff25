#!/usr/bin/env bash
# Run the unit tier and the unprivileged real-mount tests as an ordinary user;
# with arguments, run that command instead (python means the staged one), e.g.
#   tests/user/run.sh python -m tests.conformance --sides userns-kernel,unionfs
#
# The checkout and the project's virtualenv may sit where that user cannot
# read (a pyenv Python under /root, a clone in root's home), so the sources
# are staged in a fresh world-readable directory with a virtualenv of Debian's
# own python3, built anew on every run. Anything from an earlier run is removed first.
set -euo pipefail
cd "$(dirname "$0")/../.."
USER_NAME=${UNIONFS_TEST_USER:-unionfs-test}
STAGE=${UNIONFS_USER_STAGE:-/var/tmp/unionfs-user-tests}
SYS_PYTHON=/usr/bin/python3

missing=""
[ -x "$SYS_PYTHON" ] || missing="$missing python3"
$SYS_PYTHON -c 'import venv, ensurepip' 2>/dev/null || missing="$missing python3-venv"
$SYS_PYTHON -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"],"Python.h")))' 2>/dev/null \
    || missing="$missing python3-dev"
command -v runuser >/dev/null || missing="$missing util-linux"
if [ -n "$missing" ]; then
    echo "installing system packages:$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi

bash tests/user/setup-user.sh
rm -rf "$STAGE"
mkdir -p "$STAGE/src" "$STAGE/tmp"
tar --exclude=./.venv --exclude=./.git --exclude=./.bench-cache --exclude=./bench-results --exclude='*.so' --exclude=__pycache__ \
    --exclude=./build --exclude='*.egg-info' -cf - . | tar -xf - -C "$STAGE/src"
$SYS_PYTHON -m venv "$STAGE/venv"
"$STAGE/venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$STAGE/venv/bin/python" -m pip install -q -e "$STAGE/src" pytest pytest-trio pytest-timeout \
    >"$STAGE/pip.log" 2>&1 || { cat "$STAGE/pip.log"; exit 1; }
# A directory the user may write but does not own, for the "upper not owned" check.
mkdir -m 0777 "$STAGE/not-owned"
chmod -R a+rX "$STAGE"
chown "$USER_NAME:" "$STAGE/tmp"
cd "$STAGE/src"
if [ $# -eq 0 ]; then
    set -- python -m pytest -q -p no:cacheprovider --basetemp="$STAGE/tmp/pytest" tests/unit tests/user
fi
[ "$1" = python ] && set -- "$STAGE/venv/bin/python" "${@:2}"
exec runuser -u "$USER_NAME" -- env -i HOME="$(getent passwd "$USER_NAME" | cut -d: -f6)" \
    PATH="$STAGE/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin" UNIONFS_NOT_OWNED="$STAGE/not-owned" \
    TMPDIR="$STAGE/tmp" "$@"
