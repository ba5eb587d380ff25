#!/usr/bin/env bash
# Install what tests/image_tools drives: podman (with runc and conmon), skopeo,
# umoci, and busybox-static for the offline base image.
#
# Always exits 0: where installing is impossible (no network, no root, not
# Debian) the tests skip with a message naming what is missing. Fast when
# everything is there: apt is touched only for a missing tool.

set -u

missing=""
for tool in podman skopeo umoci runc; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if ! dpkg -s busybox-static >/dev/null 2>&1 || [ ! -x /bin/busybox ]; then
    missing="$missing busybox-static"
fi
command -v fusermount3 >/dev/null 2>&1 || missing="$missing fuse3"

if [ -z "$missing" ]; then
    echo "install-deps: podman, skopeo, umoci, runc, busybox-static already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: cannot install$missing (need root and apt-get); image tool tests will skip" >&2
    exit 0
fi
echo "install-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
APT_OPTS="-o DPkg::Lock::Timeout=300"
apt-get $APT_OPTS update -qq || echo "install-deps: apt-get update failed" >&2
apt-get $APT_OPTS install -y -qq --no-install-recommends $missing \
    || echo "install-deps: apt-get install$missing failed; image tool tests will skip" >&2
exit 0
