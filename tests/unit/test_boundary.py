"""The core stands on its own: nothing in unionfs.overlay imports the FUSE side."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import unionfs.overlay

CORE = Path(unionfs.overlay.__file__).parent
FORBIDDEN = ("pyfuse3", "unionfs.fuse", "unionfs.options", "unionfs.cli", "unionfs.image")


def _imports(path: Path) -> list[str]:
    out: list[str] = []
    for n in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(n, ast.Import):
            out += [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module:
            out.append(n.module)
    return out


def test_no_core_module_imports_the_fuse_side_or_the_option_parser() -> None:
    modules = sorted(CORE.glob("*.py"))
    assert len(modules) >= 8
    bad = [
        f"{p.name}: {m}"
        for p in modules
        for m in _imports(p)
        if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)
    ]
    assert bad == []


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    """Negative control: the scanner finds each kind of import statement."""
    p = tmp_path / "m.py"
    p.write_text("import pyfuse3\nfrom unionfs.options import Options\nimport os\n")
    assert _imports(p) == ["pyfuse3", "unionfs.options", "os"]


def test_importing_the_whole_core_loads_no_pyfuse3() -> None:
    names = [f"unionfs.overlay.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__"]
    code = (
        "import sys\n"
        + "".join(f"import {n}\n" for n in names)
        + "bad = [m for m in sys.modules if m == 'pyfuse3' or m.startswith(('unionfs.fuse', 'unionfs.options'))]\n"
        + "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
