#!/usr/bin/env bash
# The three classic overlay puzzles, answered by unionfs explain, trace and check.
# Run as root from the repository (make install first); prints each command and its
# real output, as README.md's "Debugging overlay semantics" shows them.
#
#   1. a deleted file reappears after a layer is removed
#   2. EXDEV on a directory rename
#   3. a chmod -R that copies up gigabytes (and here changes no mode at all)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$PWD/.venv/bin/python}
DIR=${PUZZLES_DIR:-/tmp/unionfs-puzzles}
BIG_MIB=${PUZZLES_BIG_MIB:-256}  # puzzle 3: four files of this size

unionfs() { "$PY" -m unionfs "$@"; }
show() {  # print a command as typed, then run it (its exit status is shown when not 0)
    echo "\$ $*" | sed "s|$DIR/||g; s|$PY -m unionfs|unionfs|"
    local rc=0
    "$@" 2>&1 | sed "s|$DIR/||g" || rc=$?
    [ "$rc" = 0 ] || echo "(exit status $rc)"
    echo
}
show_head() {  # show_head N COMMAND...: the first N lines of its output
    local n=$1
    shift
    echo "\$ $* | head -$n" | sed "s|$DIR/||g"
    "$@" 2>&1 | head -"$n" | sed "s|$DIR/||g"
    echo
}
cleanup() {
    for m in "$DIR"/*/merged; do
        mountpoint -q "$m" 2>/dev/null && { fusermount3 -u "$m" 2>/dev/null || umount -l "$m"; }
    done
    return 0
}
trap cleanup EXIT
cleanup
rm -rf "$DIR"
mkdir -p "$DIR"
cd "$DIR"

stack() {  # stack NAME: NAME/{base,app,upper,work,merged}
    mkdir -p "$1"/{base,app,upper,work,merged}
}
mount_it() {  # mount_it NAME [extra options]
    unionfs -o "lowerdir=$DIR/$1/app:$DIR/$1/base,upperdir=$DIR/$1/upper,workdir=$DIR/$1/work${2:+,$2}" "$DIR/$1/merged"
}

echo "=== 1. a deleted file reappears after a layer is removed"
stack p1
mkdir -p p1/base/etc p1/app/etc
echo "Welcome to base" > p1/base/etc/motd
echo "app config" > p1/app/etc/app.conf
mount_it p1
rm p1/merged/etc/motd
show unionfs explain p1/merged/etc/motd
fusermount3 -u p1/merged
echo "# The upper is dropped (a new container from the same image): only app and base remain."
show unionfs explain -o "lowerdir=$DIR/p1/app:$DIR/p1/base" /etc/motd

echo "=== 2. EXDEV on a directory rename"
stack p2
mkdir -p p2/base/usr/share/doc/pkg p2/app/usr/share/doc/app
for i in $(seq 1 200); do echo "doc $i" > "p2/base/usr/share/doc/pkg/file$i"; done
echo "app doc" > p2/app/usr/share/doc/app/README
mount_it p2 "trace=$DIR/p2/trace.jsonl"
show unionfs explain p2/merged/usr/share/doc --op rename --to p2/merged/usr/share/doc.old
show mv p2/merged/usr/share/doc p2/merged/usr/share/doc.old
sleep 0.5  # the daemon writes its events every 0.1 s
show_head 3 unionfs trace p2/merged
show unionfs trace p2/merged --summary
fusermount3 -u p2/merged

echo "=== 3. a chmod -R that copies up gigabytes"
stack p3
mkdir -p p3/base/opt/data p3/base/opt/bin
for i in 0 1 2 3; do dd if=/dev/zero of="p3/base/opt/data/blob$i" bs=1M count="$BIG_MIB" status=none; done
echo '#!/bin/sh' > p3/base/opt/bin/run
mount_it p3 "trace=$DIR/p3/trace.jsonl"
show unionfs explain p3/merged/opt/data/blob0 --op chmod
show chmod -R a+rX p3/merged/opt
sleep 0.5  # the daemon writes its events every 0.1 s
show unionfs trace p3/merged --summary
show unionfs explain p3/merged/opt/data/blob0
fusermount3 -u p3/merged
show unionfs check "$DIR/p3/app" "$DIR/p3/base" --upper "$DIR/p3/upper"
