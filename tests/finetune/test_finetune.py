"""Instruction/chat fine-tuning: response-only loss, packing with document masking, specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mpt_train.config import ConfigError, load_config, load_config_dict
from mpt_train.data import load_tokenizer
from mpt_train.data.finetune import (
    IGNORE_INDEX,
    FinetuneCollator,
    FinetuneDataset,
    FinetuneDatasetConfig,
    render_chatml,
    tokenize_example,
)
from mpt_train.loggers.jsonl import read_metrics
from mpt_train.model import MPTConfig, build_model
from mpt_train.train.builder import train
from mpt_train.train.composer_model import ComposerMPT
from tests.helpers import REPO
from tests.train.conftest import tiny_spec

PAIRS = [
    {"prompt": "Question: what does json.loads return?\nAnswer:", "response": " a Python object"},
    {"prompt": "Name a module for regular expressions.", "response": " re"},
    {"prompt": "Explain tempfile in one line:", "response": " it makes temporary files."},
    {"prompt": "Q: 2+2?\nA:", "response": " 4"},
]
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is a tuple?"},
            {"role": "assistant", "content": "An immutable sequence."},
            {"role": "user", "content": "And a list?"},
            {"role": "assistant", "content": "A mutable one."},
        ]
    },
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("mpt-train/tiny-bpe")


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_tokens_are_masked_response_and_eos_are_labels(tok) -> None:
    ids, labels = tokenize_example(
        [(PAIRS[0]["prompt"], False), (PAIRS[0]["response"], True)], tok, add_eos=True
    )
    n_prompt = len(tok(PAIRS[0]["prompt"], add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == PAIRS[0]["response"]


def test_chatml_loss_only_on_assistant_turns(tok) -> None:
    segs = render_chatml(CHATS[0]["messages"])
    text = "".join(s for s, _ in segs)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")
    assert [s for s, resp in segs if resp] == [
        "An immutable sequence.<|im_end|>",
        "A mutable one.<|im_end|>",
    ]
    ids, labels = tokenize_example(segs, tok, add_eos=False)
    learned = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert learned == "An immutable sequence.<|im_end|>A mutable one.<|im_end|>"


def test_eos_is_learned_after_a_closing_answer_only(tok) -> None:
    """A conversation that ends with the assistant teaches EOS after it; one cut short after a
    user turn must not teach the model to stop where an answer is due."""
    answered = tokenize_example(render_chatml(CHATS[0]["messages"]), tok, add_eos=True)
    assert answered[0][-1] == answered[1][-1] == tok.eos_token_id
    cut = tokenize_example(render_chatml(CHATS[0]["messages"][:-1]), tok, add_eos=True)
    assert cut[0][-1] == tok.eos_token_id and cut[1][-1] == IGNORE_INDEX


def test_response_only_loss_gradient_is_zero_on_prompt_positions(tok, tmp_path: Path) -> None:
    """Prompt positions carry no loss: zero gradient, and any change to their logits is inert."""
    ds = FinetuneDataset(
        FinetuneDatasetConfig(
            path=str(_jsonl(tmp_path / "d.jsonl", PAIRS)),
            max_seq_len=64,
            packing=True,
            shuffle=False,
        ),
        tok,
    )
    batch = FinetuneCollator(tok.eos_token_id, 64)([ds[i] for i in range(len(ds))])
    cfg = MPTConfig(
        d_model=32,
        n_heads=2,
        n_layers=2,
        max_seq_len=64,
        vocab_size=8192,
        attn_config={"impl": "torch", "attn_uses_sequence_id": True},
    )
    model = ComposerMPT(build_model(cfg))
    logits = model.eval_forward(batch).detach().requires_grad_(True)
    loss = model.loss(logits, batch)
    loss.backward()
    # The training forward (loss fused into the model) computes this same loss.
    torch.testing.assert_close(model(batch), loss.detach())
    # Position t predicts labels[t+1]; it carries loss iff that label is a response token.
    carries = torch.zeros_like(batch["labels"], dtype=torch.bool)
    carries[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    grad_norm = logits.grad.abs().sum(-1)
    assert torch.all(grad_norm[~carries] == 0)
    assert torch.all(grad_norm[carries] > 0)
    # Perturbing everything at prompt positions leaves the loss bit-identical.
    noisy = logits.detach() + torch.randn_like(logits) * 100 * (~carries)[..., None]
    assert torch.equal(model.loss(noisy, batch), loss.detach())
    # ...while the same batch with prompt labels unmasked gives a different loss.
    full = {
        **batch,
        "labels": torch.where(batch["sequence_id"] >= 0, batch["input_ids"], IGNORE_INDEX),
    }
    assert not torch.equal(model.loss(logits.detach(), full), loss.detach())
    # And the loss is the mean CE over exactly the response tokens (+EOS) of every example.
    n_resp = sum(len(tok(p["response"], add_special_tokens=False)["input_ids"]) + 1 for p in PAIRS)
    assert int(carries.sum()) == n_resp


def test_packing_with_document_masking_equals_separate_examples(tok, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", PAIRS + CHATS)
    packed = FinetuneDataset(
        FinetuneDatasetConfig(path=str(path), max_seq_len=128, packing=True, shuffle=False), tok
    )
    single = FinetuneDataset(
        FinetuneDatasetConfig(path=str(path), max_seq_len=128, packing=False, shuffle=False), tok
    )
    assert len(packed) < len(single) == len(PAIRS + CHATS)
    cfg = MPTConfig(
        d_model=32,
        n_heads=2,
        n_layers=2,
        max_seq_len=128,
        vocab_size=8192,
        attn_config={"impl": "torch", "attn_uses_sequence_id": True},
    )
    net = build_model(cfg).eval()
    alone = {tuple(r["input_ids"].tolist()): net(r["input_ids"][None])[0] for r in single.rows}
    seen = 0
    batch = FinetuneCollator(tok.eos_token_id, 128)(packed.rows)
    with torch.no_grad():
        out = net(batch["input_ids"], sequence_id=batch["sequence_id"])
    for b, row in enumerate(packed.rows):
        assert len(row["input_ids"]) <= 128
        for doc in row["sequence_id"].unique().tolist():
            pos = (batch["sequence_id"][b] == doc).nonzero().squeeze(-1)
            key = tuple(batch["input_ids"][b, pos].tolist())
            torch.testing.assert_close(out[b, pos], alone[key].detach(), atol=1e-5, rtol=1e-5)
            seen += 1
    assert seen == len(single)


def test_packed_rows_train_the_targets_of_separate_examples(tok, tmp_path: Path) -> None:
    """An example's first token has no context inside its example: in a packed row it must not
    be the target of the previous example's last token (an empty prompt makes it a label)."""
    from mpt_train.train.composer_model import IGNORE_INDEX, shift_labels

    records = [{"prompt": "", "response": "Continue this sentence about json."}, *PAIRS]
    path = _jsonl(tmp_path / "d.jsonl", [*records, {"prompt": "", "response": "re, as ever."}])

    def targets(packing: bool) -> tuple[int, int]:
        cfg = FinetuneDatasetConfig(path=str(path), max_seq_len=128, packing=packing)
        batch = FinetuneCollator(tok.eos_token_id, 128)(FinetuneDataset(cfg, tok).rows)
        tgt, seq = shift_labels(batch)[:, :-1], batch["sequence_id"]
        trained = tgt != IGNORE_INDEX
        return int(trained.sum()), int((trained & (seq[:, :-1] != seq[:, 1:])).sum())

    packed, single = targets(True), targets(False)
    assert packed == single and packed[1] == 0


