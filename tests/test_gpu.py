"""CUDA checks (skipped without a GPU; `make test-gpu` runs them): bf16 LoRA, 4-bit QLoRA, packed training
with the varlen kernel."""

from __future__ import annotations

import pytest
from helpers import base_recipe, read_json, write_recipe

pytestmark = pytest.mark.gpu


def _train(tmp_path, tiny_model, **sections):
    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    recipe = base_recipe(tiny_model, tmp_path / "run", training={"max_steps": 20}, **sections)
    return run_training(load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe))).run_dir


def _losses(run):
    return [h["loss"] for h in read_json(run / "metrics.json")["loss_history"]]


def test_bf16_lora_on_cuda(tmp_path, tiny_model, cli):
    import torch

    run = _train(tmp_path, tiny_model)
    metrics = read_json(run / "metrics.json")
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    assert metrics["dtype"] == expected and metrics["device"] != "cpu"
    assert metrics["peak_memory_kind"] == "cuda_allocated" and metrics["peak_memory_mb"] > 0
    losses = _losses(run)
    assert sum(losses[-4:]) < sum(losses[:4])
    result = cli("merge", run, "--out", tmp_path / "merged")
    assert result.code == 0, result.err


def test_qlora_4bit_on_cuda(tmp_path, tiny_model, cli):
    run = _train(tmp_path, tiny_model, quantization={"bits": 4})
    metrics = read_json(run / "metrics.json")
    assert metrics["quantization"] == "4-bit nf4" and metrics["device"] != "cpu"
    losses = _losses(run)
    assert sum(losses[-4:]) < sum(losses[:4])
    result = cli("merge", run, "--out", tmp_path / "merged")
    assert result.code == 0, result.err
    assert cli("eval", run).code == 0


def _segments(lengths, heads=8, kv_heads=2, dim=64, dtype=None):
    import torch

    dtype = dtype or torch.bfloat16
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    torch.manual_seed(0)
    q = torch.randn(total, heads, dim, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(total, kv_heads, dim, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(total, kv_heads, dim, device="cuda", dtype=dtype, requires_grad=True)
    return q, k, v, cu, max(lengths)


def test_varlen_kernel_matches_sdpa_within_bf16_tolerance():
    """torch's varlen flash kernel, as peftcli calls it, against per-example sdpa (fp32): outputs and
    gradients, with GQA, a softmax scale and causal masking, over examples of uneven lengths."""
    import torch

    from peftcli.model.attention import _kernel, attend, reference

    if _kernel() is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the flash kernel needs an Ampere or newer GPU")
    q, k, v, cu, longest = _segments([37, 256, 5, 300, 1, 129])
    out = attend(q, k, v, cu, longest, 0.1, causal=True, window=None)
    exact = [x.detach().float().requires_grad_() for x in (q, k, v)]
    expected = reference(*exact, cu, 0.1, causal=True, window=None)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(expected)
    out.backward(grad.to(out.dtype))
    expected.backward(grad)
    for got, want in zip((q, k, v), exact):
        torch.testing.assert_close(got.grad.float(), want.grad, atol=5e-2, rtol=5e-2)


def test_packed_training_on_cuda_uses_the_varlen_kernel(tmp_path, tiny_model):
    """The default on a stock GPU machine: packed, padding-free, the fastest exact kernel there is,
    and a packed batch's logits match sdpa on each example alone within bf16 tolerance."""
    import importlib.util

    import torch

    from peftcli.recipe import load_recipe
    from peftcli.training.setup import build_setup as prepare
    from peftcli.training.trainer import build_trainer

    run = _train(tmp_path, tiny_model)
    metrics = read_json(run / "metrics.json")
    settings = metrics["settings"]
    expected = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "peftcli_varlen"
    assert settings["packing"] and settings["packing_layout"] == "varlen"
    assert settings["attn_implementation"] == expected and metrics["data"]["padding_fraction"] == 0.0
    losses = _losses(run)
    assert sum(losses[-4:]) < sum(losses[:4])

    recipe = load_recipe(tmp_path / "recipe.yaml")
    prepared = prepare(recipe)
    batch = next(iter(build_trainer(recipe, prepared, tmp_path / "again", callbacks=[]).get_train_dataloader()))
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
    model = prepared.model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model(**batch, use_cache=False).logits[0].float()
        model.get_base_model().set_attn_implementation("sdpa")
        cu = batch["cu_seq_lens_q"].tolist()
        for start, end in zip(cu[:-1], cu[1:]):
            alone = model(input_ids=batch["input_ids"][:, start:end], use_cache=False).logits[0].float()
            torch.testing.assert_close(packed[start:end], alone, atol=5e-2, rtol=5e-2)
