"""`peftcli init`: a commented starter recipe for any method, which validates as written."""

from __future__ import annotations

import yaml

from peftcli.methods import REGISTRY

# Learning rates that suit each family better than LoRA's 2e-4 (prompt methods train few
# parameters far from the weights; full fine-tuning needs a much smaller step).
LEARNING_RATE = {
    "prompt_tuning": 3e-2,
    "prefix_tuning": 1e-2,
    "p_tuning": 1e-2,
    "adaption_prompt": 1e-2,
    "ia3": 3e-3,
    "vera": 3e-3,
    "ln_tuning": 3e-3,
    "full": 2e-5,
    "freeze": 5e-5,
}


def _value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _line(key: str, value, comment: str = "", indent: str = "  ", commented: bool = False) -> str:
    text = f"{'# ' if commented else ''}{indent}{key}: {_value(value)}"
    return f"{text:<40}# {comment}" if comment else text


def starter(method_name: str, model: str, data: str, name: str) -> str:
    method = REGISTRY[method_name]
    fields = method.spec.model_fields
    lines = [
        "# A peftcli recipe, written by `peftcli init`. Check it: `peftcli validate recipe.yaml`; see the",
        "# training data as the model will: `peftcli data preview recipe.yaml`. Every key: `peftcli schema`.",
        "# Relative paths resolve against this file's folder.",
        "",
        "model:",
        _line("name", model, "local folder or hub id"),
        _line("dtype", "auto", "auto = bfloat16 on a GPU that supports it, else float32"),
        _line("trust_remote_code", False, "run code shipped with the model only if you trust it"),
    ]
    if method.quantized_base:
        lines += [
            "# quantization:                       # uncomment for a 4-bit base (QLoRA; needs bitsandbytes)",
            "#   bits: 4",
            "#   quant_type: nf4",
            "#   double_quant: true",
        ]
    else:
        lines.append(f"# ({method_name} trains the base weights, so the base cannot be quantized)")
    lines += ["peft:", _line("method", method_name, method.summary)]
    for key, default in method.keys().items():
        description = fields[key].description or ""
        lines.append(_line(key, default, description, commented=default is None))
    lines += [
        "data:",
        _line("train", data, "jsonl | json | csv | parquet | txt, a folder or glob, or a hub id"),
        _line("eval_split", 0.05, "held-out share of train; or eval: held_out.jsonl"),
        _line("format", "auto", "auto | messages | sharegpt | alpaca | prompt_completion | text"),
        _line("chat_template", "auto", "auto | chatml | llama3 | mistral | path/to/template.jinja"),
        _line("max_length", 1024, "tokens per example"),
        _line("packing", "auto", "pack examples into padding-free rows: auto = on a GPU with flash attention")
        if method.packing
        else "  # (packing does not combine with this method)",
        "training:",
        _line("epochs", 1, "or max_steps: N"),
        _line("batch_size", 4, "per device"),
        _line("gradient_accumulation", 4, "effective batch = batch_size x gradient_accumulation"),
        _line("learning_rate", LEARNING_RATE.get(method_name, 2e-4), "peak learning rate"),
        _line("lr_scheduler", "cosine"),
        _line("warmup_ratio", 0.03),
        _line("eval_steps", 200, "eval loss while training"),
        _line("save_steps", 200, "checkpoint-N every N steps (resume with --resume)"),
        _line("seed", 42),
        "eval:",
        _line("reference", None, "general text to measure forgetting on (peftcli eval)", commented=True),
        _line("max_new_tokens", 64, "peftcli eval --generate"),
        "output:",
        _line("dir", f"runs/{name}", "the run directory"),
        "",
    ]
    return "\n".join(lines)
