"""The TRL side of training: the SFTConfig a recipe maps to, and the SFTTrainer subclass we run.

The data arrives already tokenized with its loss mask (`input_ids` + `labels`), so TRL does no
templating or masking of its own; it batches, packs when asked, and trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peftcli.recipe import Recipe

if TYPE_CHECKING:
    from peftcli.training.settings import Settings
    from peftcli.training.stage import Prepared


@dataclass
class TokenCounter:
    """Counts real and padded tokens of the training batches (padding fraction, tokens/s)."""

    real: int = 0
    padded: int = 0

    def wrap(self, collate):
        def counted(examples):
            batch = collate(examples)
            total = batch["input_ids"].numel()
            if "attention_mask" in batch:
                real = int(batch["attention_mask"].sum())
            else:  # padding-free: one flat row of the examples' tokens
                real = sum(len(e["input_ids"]) for e in examples)
            self.real += real
            self.padded += total - real
            return batch

        return counted

    @property
    def padding_fraction(self) -> float:
        total = self.real + self.padded
        return self.padded / total if total else 0.0


def sft_config(recipe: Recipe, out: Path, dtype, settings: Settings):
    import torch
    from trl import SFTConfig

    t = recipe.training
    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(out),
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs or 1.0,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
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

        def __init__(self, *args, token_counter: TokenCounter, fused_loss: bool, **kwargs):
            self.token_counter = token_counter
            self.fused_loss = fused_loss
            super().__init__(*args, **kwargs)

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


def build_trainer(recipe: Recipe, prepared: Prepared, out: Path, callbacks: list):
    """The SFTTrainer for a prepared model and data; `trainer.token_counter` counts what it trains on."""
    from transformers.trainer_callback import PrinterCallback

    method, model = prepared.method, prepared.model
    trainer = trainer_class()(
        token_counter=TokenCounter(),
        fused_loss=method.fused_loss,
        model=model,
        args=sft_config(recipe, out, prepared.dtype, prepared.settings),
        train_dataset=as_dataset(prepared.data.train),
        eval_dataset=as_dataset(prepared.data.eval) if prepared.data.eval else None,
        processing_class=prepared.tokenizer,
        callbacks=[*callbacks, *method.callbacks(model)],
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
