"""`training.batch_size: auto` on a GPU: the micro-batch the fit estimate picked (model/size.py) is
confirmed by a trial step, a forward and backward pass of that many examples of data.max_length
tokens, before training starts; one that runs out of memory is retried smaller until one fits.

The estimate leaves a margin, so the first try usually fits; the trial catches what the estimate
cannot see (another process on the GPU, a kernel's workspace) at the cost of one step. The
optimizer state is not allocated by the trial: the estimate counts it in its fixed part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from peftcli.errors import UserError
from peftcli.model.device import is_out_of_memory, world_size
from peftcli.model.size import split
from peftcli.model.speed import Settings
from peftcli.recipe import Recipe


def smaller(micro: int) -> int:
    """The next micro-batch to try after `micro` ran out of memory: a quarter less, at least one less."""
    return max(1, min(micro - 1, micro * 3 // 4))


def back_off(step: Callable[[int], None], micro: int, effective: int) -> tuple[int, int, list[int]]:
    """Run `step(micro)` with smaller micro-batches until one does not run out of memory; returns that
    micro-batch, the accumulation that keeps `effective` examples per step, and the sizes that did not
    fit. Any other error propagates; so does running out of memory with a single example."""
    failed: list[int] = []
    micro, steps = split(effective, micro)
    while True:
        try:
            step(micro)
            return micro, steps, failed
        except Exception as exc:
            if not is_out_of_memory(exc) or micro == 1:
                raise
            failed.append(micro)
        _release_memory()
        micro, steps = split(effective, smaller(micro))


def _release_memory() -> None:
    """Hand the failed try's blocks back to CUDA (its tensors died with the exception)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trial_step(model, micro: int, length: int, vocab: int) -> None:
    """One forward and backward pass of `micro` examples of `length` tokens, the largest batch the
    run will see; the model's gradients and random state are left as they were."""
    import torch

    device = next(p.device for p in model.parameters())
    devices = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=devices):
            ids = torch.randint(0, vocab, (micro, length), device=device)
            mask = torch.ones_like(ids)
            try:
                # Only the last position's logits: training's fused loss never materialises them all.
                out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            except TypeError:  # an architecture without logits_to_keep
                out = model(input_ids=ids, attention_mask=mask, labels=ids)
            (out.loss if getattr(out, "loss", None) is not None else out.logits.float().mean()).backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        _release_memory()


def confirm_batch(recipe: Recipe, model, settings: Settings, vocab: int) -> Settings:
    """`settings` with the batch a trial step confirmed (batch_size: auto, on one GPU); unchanged
    otherwise. Several processes keep the estimate's pick: each would back off on its own."""
    import torch

    t = recipe.training
    if t.batch_size != "auto" or not torch.cuda.is_available() or world_size() > 1:
        return settings
    effective = settings.batch_size * settings.gradient_accumulation
    length = recipe.data.max_length
    try:
        micro, steps, failed = back_off(lambda n: trial_step(model, n, length, vocab), settings.batch_size, effective)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise UserError(
            f"out of memory: training.batch_size auto: one example of data.max_length {length} tokens does not fit",
            hint="lower data.max_length, set training.gradient_checkpointing: true, or quantize the base "
            "(quantization.bits: 4)",
        ) from None
    if failed:
        tried = ", ".join(map(str, failed))
        why = f"{settings.batch_reason}; {tried} ran out of memory in a trial step, {micro} did not"
    else:
        why = f"{settings.batch_reason}; confirmed by a trial step"
    return replace(settings, batch_size=micro, gradient_accumulation=steps, batch_reason=why)
