"""The document protocol (SPEC §8): one document per batch row, fresh state, grid at its first
token, padding that changes nothing, and the answers-only loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from crt.config import ModelConfig
from crt.data.corpus import Documents
from crt.models import build_model
from crt.train.documents import document_batch, document_loss, evaluate_documents, run_documents
from crt.train.segments import window_loss

ARCHS = ["crt", "transformer", "transformer_xl", "rmt", "armt"]
L, V = 4, 24


def make_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(arch=arch, vocab_size=V, d_model=16, n_layer=2, n_head=2, d_ff=32, segment_len=L, dropout=0.0, emb_dropout=0.0, mem_tokens=2)
    )
    if arch == "armt":  # W_v starts at zero (nothing stored); random values make the memory change the logits
        for layer in model.layers:
            torch.nn.init.normal_(layer.memory.value.weight, std=0.3)
    return model.eval()


def make_docs(lengths: list[int], seed: int = 1) -> Documents:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    tokens = torch.randint(1, V, (len(lengths), width), generator=g)
    lengths_t = torch.tensor(lengths)
    inside = torch.arange(width).unsqueeze(0) < lengths_t.unsqueeze(1)
    tokens = torch.where(inside, tokens, 0)
    answers = (torch.rand(len(lengths), width, generator=g) < 0.3) & inside
    answers[:, 0] = False
    return Documents(tokens, lengths_t, answers)


def logits_of(model, docs: Documents, rows: list[int]) -> torch.Tensor:
    inputs, _, _ = document_batch(docs, torch.tensor(rows))
    with torch.no_grad():
        return torch.cat([lg for _, lg in run_documents(model, inputs, L)], dim=1)  # [B, n, V]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_document_does_not_depend_on_what_its_row_or_batch_held_before(arch):
    model = make_model(arch)
    docs = make_docs([14, 14, 14, 14])
    alone = logits_of(model, docs, [3])[0]
    # other documents beside it, and other documents run through the model first
    logits_of(model, docs, [0, 1])
    beside = logits_of(model, docs, [0, 3])[1]
    after = logits_of(model, docs, [2, 3])[1]
    torch.testing.assert_close(beside, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(after, alone, rtol=0, atol=1e-5)
    if arch != "transformer":
        # the memory is really used: starting document 3 from the state document 2 left changes its logits
        inputs, _, _ = document_batch(docs, torch.tensor([2, 3]))
        with torch.no_grad():
            state = model.init_state(1)
            for start in range(0, inputs.shape[1], L):
                _, state = model(inputs[:1, start : start + L], state)
            carried, _ = model(inputs[1:, :L], state)
        assert (carried[0] - alone[:L]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_the_grid_starts_at_the_documents_first_token_and_padding_changes_nothing(arch):
    model = make_model(arch)
    docs = make_docs([11, 17])  # document 0 is padded by 6 positions in this batch
    batch = logits_of(model, docs, [0, 1])
    # reference: document 0 alone, unpadded, cut by hand into segments from its first token
    tokens = docs.tokens[0, :10].unsqueeze(0)  # its 10 inputs
    with torch.no_grad():
        state, ref = model.init_state(1), []
        for start in range(0, 10, L):
            logits, state = model(tokens[:, start : start + L], state)
            ref.append(logits)
    torch.testing.assert_close(batch[0, :10], torch.cat(ref, dim=1)[0], rtol=0, atol=1e-5)
    # a grid shifted by one token gives other logits: the alignment is what the test above pins down
    if arch != "transformer":
        with torch.no_grad():
            state, shifted = model.init_state(1), []
            for start in (0, 1, 1 + L, 1 + 2 * L):
                logits, state = model(tokens[:, start : min(10, start + (1 if start == 0 else L))], state)
                shifted.append(logits)
        assert (torch.cat(shifted, dim=1)[0] - batch[0, :10]).abs().max() > 1e-4
    # the loss of a padded batch equals the sum of the documents' own losses over their tokens
    for mode in ("all", "answers"):
        both, n_both = document_loss(model, *document_batch(docs, torch.tensor([0, 1])), L, 0, mode)
        parts = [document_loss(model, *document_batch(docs, torch.tensor([i])), L, 0, mode) for i in (0, 1)]
        torch.testing.assert_close(both * n_both, sum(loss * n for loss, n in parts), rtol=1e-5, atol=1e-5)
        assert n_both == sum(n for _, n in parts)


def test_answers_loss_is_the_masked_mean_and_all_is_the_plain_mean():
    model = make_model("crt")
    docs = make_docs([13, 9, 13])
    inputs, targets, is_answer = document_batch(docs, torch.arange(3))
    logits = torch.cat([lg for _, lg in run_documents(model, inputs, L)], dim=1)  # [3, 12, V]
    ce = F.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none").view(3, -1)  # [3, 12]
    inside = torch.arange(12).unsqueeze(0) < (docs.lengths - 1).unsqueeze(1)
    expected_answers = ce[is_answer].sum() / is_answer.sum()
    expected_all = ce[inside].sum() / inside.sum()
    got_answers, n_answers = document_loss(model, inputs, targets, is_answer, L, 0, "answers")
    got_all, n_all = document_loss(model, inputs, targets, is_answer, L, 0, "all")
    assert n_answers == int(is_answer.sum()) and n_all == int(inside.sum()) == 13 - 1 + 9 - 1 + 13 - 1
    torch.testing.assert_close(got_answers, expected_answers, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_all, expected_all, rtol=1e-5, atol=1e-6)
    # answers that were never the model's argmax count as misses in recall; the count is reported
    r = evaluate_documents(model, docs, batch_size=2)
    hits = ((logits.argmax(-1) == targets) & is_answer).sum().item()
    assert r["answers"] == int(is_answer.sum()) and r["recall"] == pytest.approx(hits / r["answers"])
    assert r["loss"] == pytest.approx(expected_all.item(), rel=1e-5)


def test_stream_window_loss_with_answers_is_the_masked_mean():
    model = make_model("crt")
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, V, (2, 12), generator=g), torch.randint(0, V, (2, 12), generator=g)
    scored = torch.rand(2, 12, generator=g) < 0.4
    loss, _ = window_loss(model, x, y, model.init_state(2), L, 3, scored)
    state, logits = model.init_state(2), []
    for start in range(0, 12, L):
        lg, state = model(x[:, start : start + L], state)
        logits.append(lg)
    ce = F.cross_entropy(torch.cat(logits, 1).flatten(0, 1), y.flatten(), reduction="none").view(2, 12)
    torch.testing.assert_close(loss, ce[scored].mean(), rtol=1e-5, atol=1e-6)


def test_bptt_through_the_whole_document_or_k_segments():
    """K = 0 lets the loss of the last segment reach the first; K = 1 stops it at the boundary."""
    model = make_model("crt").train()
    docs = make_docs([13])
    inputs, targets, is_answer = document_batch(docs, torch.tensor([0]))
    only_last = torch.full_like(is_answer, False)
    only_last[0, -1] = True  # the loss is the last position's alone
    calls = []

    def keep(module, args, out):
        out.retain_grad()
        calls.append(out)

    hook = model.tokens.embed.register_forward_hook(keep)
    for K, reaches in ((0, True), (1, False), (2, False), (3, True)):
        calls.clear()
        model.zero_grad()
        loss, _ = document_loss(model, inputs, targets, only_last, L, K, "answers")
        loss.backward()
        first = calls[0].grad  # [1, L, D]: the first segment's token embeddings
        assert len(calls) == 3 and (first is not None and first.abs().sum() > 0) == reaches, K
    hook.remove()


def test_crt_learns_a_one_segment_gap_and_the_transformer_does_not(tmp_path):
    """One pair, then one whole segment of filler, then its query (`<doc> k v <sep> | f f f f |
    <q> k v <eos>` on a 4-token grid): only a memory across segments can beat chance (1/16).
    CRT passes recall >= 0.9 within a few hundred steps (about 350 here); the Transformer
    stays near chance for as long."""
    from crt.config import Stage, TrainConfig
    from crt.train.loop import train

    model = dict(d_model=32, n_layer=1, n_head=2, d_ff=64, segment_len=4, dropout=0.0, emb_dropout=0.0, d_memory=64)
    t = TrainConfig(
        protocol="document",
        loss="answers",
        synth_pairs=1,
        synth_filler=4,
        synth_train_docs=2000,
        synth_valid_docs=200,
        synth_test_docs=200,
        batch_size=32,
        bptt_segments=0,
        max_steps=800,
        lr=3e-3,
        min_lr=3e-3,
        warmup_steps=20,
        weight_decay=0.0,
        eval_every=50,
        eval_batch_size=200,
        log_every=50,
        keep_checkpoints=1,
    )
    stage = [Stage({}, steps=800, advance="recall >= 0.9")]
    crt = train(ModelConfig(arch="crt", **model), dataclasses.replace(t, out_dir=str(tmp_path / "crt")), stage, progress=False)
    assert crt["curriculum"]["passed"] and crt["test_recall"] >= 0.85, crt
    transformer = train(ModelConfig(arch="transformer", **model), dataclasses.replace(t, out_dir=str(tmp_path / "tf"), max_steps=crt["step"]), progress=False)
    assert transformer["test_recall"] < 1 / 16 + 0.06, transformer
