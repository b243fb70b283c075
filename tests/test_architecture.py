"""The package keeps a straight path (docs/architecture.md): no import cycles among its modules, no
module importing another's private names, and the command line starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np

import napari_sam2

ROOT = Path(napari_sam2.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        mods[".".join(["napari_sam2", *parts])] = path
    return mods


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """Edges module -> imported module (package-internal), and imports of private names."""
    edges: dict[str, set[str]] = {}
    private = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("napari_sam2"):
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                imported = full if full in mods else target
                if imported != name:
                    edges.setdefault(name, set()).add(imported)
                if alias.name.startswith("_") and not alias.name.startswith("__") and full not in mods:
                    private.append((name, full))
    return edges, private


def test_no_import_cycles_and_no_private_imports():
    mods = _modules()
    edges, private = _imports(mods)
    assert not private, f"modules importing private names of others: {private}"
    cycles, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for dep in edges.get(module, ()):
            if dep not in mods:
                continue
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                # a package's __init__ re-exporting its own submodules is not a cycle of layers
                if not any(b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):
                    cycles.append(" -> ".join(cycle))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[module] = "done"

    for module in sorted(mods):
        if module not in state:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_the_command_line_parses_without_importing_torch():
    code = "import sys, napari_sam2.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT.parent), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False"


def test_the_video_predictor_and_its_test_double_offer_the_protocol(random_checkpoint):
    from fakes import GroundTruthPredictor

    from napari_sam2.predictor.video import build_video_predictor
    from napari_sam2.propagation import VideoPredictorLike

    real = build_video_predictor("sam2.1_hiera_tiny", checkpoint=random_checkpoint, device="cpu", image_size=256)
    assert isinstance(real, VideoPredictorLike)
    assert isinstance(GroundTruthPredictor(np.zeros((2, 4, 4), np.uint16)), VideoPredictorLike)
    assert not isinstance(object(), VideoPredictorLike)


def test_the_annotator_behind_the_widget_imports_no_qt():
    """The widget's logic (prompts, the worker, the session) runs and is tested without a Qt binding."""
    code = ("import sys, napari_sam2.annotator, napari_sam2.annotator.engine; "
            "qt = sorted(m for m in sys.modules if m.split('.')[0] in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6')); "
            "print(qt); sys.exit(1 if qt else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"napari_sam2.annotator imports Qt: {done.stdout} {done.stderr[-2000:]}"
