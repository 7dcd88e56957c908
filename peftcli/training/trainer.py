"""The TRL side of training: the SFTConfig a recipe maps to, and the SFTTrainer subclass we run.

The data arrives already tokenized with its loss mask (`input_ids` + `labels`), so TRL does no
templating or masking of its own; it batches, packs when asked, and trains. Packing is TRL's
best-fit-decreasing packing into rows of max_length; what a batch looks like then follows the
attention kernel (model/speed.py): one padding-free row cut by `cu_seqlens` for the varlen kernels
(TRL's collator), or the rows themselves with restarting position ids for sdpa (`PackedRows`), so
sdpa's block mask stays per row instead of covering the whole batch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from peftcli.recipe import Recipe

if TYPE_CHECKING:
    from peftcli.model.speed import Settings
    from peftcli.training.setup import Setup

# Where to write per-step timestamps and token counts at the end of training (scripts/bench.py sets it).
STEP_LOG_ENV = "PEFTCLI_STEP_LOG"


@dataclass
class TokenCounter:
    """Counts real and padded tokens of the training batches (padding fraction, tokens/s) and, per
    optimizer step, when it ended (steady-state tokens/s without the warm-up steps)."""

    real: int = 0
    padded: int = 0
    batches: list[tuple[int, int]] = field(default_factory=list)  # (real, padded) per micro-batch, in order
    step_ends: list[float] = field(default_factory=list)  # time.perf_counter() at each optimizer step's end
    micro_batches_per_step: int = 1

    def wrap(self, collate):
        def counted(examples):
            batch = collate(examples)
            total = batch["input_ids"].numel()
            if "attention_mask" in batch:
                real = int(batch["attention_mask"].sum())
            else:  # packed: every token of the examples is real, the rest of the rows is padding
                real = sum(len(e["input_ids"]) for e in examples)
            self.real += real
            self.padded += total - real
            self.batches.append((real, total - real))
            return batch

        return counted

    @property
    def padding_fraction(self) -> float:
        total = self.real + self.padded
        return self.padded / total if total else 0.0

    def step_tokens(self) -> list[tuple[int, int]]:
        """(real, padded) tokens of each finished step. The data loader fetches one batch ahead, so
        the batches are grouped by the step count rather than by when they were collated."""
        n, size = len(self.step_ends), self.micro_batches_per_step
        groups = [self.batches[i * size : (i + 1) * size] for i in range(n)]
        return [(sum(r for r, _ in g), sum(p for _, p in g)) for g in groups]

    def steady(self) -> SteadyState | None:
        return steady_state(self.step_ends, [r for r, _ in self.step_tokens()], [p for _, p in self.step_tokens()])


@dataclass(frozen=True)
class SteadyState:
    """Throughput once warmed up: the first `warmup_steps` (allocator growth, kernel autotuning,
    compilation, data loader start) are left out."""

    warmup_steps: int
    steps: int
    tokens_per_s: float
    padded_tokens_per_s: float
    step_time_s: float
    largest_step_tokens: int  # real + padded, for the fit estimate

    def as_dict(self) -> dict:
        return asdict(self)


def warmup_steps(steps: int) -> int:
    return max(1, min(max(3, steps // 10), steps - 3))


def steady_state(step_ends: list[float], real: list[int], padded: list[int]) -> SteadyState | None:
    """Tokens/s between the end of the warm-up and the last step; None below 4 steps."""
    steps = min(len(step_ends), len(real))
    if steps < 4:
        return None
    warm = warmup_steps(steps)
    elapsed = step_ends[steps - 1] - step_ends[warm - 1]
    if elapsed <= 0:
        return None
    counted = steps - warm
    return SteadyState(
        warm,
        steps,
        sum(real[warm:steps]) / elapsed,
        sum(padded[warm:steps]) / elapsed,
        elapsed / counted,
        max(r + p for r, p in zip(real[:steps], padded[:steps])),
    )


def step_clock(counter: TokenCounter):
    """A callback that timestamps each optimizer step, and writes the step log the bench reads."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            counter.step_ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            path = os.environ.get(STEP_LOG_ENV)
            if path and state.is_world_process_zero:
                steady = counter.steady()
                log = {
                    "step_ends": counter.step_ends,
                    "step_tokens": counter.step_tokens(),
                    "micro_batches_per_step": counter.micro_batches_per_step,
                    "largest_batch_tokens": max((r + p for r, p in counter.batches), default=0),
                    "steady": steady.as_dict() if steady else None,
                }
                Path(path).write_text(json.dumps(log), encoding="utf-8")

    return StepClock()


