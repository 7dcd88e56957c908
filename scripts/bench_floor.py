#!/usr/bin/env python3
"""The floor under peftcli's throughput: the same model, LoRA, attention kernel, batch layout and
token count per step, trained with a plain PyTorch loop (forward, backward, fused AdamW; no trainer,
no data loader, no logging). scripts/bench.py runs it beside the trainers, so the gap between this
row and peftcli's is what the trainer costs.

    python scripts/bench_floor.py --model DIR --data train.jsonl --result out.json --steps 40 \\
        --batch-size 8 --max-length 2048 --layout varlen|rows|padded [--attn NAME] [--checkpointing] \\
        [--qlora] [--r 16 --alpha 32]

Batches are built from the same chat rows (the model's tokenizer and chat template): packed rows of
max_length for the packed layouts (one flat row cut by cu_seqlens for "varlen", rows with
restarting position ids for "rows"), or examples padded to the longest for "padded".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def packed_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Example indices per row: first-fit decreasing into rows of max_length (as TRL's bfd packing)."""
    rows: list[list[int]] = []
    space: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(space) if free >= lengths[index]), None)
        if fit is None:
            rows.append([])
            space.append(max_length)
            fit = len(rows) - 1
        rows[fit].append(index)
        space[fit] -= lengths[index]
    return rows


def batches(examples: list[list[int]], layout: str, batch_size: int, max_length: int, device) -> list[dict]:
    """Model inputs for every step, on the device."""
    out = []
    if layout == "padded":
        groups = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    else:
        rows = packed_rows([len(e) for e in examples], max_length)
        starts = range(0, len(rows), batch_size)
        groups = [[[t for i in row for t in examples[i]] for row in rows[j : j + batch_size]] for j in starts]
        lengths = [[[len(examples[i]) for i in row] for row in rows[j : j + batch_size]] for j in starts]
    for g, group in enumerate(groups):
        if len(group) < batch_size:
            break
        width = max(len(e) for e in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        positions = torch.zeros(len(group), width, dtype=torch.long)
        for r, seq in enumerate(group):
            ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
            if layout != "padded":
                parts = [*lengths[g][r], width - len(seq)]
                positions[r] = torch.cat([torch.arange(n) for n in parts if n])
        labels = ids.masked_fill(mask == 0, -100)
        if layout == "padded":
            batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        elif layout == "rows":
            batch = {"input_ids": ids, "position_ids": positions, "labels": labels.masked_fill(positions == 0, -100)}
        else:  # one flat row, cut by cu_seqlens
            keep = mask.flatten().bool()
            flat_pos = positions.flatten()[keep][None]
            starts = (flat_pos[0] == 0).nonzero().flatten()
            cu = torch.cat([starts, torch.tensor([flat_pos.shape[1]])]).to(torch.int32)
            flat_ids = ids.flatten()[keep][None]
            batch = {
                "input_ids": flat_ids,
                "position_ids": flat_pos,
                "labels": flat_ids.masked_fill(flat_pos == 0, -100),
                "cu_seq_lens_q": cu,
                "cu_seq_lens_k": cu,
                "max_length_q": int(cu.diff().max()),
                "max_length_k": int(cu.diff().max()),
            }
        batch["real_tokens"] = int(mask.sum())
        out.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return out


def load(args, dtype):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": dtype, "attn_implementation": args.attn} if args.attn else {"dtype": dtype}
    if args.attn == "peftcli_varlen":
        from peftcli.model.attention import register

        register()
    if args.qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    if args.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.checkpointing)
    elif torch.cuda.is_available():
        model = model.cuda()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    lora = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--model", "--data", "--result", "--layout"):
        parser.add_argument(name, required=True)
    parser.add_argument("--attn", default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--qlora", action="store_true")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from peftcli.training.trainer import steady_state

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    examples = [
        tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)[: args.max_length] for r in rows
    ]
    prepared = batches(examples, args.layout, args.batch_size, args.max_length, device)
    steps = [dict(prepared[i % len(prepared)]) for i in range(args.steps)]  # epochs, as the trainers do
    torch.manual_seed(0)
    model = load(args, dtype)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ends, real, padded = [], [], []
    started = time.perf_counter()
    for batch in steps:
        tokens = batch.pop("real_tokens")
        with torch.autocast(device, dtype=dtype, enabled=cuda):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        real.append(tokens)
        padded.append(batch["input_ids"].numel() - tokens)
    runtime = time.perf_counter() - started
    steady = steady_state(ends, real, padded)
    result = {
        "train_runtime_s": runtime,
        "train_tokens": sum(real),
        "train_tokens_per_s": sum(real) / runtime,
        "padded_tokens": sum(padded),
        "step_ends": ends,
        "step_tokens": list(zip(real, padded)),
        "steady": steady.as_dict() if steady else None,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "peak_memory_kind": "cuda_allocated" if cuda else "not measured on CPU",
        "train_loss": float(loss),
        "settings": {"attn_implementation": args.attn, "layout": args.layout, "checkpointing": args.checkpointing},
    }
    Path(args.result).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
