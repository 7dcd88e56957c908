"""What Axolotl and LLaMA-Factory configs share: Hugging Face Trainer settings under (mostly) the same
names, and the checks that make the finished recipe one peftcli accepts as a whole."""

from __future__ import annotations

from typing import Any

from peftcli.convert.ledger import Ledger
from peftcli.errors import UserError
from peftcli.methods import REGISTRY
from peftcli.model.checks import check_architecture, read_config
from peftcli.recipe import ModelSection

# training.lr_scheduler values; other schedules (one_cycle, rex, cosine_with_min_lr, ...) are not carried.
SCHEDULERS = (
    "linear",
    "cosine",
    "constant",
    "constant_with_warmup",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
)
# Optimizer names of both tools (Trainer's `optim` names) -> training.optimizer.
OPTIMIZERS = {
    "adamw_torch": "adamw_torch",
    "adamw_hf": "adamw_torch",
    "adamw_torch_fused": "adamw_torch_fused",
    "adamw_8bit": "adamw_8bit",
    "adamw_bnb_8bit": "adamw_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "sgd": "sgd",
}
# Trainer settings both configs spell alike -> training keys.
SAME_TRAINER_KEYS = {
    "gradient_accumulation_steps": "gradient_accumulation",
    "learning_rate": "learning_rate",
    "warmup_ratio": "warmup_ratio",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "seed": "seed",
    "logging_steps": "logging_steps",
    "save_steps": "save_steps",
    "save_total_limit": "save_total_limit",
    "eval_steps": "eval_steps",
}
# Keys both tools know that peftcli does on its own or not at all, with what to do instead.
COMMON_REASONS = {
    "resume_from_checkpoint": "resume with `peftcli train RECIPE --resume [CHECKPOINT]`",
    "deepspeed": "peftcli runs multi-GPU with `peftcli train --num-processes N` (DDP) or an accelerate config",
    "fsdp": "peftcli runs FSDP through `peftcli train --num-processes N` and an accelerate config",
    "fsdp_config": "peftcli runs FSDP through `peftcli train --num-processes N` and an accelerate config",
    "ddp_timeout": "peftcli sets up DDP itself (`peftcli train --num-processes N`)",
    "hub_model_id": "peftcli does not upload; push the adapter folder with `huggingface-cli upload`",
    "push_to_hub": "peftcli does not upload; push the adapter folder with `huggingface-cli upload`",
    "warmup_steps": "peftcli takes training.warmup_ratio; set it to warmup_steps / total steps",
    "per_device_eval_batch_size": "peftcli evaluates with training.batch_size",
    "eval_batch_size": "peftcli evaluates with training.batch_size",
    "torch_compile": "use training.compile: true",
    "bf16": "peftcli picks the dtype with model.dtype (auto = bfloat16 where the GPU supports it)",
    "fp16": "peftcli picks the dtype with model.dtype (auto = bfloat16 where the GPU supports it)",
}


# Settings whose value is what peftcli does on its own: no recipe key needed, nothing lost.
COMMON_SAME = {"do_train": True, "save_only_model": False, "overwrite_cache": True, "plot_loss": True}


def carry_model_name(ledger: Ledger, key: str, hint: str) -> str:
    """The base model's key (Axolotl's base_model, LLaMA-Factory's model_name_or_path) into
    model.name, written relative to the recipe when it is a local folder, which is then inspected."""
    from peftcli.convert.sources import model_path

    name = ledger.take(key)
    if not isinstance(name, str):
        raise UserError(f"{ledger.origin}: {key} is missing", hint=hint)
    ledger.carry(key, "model.name", model_path(ledger, key, name))
    found = ledger.find(name)
    ledger.local_model = found if found is not None and found.is_dir() else None
    return name


def number(value: Any) -> Any:
    """A number written as text (YAML reads `2e-4` as a string) as the number it means."""
    if isinstance(value, str):
        try:
            parsed = float(value)
        except ValueError:
            return value
        return int(parsed) if parsed.is_integer() and "." not in value and "e" not in value.lower() else parsed
    return value


def names(value: Any) -> list[str]:
    """A list of names written as a list or as one comma-separated string."""
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def carry_trainer_keys(ledger: Ledger) -> None:
    for key, target in SAME_TRAINER_KEYS.items():
        if ledger.given(key):
            value = number(ledger.take(key))
            if key in ("eval_steps", "save_steps") and isinstance(value, float) and value < 1:
                ledger.drop(key, value, "a fraction of the run; peftcli takes a number of steps")
                continue
            ledger.carry(key, f"training.{target}", value)
        else:
            ledger.take(key)


