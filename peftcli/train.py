"""`peftcli train`: recipe -> tokenizer + data -> base model -> PEFT method -> SFTTrainer -> run dir.

Read top to bottom, this is the whole training stage. It is the only module that imports TRL.
Everything that can fail because of the user's input (recipe, data, model path, environment) is
checked before the model is loaded and before anything is written to `output.dir`.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftcli import modeling, report
from peftcli.data import PreparedData, prepare_data
from peftcli.errors import UserError
from peftcli.methods import MethodContext, method_of
from peftcli.recipe import Recipe, recipe_to_yaml
from peftcli.rundir import RECIPE, artifact_dir, atomic_dir, atomic_write_text, check_output_dir, create_output_dir


@dataclass
class TokenCounter:
    """Counts real and padded tokens of the training batches (padding fraction, tokens/s)."""

    real: int = 0
    padded: int = 0

    def wrap(self, collate):
        def counted(examples):
            batch = collate(examples)
            total = batch["input_ids"].numel()
            real = (
                int(batch["attention_mask"].sum())
                if "attention_mask" in batch
                else sum(len(e["input_ids"]) for e in examples)
            )
            self.real += real
            self.padded += total - real
            return batch

        return counted

    @property
    def padding_fraction(self) -> float:
        total = self.real + self.padded
        return self.padded / total if total else 0.0


@dataclass
class TrainOutcome:
    """What the training stage hands to the report."""

    recipe: Recipe
    run_dir: Path
    data: PreparedData
    log_history: list[dict]
    trainable_params: int
    total_params: int
    runtime_s: float
    steps: int
    epochs: float
    tokens: TokenCounter
    eval_loss: float | None
    peak_memory_mb: float
    device: str
    dtype: str
    status: str = "completed"
    extra: dict = field(default_factory=dict)
    # The trained model, for callers that go on in the same process (tests compare it with reloads).
    model: Any = None


def _sft_config(recipe: Recipe, out: Path, dtype, has_eval: bool):
    import torch
    from trl import SFTConfig

    t = recipe.training
    cuda = torch.cuda.is_available()
    optimizer = t.optimizer if t.optimizer != "auto" else "adamw_torch_fused"
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
        optim=optimizer,
        seed=t.seed,
        data_seed=t.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        activation_checkpointing=t.gradient_checkpointing,
        # Non-reentrant checkpoints work with frozen inputs (PEFT) and are the faster, supported path.
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,  # our own progress bar (progress.py)
        use_cpu=not cuda,
        max_length=recipe.data.max_length,
        packing=recipe.data.packing,
        dataset_num_proc=None,
    )


def _as_dataset(items):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [i.input_ids for i in items], "labels": [i.labels for i in items]})


def _trainer_class():
    from transformers import Trainer as PlainTrainer
    from trl import SFTTrainer

    class Trainer(SFTTrainer):
        """SFTTrainer that counts the tokens of training batches, can fall back to the model's own
        loss, and writes no model card into the run directory (report.md is the run's card)."""

        token_counter: TokenCounter
        fused_loss: bool = True

        def create_model_card(self, *args, **kwargs):
            return None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.fused_loss:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return PlainTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

        def get_train_dataloader(self):
            collate = self.data_collator
            self.data_collator = self.token_counter.wrap(collate)
            try:
                return super().get_train_dataloader()
            finally:
                self.data_collator = collate

    return Trainer


def planned_steps(recipe: Recipe, train_rows: int) -> int:
    t = recipe.training
    if t.max_steps:
        return t.max_steps
    per_epoch = max(1, math.ceil(train_rows / (t.batch_size * t.gradient_accumulation)))
    return max(1, math.ceil(per_epoch * (t.epochs or 1.0)))


def run_training(recipe: Recipe, *, overwrite: bool = False, console=None) -> TrainOutcome:
    out = Path(recipe.output.dir)
    method = method_of(recipe.peft)

    # 1. Everything the user can get wrong, before any weight loads or any file is written.
    check_output_dir(out, overwrite)
    modeling.check_model_source(recipe.model)
    modeling.check_quantization(recipe.quantization)
    config = modeling.read_config(recipe.model)
    if method.model_types is not None and config and config.get("model_type") not in method.model_types:
        raise UserError(
            f"peft.method '{method.name}' does not support model type '{config.get('model_type')}'",
            hint=f"it supports: {', '.join(sorted(method.model_types))}",
        )
    modeling.quiet_libraries()
    tokenizer = modeling.load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, recipe.training.seed)

    # 2. Model + method.
    import torch
    from transformers import set_seed

    set_seed(recipe.training.seed)
    dtype = modeling.compute_dtype(recipe.model.dtype)
    model = modeling.load_model(recipe.model, recipe.quantization, dtype)
    model = modeling.prepare_for_training(model, recipe.quantization, recipe.training.gradient_checkpointing)
    scratch = tempfile.TemporaryDirectory(prefix="peftcli-")
    ctx = MethodContext(
        model_config=model.config.to_dict(),
        tokenizer_path=recipe.model.tokenizer or recipe.model.name,
        total_steps=planned_steps(recipe, len(data.train)),
        scratch_dir=Path(scratch.name),
    )
    model = method.apply(recipe.peft, model, ctx)
    trainable, total = modeling.count_params(model)

    # 3. Trainer; the run directory is created only now.
    create_output_dir(out, overwrite)
    atomic_write_text(out / RECIPE, recipe_to_yaml(recipe))
    from peftcli.progress import TrainingProgress

    counter = TokenCounter()
    Trainer = _trainer_class()
    Trainer.token_counter = counter
    Trainer.fused_loss = method.fused_loss
    trainer = Trainer(
        model=model,
        args=_sft_config(recipe, out, dtype, bool(data.eval)),
        train_dataset=_as_dataset(data.train),
        eval_dataset=_as_dataset(data.eval) if data.eval else None,
        processing_class=tokenizer,
        callbacks=[TrainingProgress(console), *method.callbacks(model)],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; the progress bar shows the loss
    if recipe.quantization is not None:
        # TRL casts adapter weights of a quantized base to bf16; keep them in fp32 like peft does for
        # full-precision bases (autocast still runs the matmuls in the compute dtype).
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - started

    # 4. Artifacts: the adapter (or full model) + tokenizer with its chat template, atomically.
    with atomic_dir(artifact_dir(out, method)) as tmp:
        method.save(recipe.peft, trainer.model, tmp, ctx)
        tokenizer.save_pretrained(tmp)
    scratch.cleanup()
    eval_loss = trainer.evaluate()["eval_loss"] if data.eval else None

    outcome = TrainOutcome(
        recipe=recipe,
        run_dir=out,
        data=data,
        log_history=list(trainer.state.log_history),
        trainable_params=trainable,
        total_params=total,
        runtime_s=runtime,
        steps=trainer.state.global_step,
        epochs=float(trainer.state.epoch or 0.0),
        tokens=counter,
        eval_loss=eval_loss,
        peak_memory_mb=report.peak_memory_mb(),
        device=modeling.device_name(),
        dtype=str(dtype).removeprefix("torch."),
        model=trainer.model,
    )
    report.write_run_report(outcome)
    return outcome
