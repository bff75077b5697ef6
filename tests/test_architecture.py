"""The layers stay layered: ``loopscribe → training → ml_backend``, and product code never loads benchmarks.

Checked two ways: statically (every import statement of every module, top level or inside a
function) and at run time (what importing the serving path actually pulls in).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A package may import only from itself and from the layers below it.
ALLOWED = {"ml_backend": {"ml_backend"}, "training": {"training", "ml_backend"},
           "loopscribe": {"loopscribe", "training", "ml_backend"}}
PRODUCT_FORBIDDEN = ("loopscribe.bench",)  # benchmarks are imported by the CLI's dispatcher only


def imports_of(path: Path, package: str) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # "a.b.c" (or the package "a.b.__init__"): level 1 is "a.b", level 2 is "a"
                prefix = ".".join(module.split(".")[: -node.level])
                names.add(f"{prefix}.{node.module}" if node.module else prefix)
                if not node.module:
                    names |= {f"{prefix}.{a.name}" for a in node.names}
            else:
                names.add(node.module or "")
    return names


def test_the_import_reader_resolves_relative_imports():
    bench = imports_of(ROOT / "loopscribe" / "bench" / "__init__.py", "loopscribe")
    engine = imports_of(ROOT / "loopscribe" / "bench" / "engine.py", "loopscribe")
    assert "ml_backend.settings" in bench and "loopscribe.demo" in engine and "loopscribe.bench.synth" in engine


@pytest.mark.parametrize("package", list(ALLOWED))
def test_packages_depend_only_downward(package):
    wrong = []
    for path in (ROOT / package).rglob("*.py"):
        for name in imports_of(path, package):
            top = name.split(".")[0]
            if top in ALLOWED and top not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, wrong


def test_product_code_never_imports_benchmarks():
    offenders = []
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            if "bench" in path.relative_to(ROOT).parts or path.name == "cli.py":
                continue  # the benchmarks themselves; the CLI's lazy dispatcher (checked below)
            offenders += [f"{path.relative_to(ROOT)} imports {n}" for n in imports_of(path, package)
                          if n.startswith(PRODUCT_FORBIDDEN)]
    assert not offenders, offenders
    cli_imports = imports_of(ROOT / "loopscribe" / "cli.py", "loopscribe")
    assert {n for n in cli_imports if n.startswith("loopscribe.bench")} == {"loopscribe.bench"}, cli_imports


def test_serving_path_loads_no_benchmark_or_synthetic_speech_code():
    """What gunicorn's ``loopscribe.wsgi`` imports (the backend with jobs and dashboard), in a fresh interpreter."""
    code = ("import json, sys; import loopscribe.backend, loopscribe.stack, loopscribe.proxy; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('loopscribe', 'training')))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       cwd=ROOT).stdout)
    assert not [m for m in loaded if m.startswith(("loopscribe.bench", "loopscribe.demo"))], loaded
    wsgi = imports_of(ROOT / "loopscribe" / "wsgi.py", "loopscribe")
    assert wsgi <= {"loopscribe.backend"}, wsgi
    backend = {m for m in imports_of(ROOT / "loopscribe" / "backend.py", "loopscribe")
               if m.partition(".")[0] in ("loopscribe", "ml_backend", "training") and m != "loopscribe"}
    assert backend <= {"ml_backend.app", "ml_backend.settings", "loopscribe.jobs", "loopscribe.dashboard",
                       "loopscribe.labelstudio", "training.export"}, backend
