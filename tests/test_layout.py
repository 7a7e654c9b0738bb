"""The package's rooms and who may import whom (docs/architecture.md).

Inference, the models, the layers, the data and the shared modules never import training, so
an edge deployment or a benchmark can load and run a model without the training loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "crt"
# rooms that must not reach into crt.train, and the shared modules at the package root
NO_TRAINING = ["infer", "models", "layers", "data", "checkpoint.py", "runtime.py", "state.py", "files.py", "config.py", "errors.py"]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def files_of(room: str) -> list[Path]:
    target = SRC / room
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


@pytest.mark.parametrize("room", NO_TRAINING)
def test_room_never_imports_training(room):
    files = files_of(room)
    assert files and all(f.is_file() for f in files)
    offenders = {str(f.relative_to(SRC)): sorted(m for m in imported_modules(f) if m == "crt.train" or m.startswith("crt.train.")) for f in files}
    assert not {f: m for f, m in offenders.items() if m}


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from crt.train.loop import train\n    import crt.train.evaluate\n")
    assert imported_modules(f) == {"crt.train.loop", "crt.train.evaluate"}
