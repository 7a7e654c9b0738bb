"""Run metrics: one JSON line per record, TensorBoard when installed, a PNG of the curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from crt.train.checkpoint import write_atomic


class MetricsLog:
    """Appends records ({"step", "split", ...}) to run_dir/metrics.jsonl.

    resume_step: on resume, records after this step (written by the interrupted run past its
    last checkpoint) are dropped first, so the file reads like one uninterrupted run.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            write_atomic(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
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
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


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