def carry_scheduler(ledger: Ledger, key: str) -> None:
    value = ledger.take(key)
    if value is None:
        return
    if value in SCHEDULERS:
        ledger.carry(key, "training.lr_scheduler", value)
    else:
        ledger.drop(key, value, f"training.lr_scheduler takes {', '.join(SCHEDULERS)}")


def carry_optimizer(ledger: Ledger, key: str) -> None:
    value = ledger.take(key)
    if value is None:
        return
    if value in OPTIMIZERS:
        ledger.carry(key, "training.optimizer", OPTIMIZERS[value])
    else:
        ledger.drop(key, value, f"training.optimizer takes {', '.join(sorted(set(OPTIMIZERS.values())))}")


def carry_warmup_steps(ledger: Ledger, key: str) -> None:
    """Warm-up given in steps becomes a ratio when the run length in steps is known."""
    steps = number(ledger.take(key))
    if steps is None or steps == 0:
        return
    total = ledger.get("training.max_steps")
    if ledger.get("training.warmup_ratio") is None and isinstance(total, int) and isinstance(steps, int) and total:
        ratio = round(min(steps / total, 1.0), 6)
        ledger.carry(key, "training.warmup_ratio", ratio)
        ledger.change(f"{key}: {steps} -> training.warmup_ratio: {ratio:g} ({steps} of max_steps {total})")
    else:
        ledger.drop(key, steps, COMMON_REASONS["warmup_steps"])


def carry_dtype(ledger: Ledger, bf16: Any, fp16: Any) -> None:
    """Both tools say the dtype with bf16/fp16 flags; `auto` and unset mean peftcli's auto too."""
    if bf16 is True:
        ledger.carry("bf16", "model.dtype", "bfloat16")
    elif fp16 is True:
        ledger.carry("fp16", "model.dtype", "float16")
    if bf16 not in (None, True, "auto"):
        ledger.drop("bf16", bf16, COMMON_REASONS["bf16"])
    if fp16 not in (None, True, False) or (fp16 is True and bf16 is True):
        ledger.drop("fp16", fp16, COMMON_REASONS["fp16"])


def local_model_config(ledger: Ledger) -> dict:
    """config.json of the base model when it is a local folder; {} for a hub id."""
    if ledger.local_model is None:
        return {}
    try:
        return read_config(ModelSection(name=str(ledger.local_model)))
    except (OSError, ValueError):
        return {}


def finish(ledger: Ledger, length_key: str) -> None:
    """Settle the pairs peftcli would refuse together, as the other tool resolves them, and check
    the method against a local model (as validate would)."""
    t = "training"
    if ledger.get(f"{t}.max_steps") is not None and ledger.get(f"{t}.epochs") is not None:
        ledger.retract(f"{t}.epochs", "max_steps is set and takes precedence (as in the Trainer)")
    has_eval = ledger.get("data.eval") is not None or ledger.get("data.eval_split") is not None
    if ledger.get(f"{t}.eval_steps") is not None and not has_eval:
        ledger.retract(f"{t}.eval_steps", "no eval data is carried (data.eval or data.eval_split)")
    if ledger.get(f"{t}.early_stopping_patience") is not None and ledger.get(f"{t}.eval_steps") is None:
        ledger.retract(f"{t}.early_stopping_patience", "needs training.eval_steps, which is not carried")
    method = REGISTRY[ledger.recipe["peft"]["method"]]
    if ledger.recipe["quantization"] and not method.quantized_base:
        for key in list(ledger.recipe["quantization"]):
            ledger.retract(f"quantization.{key}", f"peft.method {method.name} cannot train on a quantized base")
    if ledger.recipe["quantization"] and ledger.get("peft.init") == "pissa":
        ledger.retract("peft.init", "PiSSA starts from the full-precision weights, not a quantized base")
    if ledger.get("data.packing") is True and not method.packing:
        ledger.retract("data.packing", f"peft.method {method.name} does not combine with packing")
    config = local_model_config(ledger)
    check_architecture(method, config)
    context = config.get("max_position_embeddings")
    length = ledger.get("data.max_length")
    if isinstance(context, int) and isinstance(length, int) and length > context:
        ledger.put("data.max_length", context)
        ledger.change(f"{length_key}: {length} -> data.max_length: {context} (the model's context length)", length_key)
