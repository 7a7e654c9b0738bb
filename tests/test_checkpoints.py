"""Damaged and hand-edited checkpoints: every command that reads one says what is wrong in one
line, exits 2, and leaves the checkpoint as it was."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, refused, snapshot

COMMANDS = [("eval",), ("generate", "--max-new-tokens", "2"), ("export", "--format", "onnx", "--out", "x.onnx", "--no-int8")]


@pytest.fixture
def run(tmp_path, monkeypatch, tiny_runs) -> Path:
    monkeypatch.chdir(tmp_path)
    return Path(shutil.copytree(tiny_runs["words"], tmp_path / "run"))


def edit_config(run: Path, change) -> Path:
    folder = run / "checkpoints" / "step-0000004"
    meta = json.loads((folder / "config.json").read_text())
    change(meta)
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


def check_refused(capsys, run: Path, *needles: str) -> None:
    before = snapshot(run)
    for command in COMMANDS:
        refused(cli(capsys, command[0], "--checkpoint", str(run), *command[1:]), *needles)
    refused(cli(capsys, "train", "--resume", str(run), "--max-steps", "6", "--no-progress"), *needles)
    assert snapshot(run) == before and not Path("x.onnx").exists()


@pytest.mark.parametrize("field, value", [("d_model", "wide"), ("n_layer", 1.5), ("tie_weights", "yes"), ("dropout", None), ("arch", 3)])
def test_a_model_field_of_the_wrong_type(capsys, run, field, value):
    edit_config(run, lambda m: m["model"].__setitem__(field, value))
    check_refused(capsys, run, "checkpoint config", field, "damaged")


def test_a_train_field_of_the_wrong_type_or_range(capsys, run):
    edit_config(run, lambda m: m["train"].__setitem__("batch_size", [4]))
    check_refused(capsys, run, "batch_size expects an integer", "damaged")


@pytest.mark.parametrize("section", ["model", "train", "sha256"])
def test_a_section_that_is_not_a_table(capsys, run, section):
    edit_config(run, lambda m: m.__setitem__(section, ["not", "a", "table"]))
    check_refused(capsys, run, "config.json")


def test_an_edited_vocabulary_is_caught(capsys, run):
    """A permuted vocabulary (same length) used to make generate and score print wrong words."""
    edit_config(run, lambda m: m.__setitem__("vocab", m["vocab"][1:] + m["vocab"][:1]))
    check_refused(capsys, run, "vocab", "SHA-256 differs")
    edit_config(run, lambda m: m.__setitem__("vocab", m["vocab"] + ["extra"]))
    check_refused(capsys, run, "vocab")
    edit_config(run, lambda m: m.__setitem__("vocab", m["vocab"][:-1] + [m["vocab"][0]]))
    check_refused(capsys, run, "distinct strings")


def test_an_old_checkpoint_without_the_vocabulary_hash_still_loads_when_it_fits(capsys, run):
    edit_config(run, lambda m: m["sha256"].pop("vocab"))
    rc, out, err = cli(capsys, "eval", "--checkpoint", str(run))
    assert rc == 0 and "ppl" in out, err
    edit_config(run, lambda m: m.__setitem__("vocab", m["vocab"] + ["extra"]))  # a length the model does not have
    check_refused(capsys, run, "vocab", "entries")


def rewrite_trainer(run: Path, content) -> None:
    folder = run / "checkpoints" / "step-0000004"
    torch.save(content, folder / "trainer.pt")
    digest = hashlib.sha256((folder / "trainer.pt").read_bytes()).hexdigest()
    edit_config(run, lambda m: m["sha256"].__setitem__("trainer.pt", digest))  # a valid checkpoint in every other way


@pytest.mark.parametrize(
    "content, needle",
    [
        ([1, 2, 3], "holds a list"),
        ({"step": 4}, "lacks or mangles"),
        ("step", "holds a str"),
    ],
)
def test_a_trainer_state_of_the_wrong_content(capsys, run, content, needle):
    rewrite_trainer(run, content)
    before = snapshot(run)
    refused(cli(capsys, "train", "--resume", str(run), "--max-steps", "6", "--no-progress"), "trainer.pt", needle, "damaged")
    assert snapshot(run) == before


def test_a_trainer_state_with_a_foreign_optimizer(capsys, run):
    trainer = torch.load(run / "checkpoints" / "step-0000004" / "trainer.pt", weights_only=True)
    trainer["optimizer"] = {"state": {}, "param_groups": [{"params": [0]}]}  # one group of one tensor: another model's
    rewrite_trainer(run, trainer)
    before = snapshot(run)
    refused(cli(capsys, "train", "--resume", str(run), "--max-steps", "6", "--no-progress"), "does not hold this run's trainer state", "damaged")
    assert snapshot(run) == before


def test_latest_naming_nothing_and_a_truncated_weights_file(capsys, run):
    (run / "checkpoints" / "latest").write_text("step-0000099\n")
    check_refused(capsys, run, "names step-0000099, which is missing")
    (run / "checkpoints" / "latest").write_text("step-0000004\n")
    weights = run / "checkpoints" / "step-0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    check_refused(capsys, run, "corrupted or truncated")


@pytest.mark.parametrize("stages", [5, [{"bogus": 1}], [{"changes": {}, "steps": "x"}], [{"changes": {}, "steps": 10, "advance": "bogus"}]])
def test_malformed_stages(capsys, run, stages):
    edit_config(run, lambda m: m.__setitem__("stages", stages))
    check_refused(capsys, run, "stage")


def test_a_stage_index_out_of_range_and_a_latest_that_is_not_text(capsys, run):
    edit_config(run, lambda m: m.__setitem__("stage", "x"))
    check_refused(capsys, run, "stage 'x'", "damaged")
    edit_config(run, lambda m: m.__setitem__("stage", 0))
    (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00")
    check_refused(capsys, run, "latest does not name a checkpoint folder")
