"""Loss masks decoded back to text for every chat format and template, packing that keeps examples
apart, bad rows as errors and as counted skips, and the preview matching what the trainer gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import DEMO_TRAIN, TURNS, base_recipe, trained_pieces, write_recipe

from peftcli.data import IGNORE, prepare_data
from peftcli.errors import UserError
from peftcli.recipe import DataSection

CHAT_ROWS = {
    "messages": {"messages": [{"role": r, "content": c} for r, c in TURNS]},
    "sharegpt": {
        "conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(r, r), "value": c} for r, c in TURNS]
    },
    "alpaca": {"system": "Be brief.", "instruction": "After Monday?", "output": "Tuesday"},
}
EXPECTED_REPLIES = {"messages": ["Tuesday", "Wednesday"], "sharegpt": ["Tuesday", "Wednesday"], "alpaca": ["Tuesday"]}
# A custom template (Zephyr-like) that ends every turn with the tokenizer's EOS.
CUSTOM = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
END_TOKEN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "<|im_end|>", "custom": "<|im_end|>"}


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral", "custom"])
@pytest.mark.parametrize("fmt", list(CHAT_ROWS))
def test_trained_tokens_are_exactly_the_replies_plus_end_token(tmp_path, tokenizer, fmt, template):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(CHAT_ROWS[fmt]) + "\n")
    setting = template
    if template == "custom":
        (tmp_path / "zephyr.jinja").write_text(CUSTOM)
        setting = str(tmp_path / "zephyr.jinja")
    item = prepare_data(DataSection(train=str(data), chat_template=setting), tokenizer, seed=0).train[0]
    expected = [f"{reply}{END_TOKEN[template]}" for reply in EXPECTED_REPLIES[fmt]]
    # Byte-level BPE may fold the space before a reply into its first token; nothing else is trained.
    assert [p.lstrip(" ") for p in trained_pieces(tokenizer, item)] == expected
    text = tokenizer.decode(item.input_ids)
    assert "After Monday?" in text and "Be brief." in text  # system and user turns are there, untrained


def test_auto_template_falls_back_to_chatml_with_a_warning(tmp_path, tokenizer, capsys):
    tokenizer.chat_template = None
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(CHAT_ROWS["messages"]) + "\n")
    prepared = prepare_data(DataSection(train=str(data)), tokenizer, seed=0)
    assert prepared.template.name == "chatml"
    assert "no chat template; using chatml" in capsys.readouterr().err


@pytest.mark.slow
def test_template_used_in_training_is_saved_with_the_adapter(tmp_path, tiny_model):
    from peftcli.data.templates import builtin_template
    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    recipe = base_recipe(tiny_model, tmp_path / "run", data={"chat_template": "llama3"}, training={"max_steps": 1})
    outcome = run_training(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    saved = (outcome.run_dir / "adapter" / "chat_template.jinja").read_text()
    assert saved.strip() == builtin_template("llama3").strip()


@pytest.mark.slow
def test_packed_batch_gives_the_same_per_example_loss(tmp_path, tiny_model):
    from peftcli.recipe import load_recipe
    from peftcli.training.setup import build_setup as prepare
    from peftcli.training.trainer import build_trainer

    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml",
            base_recipe(
                tiny_model, tmp_path / "run", data={"packing": True, "max_length": 64}, training={"batch_size": 4}
            ),
        )
    )
    prepared = prepare(recipe)
    trainer = build_trainer(recipe, prepared, tmp_path / "run", callbacks=[])
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # padding-free rows
    ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
    assert len(starts) - 1 >= 4, "expected several examples packed into one row"

    model = prepared.model.eval()
    with torch.no_grad():
        packed_logits = model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0]

    def mean_loss(logits, target):
        keep = target[1:] != IGNORE
        losses = torch.nn.functional.cross_entropy(logits[:-1], target[1:].clamp(min=0), reduction="none")
        return losses[keep].mean()

    for start, end in zip(starts[:-1], starts[1:]):
        with torch.no_grad():
            alone = model(input_ids=ids[start:end][None], use_cache=False).logits[0]
        packed = mean_loss(packed_logits[start:end], labels[start:end])
        assert torch.allclose(packed, mean_loss(alone, labels[start:end]), atol=1e-4)


def test_packing_is_refused_for_methods_that_prepend_tokens(tmp_path, tiny_model, cli):
    recipe = base_recipe(tiny_model, tmp_path / "run", data={"packing": True})
    recipe["peft"] = {"method": "prompt_tuning"}
    result = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 2 and "data.packing" in result.err


BAD_ROWS = {
    "missing field": ('{"instruction": "x"}', "missing field 'output'"),
    "wrong type": ('{"instruction": "x", "output": ["a"]}', "should be text"),
    "empty completion": ('{"prompt": "x", "completion": "   "}', "field 'completion' is empty"),
    "unknown role": ('{"messages": [{"role": "bot", "content": "hi"}]}', "unknown role 'bot'"),
    "invalid JSON line": ('{"instruction": "x", "output": ', "invalid JSON"),
    "not an object": ('["instruction", "output"]', "expected a JSON object"),
    "no assistant turn": ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
}
ALPACA_ROW = '{"instruction": "a", "output": "b"}'
CHAT_ROW = json.dumps(CHAT_ROWS["messages"])
GOOD = {
    "missing field": ALPACA_ROW,
    "wrong type": ALPACA_ROW,
    "empty completion": '{"prompt": "a", "completion": " b"}',
    "unknown role": CHAT_ROW,
    "no assistant turn": CHAT_ROW,
    "invalid JSON line": ALPACA_ROW,
    "not an object": ALPACA_ROW,
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_row_error_and_skip(tmp_path, tokenizer, kind):
    bad, reason = BAD_ROWS[kind]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([GOOD[kind], GOOD[kind], bad]) + "\n")
    with pytest.raises(UserError) as info:
        prepare_data(DataSection(train=str(path)), tokenizer, seed=0)
    assert "rows.jsonl line 3" in info.value.message and reason in info.value.message
    stats = prepare_data(DataSection(train=str(path), bad_rows="skip"), tokenizer, seed=0).train_stats
    assert stats.rows == 2 and stats.skipped == 1
    assert [origins for r, origins in stats.skipped_reasons.items() if reason in r] == [["rows.jsonl line 3"]]


@pytest.mark.slow
def test_skipped_rows_are_reported_by_train(tmp_path, tiny_model, cli):
    data = Path(tmp_path / "d.jsonl")
    data.write_text("\n".join(json.dumps(CHAT_ROWS["alpaca"]) for _ in range(8)) + '\n{"instruction": "x"}\n')
    recipe = base_recipe(
        tiny_model,
        tmp_path / "run",
        data={"train": str(data), "eval": None, "bad_rows": "skip"},
        training={"max_steps": 1},
    )
    result = cli("train", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 0, result.err
    assert "skipped 1 bad rows" in result.err and "d.jsonl line 9" in result.err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["skipped"] == 1 and metrics["data"]["rows"] == 8


@pytest.mark.slow
def test_preview_json_matches_what_the_trainer_receives(tmp_path, tiny_model, cli):
    """Every row of a collated training batch (after TRL's preparation, shuffling and padding) is a
    row of the preview, with the same labels."""
    from peftcli.recipe import load_recipe
    from peftcli.training.setup import build_setup as prepare
    from peftcli.training.trainer import build_trainer

    path = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run"))
    result = cli("data", "preview", path, "--rows", "1000", "--json")
    assert result.code == 0, result.err
    previewed = {tuple(row["input_ids"]): row["labels"] for row in map(json.loads, result.out.splitlines())}
    assert len(previewed) > 400

    recipe = load_recipe(path)
    trainer = build_trainer(recipe, prepare(recipe), tmp_path / "run", callbacks=[])
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        assert previewed[tuple(ids[:n].tolist())] == labels[:n].tolist()
        assert (labels[n:] == IGNORE).all()  # padding carries no loss


def test_preview_shows_trained_tokens_and_stats(tmp_path, tiny_model, cli):
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run"))
    result = cli("data", "preview", path, "--rows", "1")
    assert result.code == 0, result.err
    assert "<|im_end|>⟧" in result.out and "trained tokens" in result.out
    rows = len(DEMO_TRAIN.read_text().splitlines())
    assert "padding" in result.out and f"{rows:,}" in result.out
