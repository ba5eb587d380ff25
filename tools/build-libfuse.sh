#!/bin/sh
# Build libfuse >= 3.17 from Debian trixie's `fuse3` source package into a private prefix.
#
#   tools/build-libfuse.sh PREFIX
#
# Why: FUSE passthrough needs libfuse 3.17; Debian 12 ships 3.14, and trixie's binary
# package needs a newer libc. The source builds here in seconds.
#
# The source is fetched with `apt-get source` through a private apt configuration: its
# own sources list (one trixie deb-src line on the Debian mirror the system already
# uses), its own lists and cache under PREFIX.build. The system's apt sources, lists
# and cache are never touched. Nothing is installed outside PREFIX. Needs meson, ninja
# and dpkg-dev (dpkg-source), which `make install` installs.
#
# Exit status 0 when PREFIX/lib/pkgconfig/fuse3.pc and PREFIX/lib/libfuse3.so.4 exist;
# otherwise non-zero with the reason as the last line on stderr.
set -eu

if [ $# -ne 1 ]; then
	echo "usage: $0 PREFIX" >&2
	exit 2
fi
prefix=$(realpath -m "$1")
work=$prefix.build
suite=trixie

fail() {
	echo "build-libfuse: $*" >&2
	exit 1
}

for tool in apt-get meson ninja dpkg-source; do
	command -v "$tool" >/dev/null 2>&1 || fail "$tool is missing"
done

# The Debian mirror this system already uses for its own release (or UNIONFS_DEBIAN_MIRROR).
mirror=${UNIONFS_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
	codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
	mirror=$(apt-get indextargets --format '$(SITE) $(RELEASE)' 2>/dev/null |
		awk -v c="$codename" '$2 == c { print $1; exit }')
fi
[ -n "$mirror" ] || fail "no Debian mirror found in the system's apt sources (set UNIONFS_DEBIAN_MIRROR)"

rm -rf "$work"
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/src"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" \
	>"$work/apt/sources.list"

apt_private() {
	apt-get -q \
		-o Dir::Etc::SourceList="$work/apt/sources.list" \
		-o Dir::Etc::SourceParts=- \
		-o Dir::State::Lists="$work/apt/lists" \
		-o Dir::Cache="$work/apt/cache" \
		-o APT::Sandbox::User=root \
		"$@"
}

apt_private update >"$work/apt-update.log" 2>&1 ||
	fail "cannot fetch the $suite source index from $mirror (see $work/apt-update.log)"
(cd "$work/src" && apt_private source fuse3) >"$work/apt-source.log" 2>&1 ||
	fail "apt-get source fuse3 failed (see $work/apt-source.log)"

src=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name 'fuse3-*' | head -n 1)
[ -n "$src" ] || fail "no fuse3 source tree after apt-get source"
version=${src##*/fuse3-}
case $version in
3.1[7-9]* | 3.[2-9][0-9]*) ;;
*) fail "$suite has fuse3 $version, older than 3.17" ;;
esac

# Only the library: no examples, tests, fusermount3 or init scripts (the system's
# fusermount3 still serves unprivileged mounts; root mounts without it).
meson setup "$work/build" "$src" --prefix="$prefix" --libdir=lib --buildtype=release \
	-Dexamples=false -Dtests=false -Dutils=false -Duseroot=false \
	-Dinitscriptdir= -Dudevrulesdir="$prefix/udev" >"$work/meson.log" 2>&1 ||
	fail "meson setup failed (see $work/meson.log)"
ninja -C "$work/build" install >"$work/ninja.log" 2>&1 ||
	fail "the libfuse build failed (see $work/ninja.log)"

[ -e "$prefix/lib/pkgconfig/fuse3.pc" ] && [ -e "$prefix/lib/libfuse3.so.4" ] ||
	fail "the build did not produce $prefix/lib/libfuse3.so.4"
rm -rf "$work"
echo "libfuse $version built into $prefix"
