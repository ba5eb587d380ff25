"""What the engine tests make podman do, shared by the rootful and rootless tests."""

from __future__ import annotations

from tests.engines.conftest import BASE_IMAGE

# Every step changes what earlier layers made, so the image is only right if
# copy-up, whiteouts, opaque directories and the upper-dir format that
# containers-storage diffs into layers all are.
CONTAINERFILE = f"""\
FROM {BASE_IMAGE}
# 1: files for later steps to change, and a user for the su step.
RUN set -e; \\
    mkdir -p /data/keep /data/gone/deep /data/opaque/sub /data/dir-to-move/inner; \\
    echo one > /data/keep/a; echo two > /data/gone/deep/b; \\
    echo old > /data/opaque/sub/old; echo old2 > /data/opaque/old2; \\
    echo inner > /data/dir-to-move/inner/f; echo file > /data/file-to-dir; \\
    echo 'someuser:x:1000:1000:Some User:/home/someuser:/bin/sh' >> /etc/passwd; \\
    echo 'someuser:x:1000:' >> /etc/group; \\
    mkdir -p /home/someuser; chown 1000:1000 /home/someuser; chmod 0750 /home/someuser
# 2: modify and delete earlier files, hard links (also to a base-image file),
#    a fifo, setuid/setgid files, a directory rename, a file replaced by a dir.
RUN set -e; \\
    echo modified >> /data/keep/a; \\
    rm -rf /data/gone; \\
    ln /data/keep/a /data/keep/hard; \\
    ln /bin/busybox /data/busybox-link; \\
    mkfifo -m 0640 /data/fifo; \\
    cp /bin/busybox /data/suid; chmod 4755 /data/suid; \\
    cp /bin/busybox /data/sgid; chmod 2711 /data/sgid; \\
    rm /bin/vi; \\
    mv /data/dir-to-move /data/dir-moved; \\
    rm /data/file-to-dir; mkdir /data/file-to-dir; echo now-a-dir > /data/file-to-dir/x; \\
    dd if=/bin/busybox of=/data/big bs=4096 count=300 2>/dev/null
# 3: an opaque directory (rm -rf then recreate), rename of a hard-linked file,
#    metadata-only changes to lower files, truncation.
RUN set -e; \\
    rm -rf /data/opaque; mkdir /data/opaque; echo new > /data/opaque/new; \\
    mv /data/keep/a /data/keep/renamed; \\
    chmod 0700 /data/keep; chown 1000:1000 /data/opaque/new; \\
    ln -s ../keep/renamed /data/opaque/link; \\
    truncate -s 100000 /data/big; \\
    echo linked > /data/linked1; ln /data/linked1 /data/linked2; \\
    chmod 0600 /data/dir-moved/inner/f
# 4: a step running as another user (needs allow_other on a FUSE mount).
RUN su someuser -c 'echo hello > /home/someuser/by-su && id -u > /home/someuser/uid && ls /data/opaque > /home/someuser/opaque-listing'
"""

# A container's writes, deletes and renames, on its own files and the image's.
RUN_SCRIPT = r"""
set -e
echo data > /tmp/new; cat /tmp/new
mv /tmp/new /tmp/renamed; test ! -e /tmp/new; cat /tmp/renamed
rm /tmp/renamed; test ! -e /tmp/renamed
# lower-layer files: modify, rename, delete
echo extra >> /etc/passwd; tail -n 1 /etc/passwd
mv /etc/group /etc/group.moved; test ! -e /etc/group; cat /etc/group.moved
rm /bin/ls; test ! -e /bin/ls; echo ls-gone
# a lower directory renamed and deleted, then recreated
mkdir -p /x/y; echo z > /x/y/z
mv /x /x2; cat /x2/y/z
rm -rf /root; test ! -e /root; mkdir /root; ls -A /root | wc -l
# hard link, symlink and fifo inside the container
ln /etc/passwd /etc/passwd.hard; stat -c %h /etc/passwd
ln -s /etc/group.moved /g; cat /g
mkfifo /f; test -p /f; echo fifo-ok
"""
RUN_EXPECTED = [
    "data",
    "data",
    "extra",
    "root:x:0:",
    "ls-gone",
    "z",
    "0",
    "2",
    "root:x:0:",
    "fifo-ok",
    "",
]

# Spot checks of the image built from CONTAINERFILE, from inside a container.
BUILT_SCRIPT = r"""
cat /data/keep/renamed; stat -c '%h %a %U' /data/keep/renamed
test ! -e /data/keep/a && echo a-gone
test ! -e /data/gone && echo gone-gone
ls -A /data/opaque
test -p /data/fifo && echo fifo
stat -c '%a' /data/suid /data/sgid
test ! -e /bin/vi && echo vi-gone
cat /data/dir-moved/inner/f; test ! -e /data/dir-to-move && echo moved
cat /data/file-to-dir/x
stat -c %s /data/big
cat /home/someuser/by-su /home/someuser/uid
stat -c '%U %G' /home/someuser/by-su
cat /home/someuser/opaque-listing
"""
BUILT_EXPECTED = [
    "one",
    "modified",
    "1 644 root",  # the rename copied it up: the kernel breaks the link too
    "a-gone",
    "gone-gone",
    "link",
    "new",
    "fifo",
    "4755",
    "2711",
    "vi-gone",
    "inner",
    "moved",
    "now-a-dir",
    "100000",
    "hello",
    "1000",
    "someuser someuser",
    "link",
    "new",
    "",
]
