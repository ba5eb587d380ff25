#!/usr/bin/env bash
# A container by hand: a three-layer busybox root, merged by unionfs, entered
# with unshare + chroot.
#
#   sudo bash examples/chroot-demo.sh          # uses .venv/bin/unionfs
#   UNIONFS=/usr/bin/fuse-overlayfs bash examples/chroot-demo.sh   # any compatible program
#
# Needs root, /dev/fuse, fusermount3 and busybox-static (/bin/busybox must be
# a static binary: nothing else from the host is copied into the root).
# Everything lives in a temp dir that the EXIT trap unmounts and removes.

set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
UNIONFS=${UNIONFS:-$here/../.venv/bin/unionfs}
BUSYBOX=${BUSYBOX:-/bin/busybox}

die() { echo "chroot-demo: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (mount namespaces, chroot, mknod)"
[ -x "$UNIONFS" ] || die "no unionfs at $UNIONFS (run 'make install' first)"
[ -x "$BUSYBOX" ] || die "no $BUSYBOX (apt-get install busybox-static)"
command -v fusermount3 >/dev/null || die "fusermount3 missing (apt-get install fuse3)"

tmp=$(mktemp -d /tmp/chroot-demo.XXXXXX)
mnt=$tmp/merged

cleanup() {
    # The proc/dev/sys mounts lived in the child's private mount namespace and
    # vanished with it; only the union mount itself is visible here.
    if grep -qs " $mnt " /proc/mounts; then
        fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM   # run the EXIT trap on ^C / kill too

section() { printf '\n=== %s\n' "$*"; }

# ---------------------------------------------------------------- layers
# base: busybox and a symlink per applet, the skeleton of a root filesystem.
base=$tmp/layers/0-base
mkdir -p "$base"/{bin,etc,proc,sys,dev,tmp,root,var/log}
chmod 1777 "$base/tmp"
cp "$BUSYBOX" "$base/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$base/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$base/etc/passwd"
echo 'root:x:0:' > "$base/etc/group"
echo 'base layer' > "$base/etc/motd"
mkdir -p "$base/var/log/old"
echo 'log from the base layer' > "$base/var/log/old/base.log"

# app: adds files and overrides one from the base.
app=$tmp/layers/1-app
mkdir -p "$app"/{etc,app}
echo 'app layer (hides the base motd)' > "$app/etc/motd"
cat > "$app/app/hello.sh" <<'EOF'
#!/bin/sh
echo "hello from $(hostname) as $(id -un), pid $$"
EOF
chmod 755 "$app/app/hello.sh"

# cleanup layer, in the kernel overlay format: a 0/0 character device is a
# whiteout (deletes /bin/vi) and trusted.overlay.opaque=y hides everything
# the lower layers had in /var/log.
clean=$tmp/layers/2-cleanup
mkdir -p "$clean"/{bin,var/log}
mknod "$clean/bin/vi" c 0 0
python3 -c 'import os, sys; os.setxattr(sys.argv[1], "trusted.overlay.opaque", b"y")' "$clean/var/log"
echo 'fresh log dir' > "$clean/var/log/README"

mkdir -p "$tmp/upper" "$tmp/work" "$mnt"

# ---------------------------------------------------------------- mount
section "mount: $(basename "$UNIONFS") -o lowerdir=2-cleanup:1-app:0-base,upperdir=upper,workdir=work merged"
# unionfs daemonizes and returns once the mount is ready (like fuse-overlayfs).
"$UNIONFS" -o "lowerdir=$clean:$app:$base,upperdir=$tmp/upper,workdir=$tmp/work" "$mnt"
grep " $mnt " /proc/mounts | sed "s#$tmp#\$TMP#g"

# ---------------------------------------------------------------- run
section "inside: unshare --mount --pid --fork + chroot"
# The inner shell makes its mount namespace private (so nothing propagates
# back), mounts /proc for the new PID namespace, /dev and /sys, and chroots.
unshare --mount --pid --fork --uts -- /bin/sh -eu -c '
    mnt=$1
    mount --make-rprivate /
    hostname demo-container
    mount -t proc proc "$mnt/proc"
    mount --rbind /dev "$mnt/dev"
    mount -t sysfs -o ro sysfs "$mnt/sys"
    exec chroot "$mnt" /bin/sh -c "
        export PATH=/bin HOME=/root
        echo \"motd: \$(cat /etc/motd)\"
        /app/hello.sh
        echo \"processes in this PID namespace: \$(ps -o pid= | wc -l)\"
        echo \"mounts: \$(cut -d\" \" -f3 /proc/mounts | sort -u | tr \"\\n\" \" \")\"
        test -e /bin/vi && echo \"vi present\" || echo \"vi deleted by the whiteout\"
        echo \"/var/log: \$(ls /var/log)\"
        echo written > /root/new-file
        mv /etc/motd /etc/motd.renamed
        rm /app/hello.sh
        rm -r /var/log
        mkdir /var/log && echo again > /var/log/new.log
        echo \"after changes: /etc has \$(ls /etc | tr \"\\n\" \" \")\"
        echo \"devices: \$(ls /dev/null /dev/zero | tr \"\\n\" \" \") sysfs kernel: \$(test -d /sys/kernel && echo yes)\"
    "
' demo "$mnt"

# ---------------------------------------------------------------- results
section "upper dir after the run (lower layers are untouched)"
(cd "$tmp/upper" && find . -mindepth 1 | sort | while read -r p; do
    if [ -c "$p" ]; then kind="whiteout"; elif [ -d "$p" ]; then kind="dir"; else kind="file"; fi
    opaque=$(python3 -c 'import os, sys
try: print(" (opaque)" if os.getxattr(sys.argv[1], "trusted.overlay.opaque") == b"y" else "")
except OSError: print("")' "$p")
    echo "  $p  [$kind]$opaque"
done)
echo "lower 1-app still has hello.sh: $(test -e "$app/app/hello.sh" && echo yes || echo no)"
echo "merged view from the host: $(ls "$mnt/etc" | tr '\n' ' ')"

section "unmount"
fusermount3 -u "$mnt"
for _ in $(seq 50); do grep -qs " $mnt " /proc/mounts || break; sleep 0.1; done
grep -qs " $mnt " /proc/mounts && die "still mounted after fusermount3 -u"
echo "unmounted; demo done"
