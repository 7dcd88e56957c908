"""Packed training is exact and padding-free: the batch the trainer builds for each attention layout
gives every example the loss and gradients it has alone, no example sees another, and the kernel
each machine gets is the fastest exact one (recorded in metrics.json, shown by validate)."""

from __future__ import annotations

import pytest
import torch
from helpers import base_recipe, read_json, write_recipe

from peftcli.data import IGNORE
from peftcli.recipe import load_recipe

LAYOUTS = ["varlen", "rows"]


def _packed_trainer(tmp_path, tiny_model, monkeypatch, layout: str):
    """The prepared model and the first training batch, packed as on a machine that gets `layout`:
    "varlen" (torch ships varlen_attn: one flat row, the kernel's exact CPU path) or "rows" (older
    torch: rows of max_length with sdpa's per-row block mask)."""
    from peftcli.training import settings
    from peftcli.training.setup import build_setup as prepare
    from peftcli.training.trainer import build_trainer

    if layout == "rows":
        monkeypatch.setattr(settings, "torch_has_varlen", lambda: False)
    # Loss on every token, so that an example's first token, which follows another example in a
    # packed row, would leak a target were it not masked.
    data = {"packing": True, "max_length": 64, "train_on": "all"}
    recipe = base_recipe(tiny_model, tmp_path / "run", data=data)
    recipe["training"]["batch_size"] = 4
    prepared = prepare(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    assert prepared.settings.packing_layout == layout
    trainer = build_trainer(load_recipe(tmp_path / "r.yaml"), prepared, tmp_path / "run", callbacks=[])
    batch = next(iter(trainer.get_train_dataloader()))
    return prepared.model, batch


def _documents(positions: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every example in a packed batch; padding (label-free) included."""
    docs = []
    for row, pos in enumerate(positions):
        starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
        docs += [(row, s, e) for s, e in zip(starts[:-1], starts[1:])]
    return docs


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token loss of one example and how many targets it has."""
    target = labels[1:]
    keep = target != IGNORE
    losses = torch.nn.functional.cross_entropy(logits[:-1], target.clamp(min=0), reduction="none")
    return losses[keep].sum(), int(keep.sum())


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.slow
def test_packed_losses_and_gradients_equal_unpacked_training(layout, tmp_path, tiny_model, monkeypatch):
    model, batch = _packed_trainer(tmp_path, tiny_model, monkeypatch, layout)
    assert "attention_mask" not in batch
    if layout == "varlen":  # one padding-free row, cut where each example starts
        assert batch["input_ids"].shape[0] == 1 and batch["cu_seq_lens_q"].numel() - 1 >= 4
    else:  # the packed rows stay rows: sdpa's block mask is per row, never over the whole batch
        assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 64
    model.train()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    packed_logits = model(**inputs, use_cache=False).logits
    # The loss training uses: the model's own, over every target of the packed batch.
    packed_loss = model(**batch, use_cache=False).loss
    packed_loss.backward()
    packed_grads = _grads(model)

    model.get_base_model().set_attn_implementation("sdpa")  # unpacked reference: plain sdpa
    ids, labels = batch["input_ids"], batch["labels"]
    total, count, learned, docs = 0.0, 0, 0, _documents(batch["position_ids"])
    for row, start, end in docs:
        alone, n = _token_losses(
            model(input_ids=ids[row, start:end][None], use_cache=False).logits[0], labels[row, start:end]
        )
        if n == 0:
            continue  # padding, or an example with nothing to learn
        packed, _ = _token_losses(packed_logits[row, start:end], labels[row, start:end])
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        total, count, learned = total + alone, count + n, learned + 1
    assert learned > ids.shape[0]  # some row really holds several examples: the test compares packing
    unpacked_loss = total / count
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=1e-6)
    unpacked_loss.backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("layout", [*LAYOUTS, "varlen-positions"])
def test_no_attention_across_examples_in_a_packed_row(layout, tmp_path, tiny_model, monkeypatch):
    model, batch = _packed_trainer(tmp_path, tiny_model, monkeypatch, layout.split("-")[0])
    model.eval()
    if layout == "varlen-positions":  # a collator that gives no cu_seqlens: boundaries from position_ids
        with torch.no_grad():
            given = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        batch = {k: v for k, v in batch.items() if not k.startswith(("cu_seq_lens", "max_length"))}
        with torch.no_grad():
            torch.testing.assert_close(
                model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits, given
            )
    row, first_end = 0, _documents(batch["position_ids"])[1][1]  # the first example of row 0 ends here
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        before = model(**inputs, use_cache=False).logits[row]
        changed = dict(inputs, input_ids=inputs["input_ids"].clone())
        changed["input_ids"][row, :first_end] = torch.roll(changed["input_ids"][row, :first_end], 1)
        after = model(**changed, use_cache=False).logits[row]
    assert not torch.allclose(before[:first_end], after[:first_end])  # the edited example did change
    torch.testing.assert_close(before[first_end:], after[first_end:], rtol=0, atol=1e-6)


def test_kernel_is_the_varlen_one_without_any_dense_mask(tmp_path, tiny_model, monkeypatch):
    """The registered kernel never asks transformers for a (tokens x tokens) mask."""
    import transformers.masking_utils as masking

    model, batch = _packed_trainer(tmp_path, tiny_model, monkeypatch, "varlen")
    assert model.config._attn_implementation == "peftcli_varlen"
    built = []
    for name in ("sdpa_mask", "eager_mask"):
        original = getattr(masking, name)
        monkeypatch.setattr(masking, name, lambda *a, _f=original, **k: built.append(1) or _f(*a, **k))
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    assert not built


def _machine(**kw):
    from peftcli.model.speed import Machine

    return Machine(**{"cuda": True, "capability": (9, 0), "free_gib": 139.0, "torch_varlen": True, **kw})


def test_each_machine_gets_the_fastest_exact_kernel(tmp_path, tiny_model, monkeypatch):
    from peftcli.model import speed

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run")))

    def chosen(**kw):
        s = speed.decide(recipe, _machine(**kw))
        return s.attn_implementation, s.packing, s.packing_layout

    monkeypatch.setattr(speed, "_installed", lambda name: name == "flash_attn")
    assert chosen() == ("flash_attention_2", True, "varlen")
    monkeypatch.setattr(speed, "_installed", lambda name: False)
    assert chosen() == ("peftcli_varlen", True, "varlen")  # a stock GPU machine packs too
    assert chosen(torch_varlen=False) == ("sdpa", True, "rows")  # older torch: per-row block masks
    assert chosen(capability=(7, 5)) == ("sdpa", True, "rows")  # no flash kernel before Ampere
    assert chosen(cuda=False, capability=None) == (None, False, "padded")  # CPU: packing stays off
    explicit = recipe.model_copy(update={"data": recipe.data.model_copy(update={"packing": True})})
    cpu = speed.decide(explicit, _machine(cuda=False, capability=None))
    assert (cpu.attn_implementation, cpu.packing_layout) == ("peftcli_varlen", "varlen")  # exact CPU path
    sdpa = explicit.model_copy(update={"model": explicit.model.model_copy(update={"attn_implementation": "sdpa"})})
    assert speed.decide(sdpa, _machine()).packing_layout == "rows"  # never one flattened row for sdpa
    qlora = load_recipe(
        write_recipe(tmp_path / "q.yaml", base_recipe(tiny_model, tmp_path / "run", quantization={"bits": 4}))
    )
    assert speed.decide(qlora, _machine()).attn_implementation == "peftcli_varlen"  # 4-bit bases pack too
    prefix = base_recipe(tiny_model, tmp_path / "run")
    prefix["peft"] = {"method": "prefix_tuning"}  # virtual tokens break per-example position ids
    assert not speed.decide(load_recipe(write_recipe(tmp_path / "p.yaml", prefix)), _machine()).packing


@pytest.mark.slow
def test_validate_shows_the_choices_and_metrics_record_them(tmp_path, tiny_model, cli, monkeypatch):
    from peftcli.model import device as hardware
    from peftcli.training.run import run_training

    gpu = hardware.Gpu("NVIDIA H200", 139.8, 139.0, (9, 0))
    monkeypatch.setattr(hardware, "detect_gpus", lambda: [gpu])
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run"))
    result = cli("validate", path)
    assert result.code == 0, result.err
    assert "settings on the NVIDIA H200:" in result.err
    assert "attention: torch varlen_attn" in result.err and "packing: on, padding-free" in result.err
    assert "gradient checkpointing: off (auto: the fit estimate without it" in result.err

    monkeypatch.setattr(hardware, "detect_gpus", lambda: [])
    packed = base_recipe(tiny_model, tmp_path / "run", data={"packing": True}, training={"max_steps": 2})
    outcome = run_training(load_recipe(write_recipe(tmp_path / "p.yaml", packed)))
    settings = read_json(outcome.run_dir / "metrics.json")["settings"]
    assert settings["attn_implementation"] == "peftcli_varlen" and settings["packing_layout"] == "varlen"
    assert read_json(outcome.run_dir / "metrics.json")["data"]["padding_fraction"] == 0.0


def test_a_recipe_naming_the_varlen_kernel_still_generates(tmp_path, tiny_model):
    """peftcli_varlen is a training kernel (no KV cache): eval, generate, serve and export load the
    same recipe's model with the default attention instead of failing at the first generated token."""
    from peftcli.model.load import load_model

    recipe = base_recipe(tiny_model, tmp_path / "run")
    recipe["model"]["attn_implementation"] = "peftcli_varlen"
    model = load_model(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)).model)
    assert model.config._attn_implementation != "peftcli_varlen"
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 6
