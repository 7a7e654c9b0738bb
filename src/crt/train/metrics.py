"""Run metrics: one JSON line per record, TensorBoard when installed, a PNG of the curves."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from crt.files import write_atomic


class MetricsLog:
    """Appends records ({"step", "split", ...}) to run_dir/metrics.jsonl (which the run's claim
    created, empty).

    resume_step: on resume, records after this step (written by the interrupted run past its
    last checkpoint) are dropped first, so the file reads like one uninterrupted run; `source`
    is the log to take them from when the run continues in a new folder (default: its own).
    A line that does not parse (cut short by a power loss or a full disk) is dropped, and a
    warning says so.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, source: Path | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        source = source or self.path
        if resume_step is not None and source.exists():
            kept = [r for r in read_metrics(source) if r["step"] <= resume_step]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:  # tensorboard is an optional extra
            self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{record['split']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; lines that are not a record (cut short) are skipped, with a warning."""
    records, broken = [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record = {}
        if record is None:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("split"), str):
            records.append(record)
        else:
            broken.append(n)
    if broken:
        warnings.warn(
            f"{path}: skipped {len(broken)} line(s) that are not complete records (line {', '.join(map(str, broken[:3]))}"
            f"{', ...' if len(broken) > 3 else ''}; a write cut short by a crash or a full disk)",
            stacklevel=2,
        )
    return records


def plot_curves(metrics_path: Path, out_png: Path, title: str = "", valid_key: str = "ppl", valid_label: str = "perplexity") -> None:
    """Training loss and a validation score (perplexity, log scale; or an accuracy) against step, written to out_png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "valid"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot([r["step"] for r in train], [r["loss"] for r in train])
    a.set(xlabel="step", ylabel="training loss (nats)", title="train")
    b.plot([r["step"] for r in valid], [r[valid_key] for r in valid], marker="o")
    b.set(xlabel="step", ylabel=valid_label, title="validation", yscale="log" if valid_key == "ppl" else "linear")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)
