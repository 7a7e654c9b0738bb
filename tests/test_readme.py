"""The README's Python example runs as written."""

import re
from pathlib import Path


def test_readme_python_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (8, 35, 10_000)
    assert namespace["state"].memory.shape == (8, 256)


def test_every_python_path_the_docs_name_resolves():
    """`crt.module.Name` in the README and docs/results resolves as written (a reader pastes it)."""
    import importlib

    root = Path(__file__).resolve().parents[1]
    texts = [root / "README.md", *sorted((root / "docs" / "results").glob("*.md"))]
    paths = sorted({p for f in texts for p in re.findall(r"`(crt(?:\.\w+)+)", f.read_text())})
    assert "crt.infer.quantize_int8" in paths
    for path in paths:
        parts = path.split(".")
        obj, module = None, len(parts)
        while obj is None:  # the longest prefix that is a module; the rest are attributes
            try:
                obj = importlib.import_module(".".join(parts[:module]))
            except ModuleNotFoundError:
                module -= 1
        for name in parts[module:]:
            assert hasattr(obj, name), f"{path}: {'.'.join(parts[:module])} has no {name}"
            obj = getattr(obj, name)