@dataclass
class PackedRows:
    """Collates packed rows as rows (the sdpa layout): position ids restart at every example, no
    attention mask (transformers then builds each row's block mask from the position ids), and the
    first token of an example carries no loss, since it would be predicted from the one before."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        positions = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            lengths = list(example.get("seq_lengths") or [n])
            # The padding after the last example is one more pseudo-example: nothing real attends to it.
            positions[row] = torch.cat([torch.arange(length) for length in [*lengths, width - n] if length])
        labels[positions == 0] = -100
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


def sft_config(recipe: Recipe, out: Path, dtype, settings: Settings):
    import torch
    from trl import SFTConfig

    t = recipe.training
    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(out),
        max_steps=t.max_steps or -1,
        num_train_epochs=t.effective_epochs,
        # The recipe's numbers, or what batch_size: auto picked (model/size.py, training/batch.py).
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer if t.optimizer != "auto" else "adamw_torch_fused",
        seed=t.seed,
        data_seed=t.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        activation_checkpointing=settings.gradient_checkpointing,
        # Non-reentrant checkpoints work with frozen inputs (PEFT) and are the supported, faster path.
        activation_checkpointing_kwargs={"use_reentrant": False} if settings.gradient_checkpointing else None,
        use_liger_kernel=settings.liger,
        tf32=settings.tf32 if cuda else None,
        torch_compile=settings.compile,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        report_to="none",
        disable_tqdm=True,  # our own progress bar (progress.py)
        use_cpu=not cuda,
        max_length=recipe.data.max_length,
        packing=settings.packing,
        # Best-fit decreasing keeps examples whole; TRL then collates padding-free with cu_seqlens.
        packing_strategy="bfd",
        # DDP: PEFT leaves most parameters frozen, so no unused-parameter search is needed.
        ddp_find_unused_parameters=False,
        trust_remote_code=recipe.model.trust_remote_code,
    )


def as_dataset(items):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [i.input_ids for i in items], "labels": [i.labels for i in items]})


def trainer_class():
    from transformers import Trainer as PlainTrainer
    from trl import SFTTrainer

    from peftcli.training.checkpoints import SafeCheckpoints

    class Trainer(SafeCheckpoints, SFTTrainer):
        """SFTTrainer with atomic, pickle-free checkpoints (checkpoints.py) that counts the tokens of
        training batches, can fall back to the model's own loss, and writes no model card into the
        run directory (report.md is the run's card)."""

        def __init__(self, *args, token_counter: TokenCounter, fused_loss: bool, rows: bool = False, **kwargs):
            self.token_counter = token_counter
            self.fused_loss = fused_loss
            super().__init__(*args, **kwargs)
            token_counter.micro_batches_per_step = self.args.gradient_accumulation_steps
            if rows:  # TRL refuses a collator of ours with packing, so it is swapped in afterwards
                self.data_collator = PackedRows(self.processing_class.pad_token_id)  # type: ignore[union-attr]

        def create_model_card(self, *args, **kwargs):
            return None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.fused_loss:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False  # a cache would also hide packed-sequence boundaries
            return PlainTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

        def get_train_dataloader(self):
            collate = self.data_collator
            self.data_collator = self.token_counter.wrap(collate)
            try:
                return super().get_train_dataloader()
            finally:
                self.data_collator = collate

    return Trainer


def build_trainer(recipe: Recipe, setup: Setup, out: Path, callbacks: list):
    """The SFTTrainer for a set-up model and data; `trainer.token_counter` counts what it trains on."""
    from transformers.trainer_callback import PrinterCallback

    method, model, settings = setup.method, setup.model, setup.settings
    counter = TokenCounter()
    trainer = trainer_class()(
        token_counter=counter,
        fused_loss=method.fused_loss,
        rows=settings.packing and settings.packing_layout == "rows",
        model=model,
        args=sft_config(recipe, out, setup.dtype, settings),
        train_dataset=as_dataset(setup.data.train),
        eval_dataset=as_dataset(setup.data.eval) if setup.data.eval else None,
        processing_class=setup.tokenizer,
        callbacks=[*callbacks, *method.callbacks(model), step_clock(counter)],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; the progress bar shows the loss
    if recipe.quantization is not None:
        # TRL casts adapter weights of a quantized base to bf16; keep them in fp32 as peft does for a
        # full-precision base (autocast still runs the matmuls in the compute dtype), which also
        # keeps a resumed run identical: peft reloads adapter weights in fp32.
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return trainer
