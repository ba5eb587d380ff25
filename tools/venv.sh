#!/bin/sh
# Create (or update) a virtualenv with unionfs installed for development.
#
#   tools/venv.sh VENV LIBFUSE        LIBFUSE: 3.17 or system
#
# 3.17: build libfuse 3.17 from Debian trixie's source into VENV/libfuse
#   (tools/build-libfuse.sh), build pyfuse3 from its source against it (rpath to
#   VENV/libfuse/lib), and build unionfs's C hook against the same library, so the
#   daemon loads exactly one libfuse. If any step fails (no network, say), this falls
#   back to the system's libfuse with one clear message, and records why.
# system: the system's libfuse (3.14 on Debian 12) and pyfuse3's ordinary build.
#
# What was installed is recorded in VENV/libfuse.json ({"wanted", "libfuse", "why"});
# the passthrough tests read it (tests/test_passthrough.py).
set -eu

if [ $# -ne 2 ] || { [ "$2" != 3.17 ] && [ "$2" != system ]; }; then
	echo "usage: $0 VENV 3.17|system" >&2
	exit 2
fi
venv=$1
wanted=$2
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip

prefix=$(realpath -m "$venv/libfuse")

# Whether the venv's pyfuse3 is linked to a libfuse under $1.
pyfuse3_links() {
	for so in "$venv"/lib/python*/site-packages/pyfuse3/*.so; do
		[ -e "$so" ] && ldd "$so" | grep -q "=> $1" && return 0
	done
	return 1
}
got=system
why=""
if [ "$wanted" = 3.17 ]; then
	if [ ! -e "$prefix/lib/libfuse3.so.4" ]; then
		log=$(realpath -m "$venv/build-libfuse.log")
		if ! "$here/build-libfuse.sh" "$prefix" >"$log" 2>&1; then
			why=$(tail -n 1 "$log")
			rm -rf "$prefix"
		fi
	fi
	if [ -e "$prefix/lib/libfuse3.so.4" ]; then
		# pyfuse3 from source, linked to the private libfuse (found at run time by rpath).
		if pyfuse3_links "$prefix/lib/"; then
			got=$(PKG_CONFIG_PATH="$prefix/lib/pkgconfig" pkg-config --modversion fuse3)
		elif PKG_CONFIG_PATH="$prefix/lib/pkgconfig" LDFLAGS="-Wl,-rpath,$prefix/lib" \
			$pip install -q --no-binary pyfuse3 --no-cache-dir --force-reinstall --no-deps \
			"pyfuse3>=3.3"; then
			got=$(PKG_CONFIG_PATH="$prefix/lib/pkgconfig" pkg-config --modversion fuse3)
		else
			why="pyfuse3 did not build against libfuse in $prefix"
		fi
	fi
fi

# The C hook is built in place (an editable install): drop a build made against
# another libfuse, or setuptools would keep it as up to date.
rm -f "$repo"/unionfs/fuse/_fusehook*.so

if [ "$got" = system ]; then
	if [ "$wanted" = 3.17 ]; then
		echo "unionfs: could not build libfuse 3.17 ($why)." >&2
		echo "unionfs: falling back to the system's libfuse $(pkg-config --modversion fuse3):" \
			"no FUSE passthrough and no KILLPRIV_V2; the passthrough tests will fail." >&2
	fi
	if pyfuse3_links "$prefix/lib/"; then
		# A pyfuse3 built earlier against the private libfuse must go.
		$pip install -q --force-reinstall --no-deps "pyfuse3>=3.3"
	fi
	# compat: the source tree as a plain path in a .pth; setuptools' default import-hook
	# finder costs every start of the interpreter (and so every mount) about 25 ms.
	(cd "$repo" && $pip install -q -e '.[dev]' --config-settings editable_mode=compat)
	got=$(pkg-config --modversion fuse3)
else
	# The C hook against the same libfuse as pyfuse3: its headers first, its library
	# first, and the rpath.
	(cd "$repo" && CPPFLAGS="-I$prefix/include/fuse3" \
		LDFLAGS="-L$prefix/lib -Wl,-rpath,$prefix/lib" $pip install -q -e '.[dev]' --config-settings editable_mode=compat)
fi

# Bytecode now, as an installed package has it: where the environment forbids writing it at
# run time (PYTHONDONTWRITEBYTECODE), every mount would compile the package again.
"$venv/bin/python" -m compileall -q "$repo/unionfs" >/dev/null

"$venv/bin/python" - "$venv/libfuse.json" "$wanted" "$got" "$why" <<'EOF'
import json, sys
path, wanted, got, why = sys.argv[1:]
with open(path, "w") as f:
    json.dump({"wanted": wanted, "libfuse": got, "why": why}, f)
    f.write("\n")
EOF
echo "unionfs: $venv uses libfuse $got"