def test_finetune_run_from_pretrained_weights(
    tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _jsonl(tmp_path / "train.jsonl", (PAIRS + CHATS) * 8)
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(
        "unused",
        run_name="ft",
        max_duration="4ba",
        load_path=str(tiny_ckpt),
        load_weights_only=True,
        reliability={"trust_checkpoint": True},
    )
    del spec["train_loader"]
    spec["model"]["attn_config"]["attn_uses_sequence_id"] = True
    spec["finetune_loader"] = {"dataset": {"path": str(data), "max_seq_len": 32}}
    from mpt_train.train.builder import build_trainer

    # The fine-tune starts from the checkpoint's weights (not a fresh init).
    trainer = build_trainer(load_config_dict(spec))
    start = trainer.state.model.model.state_dict()
    trainer.close()
    saved = torch.load(tiny_ckpt, weights_only=False)["state"]["model"]
    assert start and all(torch.equal(v, saved[f"model.{k}"]) for k, v in start.items())
    train(load_config_dict(spec))
    losses = [
        r["loss/train/total"]
        for r in read_metrics(tmp_path / "runs/ft/metrics.jsonl")
        if "loss/train/total" in r
    ]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses)

    spec["model"]["attn_config"]["attn_uses_sequence_id"] = False

    with pytest.raises(ConfigError) as err:
        build_trainer(load_config_dict(spec))
    assert err.value.key == "finetune_loader.dataset.packing"


def test_finetune_specs_load() -> None:
    instruct = load_config(REPO / "yamls/finetune/mpt-7b-instruct.yaml")
    assert instruct.finetune_loader.dataset.format == "prompt_response"
    assert instruct.load_weights_only and instruct.load_path
    assert instruct.model.attn_config.attn_uses_sequence_id
    chat = load_config(REPO / "yamls/finetune/mpt-7b-chat.yaml")
    assert chat.finetune_loader.dataset.format == "chat" and chat.run_name == "mpt-7b-chat"
    story = load_config(REPO / "yamls/finetune/mpt-7b-storywriter.yaml")
    assert story.model.max_seq_len == 65536 == story.train_loader.dataset.max_seq_len
    assert story.model.attn_config.alibi and not story.model.learned_pos_emb
    assert story.load_weights_only and story.model.d_model == 4096


def test_finetune_gradient_does_not_depend_on_microbatch_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Microbatches are weighted by their loss tokens: micro batch 1 trains like micro batch 4.

    Packed rows carry different numbers of response tokens, so weighting each microbatch's
    mean loss by its sample count (Composer's default) would change the gradient.
    """
    # Responses of 1..10 words: rows carry very different numbers of loss tokens.
    records = [
        {
            "prompt": f"Question {i}: name some modules.",
            "response": " ".join(["json os sys"] * (1 + i % 10)),
        }
        for i in range(40)
    ]
    data = _jsonl(tmp_path / "train.jsonl", records)
    monkeypatch.chdir(tmp_path)
    losses = {}
    for micro in (1, 4):
        spec = tiny_spec("unused", run_name=f"mb{micro}", max_duration="3ba", seed=3,
                         device_train_microbatch_size=micro)  # fmt: skip
        del spec["train_loader"]
        spec["model"]["attn_config"]["attn_uses_sequence_id"] = True
        spec["finetune_loader"] = {
            "dataset": {"path": str(data), "max_seq_len": 32, "shuffle": False}
        }
        train(load_config_dict(spec))
        rows = read_metrics(tmp_path / f"runs/mb{micro}/metrics.jsonl")
        losses[micro] = [r["loss/train/total"] for r in rows]
    assert losses[1] == pytest.approx(losses[4], rel=1e-5)
