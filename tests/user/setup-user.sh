#!/usr/bin/env bash
# The test environment's ordinary user, as a distribution would have it: a user
# with subordinate id ranges (for rootless podman), and /dev/fuse usable by all
# (0666, as Debian's fuse3 package leaves it on a desktop). Idempotent; root only.
set -euo pipefail
USER_NAME=${UNIONFS_TEST_USER:-unionfs-test}
if ! id "$USER_NAME" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash "$USER_NAME"
fi
uid=$(id -u "$USER_NAME")
# 65536 subordinate ids well away from real users, for a rootless container's namespace.
base=$((200000 + (uid % 1000) * 65536))
grep -q "^$USER_NAME:" /etc/subuid 2>/dev/null || echo "$USER_NAME:$base:65536" >>/etc/subuid
grep -q "^$USER_NAME:" /etc/subgid 2>/dev/null || echo "$USER_NAME:$base:65536" >>/etc/subgid
chmod 0666 /dev/fuse
