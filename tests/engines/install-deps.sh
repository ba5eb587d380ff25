#!/usr/bin/env bash
# Install the container engines that tests/engines drives: podman, buildah,
# runc, busybox-static (for the offline base image) and uidmap (newuidmap and
# newgidmap, for rootless podman).
#
# Always exits 0: if installation is impossible (no network, no root, not
# Debian), the pytest session skips with a message naming what is missing
# instead of this script failing the whole target.  Idempotent and fast when
# everything is already present: apt is only touched when a tool is missing.

set -u

missing=""
command -v podman  >/dev/null 2>&1 || missing="$missing podman"
command -v buildah >/dev/null 2>&1 || missing="$missing buildah"
command -v runc    >/dev/null 2>&1 || missing="$missing runc"
command -v newuidmap >/dev/null 2>&1 || missing="$missing uidmap"
# busybox-static ships /bin/busybox as a static binary; a dynamic busybox would
# not run inside an image that has no libc.
if ! dpkg -s busybox-static >/dev/null 2>&1 || [ ! -x /bin/busybox ]; then
    missing="$missing busybox-static"
fi
# The reference build uses the kernel overlay; fuse-overlayfs is not needed
# by the tests, but the fusermount3 helper is (unmounting FUSE mounts).
command -v fusermount3 >/dev/null 2>&1 || missing="$missing fuse3"

if [ -z "$missing" ]; then
    echo "install-deps: podman, buildah, runc, busybox-static, uidmap already installed"
    exit 0
fi

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: cannot install$missing (need root and apt-get); engine tests will skip" >&2
    exit 0
fi

echo "install-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
# Other processes on the machine may hold the dpkg lock: wait for it rather
# than failing at once.
APT_OPTS="-o DPkg::Lock::Timeout=300"
if ! apt-get $APT_OPTS update -qq; then
    echo "install-deps: apt-get update failed; engine tests may skip" >&2
fi
# --no-install-recommends keeps it small, but podman needs a few of its
# recommends to work offline here (conmon is a hard dependency; catatonit and
# slirp4netns are not needed with netns=none, rootless or not).
if ! apt-get $APT_OPTS install -y -qq --no-install-recommends $missing; then
    echo "install-deps: apt-get install$missing failed; engine tests will skip" >&2
fi
exit 0
