#!/usr/bin/env python3
"""The baseline peftcli is benchmarked against: the SFTTrainer + LoraConfig script a user writes
from TRL's documentation ("Train adapters with PEFT"), with TRL's default settings.

    python scripts/baseline_trl.py --model DIR --data train.jsonl --out DIR --result result.json \\
        [--steps 30 --batch-size 8 --lr 2e-4 --max-length 512 --r 16 --alpha 32 --qlora]

Only what a comparison must pin is passed (model, data, steps, batch size, learning rate, max
length, LoRA rank and targets, 4-bit loading for QLoRA); everything else is TRL's default. It
writes tokens/s, training time, peak memory and the final loss to --result for scripts/bench.py,
with each step's end time and real/padded tokens (for the steady-state figure), measured outside
the script's own code path: a callback and a counting wrapper around TRL's collator.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import BitsAndBytesConfig, TrainerCallback
from trl import SFTConfig, SFTTrainer


class StepLog(TrainerCallback):
    """End time and (real, padded) tokens of every optimizer step; batch i belongs to step i (one
    micro-batch per step: the script leaves gradient accumulation at 1)."""

    def __init__(self):
        self.ends: list[float] = []
        self.batches: list[tuple[int, int]] = []

    def wrap(self, collate):
        def counted(examples):
            batch = collate(examples)
            mask = batch.get("attention_mask")
            real = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            self.batches.append((real, batch["input_ids"].numel() - real))
            return batch

        return counted

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--qlora", action="store_true", help="load the base in 4 bits (nf4)")
    args = parser.parse_args()

    dataset = load_dataset("json", data_files=args.data, split="train")
    quantization = None
    if args.qlora:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    trainer = SFTTrainer(
        model=args.model,
        train_dataset=dataset,
        args=SFTConfig(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            max_length=args.max_length,
            logging_steps=1,
            report_to="none",
            use_cpu=not torch.cuda.is_available(),  # on CPU, TRL's default bf16 demands it (its error says so)
        ),
        peft_config=LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules="all-linear", task_type="CAUSAL_LM"),
        quantization_config=quantization,
    )
    steps = StepLog()
    trainer.add_callback(steps)
    trainer.data_collator = steps.wrap(trainer.data_collator)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - started
    trainer.save_model()

    logs = trainer.state.log_history
    tokens = max((float(e["num_tokens"]) for e in logs if "num_tokens" in e), default=0.0)
    losses = [e["loss"] for e in logs if "loss" in e]
    if torch.cuda.is_available():
        peak_mb, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_allocated"
    else:
        peak_mb, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_rss"
    result = {
        "train_runtime_s": runtime,
        "train_tokens": tokens,
        "train_tokens_per_s": tokens / runtime if runtime else None,
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": kind,
        "train_loss": losses[-1] if losses else None,
        "step_ends": steps.ends,
        "step_tokens": steps.batches[: len(steps.ends)],
        "settings": {
            "bf16": trainer.args.bf16,
            "gradient_checkpointing": trainer.args.gradient_checkpointing,
            "packing": trainer.args.packing,
            "padding_free": trainer.args.padding_free,
            "optim": str(trainer.args.optim),
            "model_dtype": str(trainer.model.dtype),
        },
    }
    with open(args.result, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
