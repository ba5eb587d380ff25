#!/usr/bin/env bash
# unionfs inside a container: the "integration tests in a privileged CI
# container" setup, with the fewest flags that work.
#
#   sudo bash examples/ci-container.sh              # the core real-mount tests
#   sudo bash examples/ci-container.sh tests/test_merge.py -x   # other pytest arguments
#   sudo bash examples/ci-container.sh -- CMD ARGS  # any command instead
#   CI_CONTAINER_FLAGS=--privileged sudo bash examples/ci-container.sh
#
# What the container needs (rootful podman; docker takes the same flags):
#
#   --device /dev/fuse      the FUSE device; without it nothing can mount.
#   --cap-add SYS_ADMIN     mount(2) and umount(2) (podman's default seccomp
#                           profile allows them once this capability is
#                           there), and the trusted.* xattrs that hold the
#                           overlay's opaque markers: only CAP_SYS_ADMIN in the
#                           host's user namespace may write those, so a rootful
#                           container without --userns/--uidmap. In a user
#                           namespace unionfs keeps its markers in
#                           user.overlay.* instead, as the kernel's userxattr.
#   --privileged            instead of the two above: all devices and caps.
#
#   On hosts with AppArmor (Ubuntu) add --security-opt apparmor=unconfined,
#   with SELinux --security-opt label=disable: their container profiles deny
#   mount(2) even to a process with CAP_SYS_ADMIN.
#
# The upper and work directories go on a tmpfs (or a volume), not on the
# container's own root: that root is a kernel overlay, and an overlay refuses
# to be an upper layer (the kernel's overlay says "not supported as upperdir";
# unionfs cannot make its whiteouts there, see README "Inside a container").
# Lower layers may live anywhere, the overlay root included. The tmpfs is
# mounted dev,suid so that device nodes and setuid files behave as on the
# host: unionfs mounts nodev/nosuid when a layer lives on a nodev/nosuid
# filesystem (podman's --tmpfs default).
#
# The container's root is a directory assembled here (a skeleton with /etc
# files copied from the host), mounted by podman as an overlay (--rootfs
# DIR:O), with the host's /usr, the Python that built .venv and this checkout
# bind-mounted read-only. Nothing is downloaded and nothing is left in the
# image store; the EXIT trap removes the skeleton.

set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
python=$repo/.venv/bin/python

die() { echo "ci-container: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (rootful podman)"
command -v podman >/dev/null || die "podman is not installed"
[ -x "$python" ] || die "no $python (run 'make install' first)"
[ -e /dev/fuse ] || die "no /dev/fuse on this host"

# The core of the real-mount suite: merging, copy-up, namespace changes,
# safety, and what the kernel allows on an overlay root.
tests=(
    tests/test_merge.py
    tests/test_copyup.py
    tests/test_namespace.py
    tests/test_safety.py
    tests/engines/overlay_root_checks.py
)
if [ "${1:-}" = "--" ]; then
    shift
    cmd=("$@")
else
    [ $# -gt 0 ] && tests=("$@")
    cmd=("$python" -m pytest -q -p no:cacheprovider --basetemp=/scratch/pytest "${tests[@]}")
fi

# The Python the venv was made from, wherever it lives (/usr, pyenv, ...).
base=$("$python" -c 'import sys; print(sys.base_prefix)')

tmp=$(mktemp -d -t ci-container.XXXXXX)
trap '{ set +x; } 2>/dev/null; rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM
root=$tmp/rootfs
mkdir -p "$root"/{etc,tmp,proc,sys,dev,run,root,var/tmp,scratch}
chmod 1777 "$root/tmp" "$root/var/tmp"
binds=(-v /usr:/usr:ro)
for d in bin sbin lib lib32 lib64 libx32; do
    if [ -L "/$d" ]; then
        ln -s "$(readlink "/$d")" "$root/$d"        # merged /usr (Debian 12)
    elif [ -d "/$d" ]; then
        binds+=(-v "/$d:/$d:ro")
    fi
done
for f in passwd group ld.so.cache; do
    [ -e "/etc/$f" ] && cp "/etc/$f" "$root/etc/"
done
case "$base/" in
    /usr/*) ;;
    *) binds+=(-v "$base:$base:ro") ;;
esac
binds+=(-v "$repo:$repo:ro")

# Word splitting of CI_CONTAINER_FLAGS is wanted: it holds flags.
# shellcheck disable=SC2086
flags=(${CI_CONTAINER_FLAGS:---device /dev/fuse --cap-add SYS_ADMIN})

set -x
podman run --rm --network none \
    "${flags[@]}" \
    --tmpfs /scratch:rw,exec,dev,suid \
    "${binds[@]}" \
    --workdir "$repo" \
    --env PYTHONDONTWRITEBYTECODE=1 \
    --rootfs "$root:O" \
    /bin/sh -c 'echo "root filesystem: $(stat -f -c %T /), /scratch: $(stat -f -c %T /scratch)"; exec "$@"' \
    sh "${cmd[@]}"
