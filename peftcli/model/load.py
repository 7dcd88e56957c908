"""Loading the tokenizer and the base model: dtype, device, optional bitsandbytes quantization.

This is the only peftcli module that builds a `BitsAndBytesConfig`. Every failure a user can cause here
(a path that does not exist, a folder without config.json, code that needs trust_remote_code,
bitsandbytes that cannot run) becomes a one-line UserError before any weight is read.
"""

from __future__ import annotations

import logging
import os

from peftcli.errors import UserError
from peftcli.model.checks import check_quantization
from peftcli.model.device import compute_dtype, local_device, sharded_launch
from peftcli.model.speed import VARLEN
from peftcli.recipe import ModelSection, QuantizationSection


def quiet_libraries() -> None:
    """Silence third-party start-up chatter that says nothing actionable to our users."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "failed to load CPU gemm kernel", etc.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL and the hub client report usage otherwise
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()  # "Truncating train dataset" bars for work that takes milliseconds


def _hub_error(what: str, name: str, exc: Exception) -> UserError:
    text = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    if "trust_remote_code" in str(exc):
        return UserError(
            f"{what}: {name} ships its own model code, which runs only with model.trust_remote_code: true",
            hint="read that code first; then set model.trust_remote_code: true",
        )
    return UserError(
        f"{what}: cannot load '{name}': {text[:240]}",
        hint="a local folder needs config.json + weights; a hub id needs network access (and HF_TOKEN if gated); "
        "without network, set HF_HUB_OFFLINE=1 so hub ids fail at once instead of after retries",
    )


def load_tokenizer(model: ModelSection, path: str | None = None):
    """The tokenizer, with a pad token guaranteed (EOS when the model has none)."""
    from transformers import AutoTokenizer

    name = path or model.tokenizer or model.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad source
        raise _hub_error("model.tokenizer" if model.tokenizer else "model.name", name, exc) from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"tokenizer of {name} is not a fast tokenizer; loss masks need token offsets")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer of {name} has neither a pad nor an EOS token")
        # Padding never carries loss (labels are -100 there), so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bnb_config(quant: QuantizationSection, dtype):
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    import torch

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.effective_quant_type,
        bnb_4bit_use_double_quant=quant.effective_double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=getattr(torch, quant.storage_dtype or "uint8"),
    )


def load_model(model: ModelSection, quant: QuantizationSection | None = None, dtype=None, attn: str | None = None):
    """The base model in its compute dtype, quantized when `quant` is given, on this process's GPU if
    there is one. `attn` overrides `model.attn_implementation` (training resolves `auto` to a kernel)."""
    from transformers import AutoModelForCausalLM

    check_quantization(quant)
    dtype = dtype or compute_dtype(model.dtype)
    device = local_device()
    # use_safetensors: never fall back to pickled weights (torch.load), even from the hub.
    kwargs = dict(dtype=dtype, revision=model.revision, trust_remote_code=model.trust_remote_code, use_safetensors=True)
    # The recipe's own choice applies only where training does not pass its resolved one; peftcli_varlen
    # has no KV cache, so loading for eval, generate, serve or export falls back to the default.
    attn = attn or (model.attn_implementation if model.attn_implementation not in ("auto", VARLEN) else None)
    if attn == VARLEN:  # our kernel: transformers knows it once registered
        from peftcli.model.attention import register

        register()
    if attn:
        kwargs["attn_implementation"] = attn
    sharded = sharded_launch()
    if quant is not None:
        kwargs["quantization_config"] = bnb_config(quant, dtype)
        if device.type == "cuda" and not sharded:
            kwargs["device_map"] = {"": device.index}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(model.name, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _hub_error("model.name", model.name, exc) from None
    if quant is None and device.type == "cuda" and not sharded:
        loaded = loaded.to(device)
    return loaded


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights are counted at their unpacked size, as peft does."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def is_shape_mismatch(exc: BaseException) -> bool:
    """Tensors (or optimizer groups) saved for another model than the one loaded (torch's wording)."""
    text = str(exc)
    return isinstance(exc, (RuntimeError, ValueError, KeyError)) and (
        "size mismatch" in text or "doesn't match the size" in text or "Missing key" in text
    )


def adapter_mismatch(adapter: str, base: str, exc: BaseException) -> UserError:
    detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
    return _does_not_fit(adapter, base, detail[:240])


def _does_not_fit(adapter: str, base: str, detail: str) -> UserError:
    return UserError(
        f"the adapter {adapter} does not fit the base {base}: {detail}",
        hint="an adapter loads only on the base it was trained on (same architecture and sizes); was the model "
        "folder replaced, or the adapter trained on another base?",
    )


def attach_adapter(model, folder: str, base: str, adapter_name: str = "default", label: str | None = None):
    """`model` with the adapter in `folder` attached as `adapter_name` (a PeftModel is given one more).

    PEFT loads with strict=False: weights the base has no place for (an adapter trained on a deeper
    base) and adapter weights the file lacks are only warned about, or not at all, and the adapter then
    silently does nothing. Both are a user error here, as is an adapter_config.json PEFT cannot use."""
    import json

    from peft import PeftModel
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils.error import NoMatchingPeftModuleError

    label = label or folder
    config_file = os.path.join(folder, "adapter_config.json")
    hint = "the file was edited or damaged; copy the run's adapter/ folder again, or retrain"
    try:
        with open(config_file, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError) as exc:
        raise UserError(f"{config_file}: cannot read it ({exc})", hint=hint) from None
    peft_type = raw.get("peft_type") if isinstance(raw, dict) else None
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        what = "has no peft_type" if peft_type is None else f"names peft_type {peft_type!r}, which PEFT does not know"
        raise UserError(f"{config_file} {what}", hint=hint)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(folder, adapter_name=adapter_name)
        else:
            model = PeftModel.from_pretrained(model, folder, adapter_name=adapter_name)
    except NoMatchingPeftModuleError as exc:
        raise UserError(
            f"{config_file}: its target_modules match no module of the base {base} ({str(exc)[:160]})",
            hint="an adapter loads only on the base it was trained on; was adapter_config.json edited?",
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch and peft phrase a mismatch in several types
        if is_shape_mismatch(exc):
            raise adapter_mismatch(label, base, exc) from None
        if isinstance(exc, (KeyError, TypeError, ValueError)):  # a config field PEFT cannot build from
            raise UserError(f"{config_file}: PEFT cannot use it ({exc.__class__.__name__}: {exc})", hint=hint) from None
        raise
    _check_weights_fit(model, folder, adapter_name, label, base)
    return model


def _check_weights_fit(model, folder: str, adapter_name: str, label: str, base: str) -> None:
    """The adapter's saved weights are exactly those the attached adapter has: what it would save now.
    (from_pretrained does not return PEFT's load result, and loading twice breaks AdaLoRA's ranks.)"""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    weights = os.path.join(folder, "adapter_model.safetensors")
    with safe_open(weights, framework="pt") as handle:
        saved = set(handle.keys())
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    problems = [
        f"{len(keys)} {why}: {', '.join(keys[:2])}" + (f" (+{len(keys) - 2} more)" if len(keys) > 2 else "")
        for keys, why in (
            (sorted(saved - expected), "with no place in the base"),
            (sorted(expected - saved), "missing weights"),
        )
        if keys
    ]
    if problems:
        raise _does_not_fit(label, base, f"{weights} holds weights that do not match: {'; '.join(problems)}")


def prepare_for_training(model, quant: QuantizationSection | None, gradient_checkpointing: bool):
    """k-bit preparation for quantized bases (norms in fp32, input grads enabled)."""
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.config.use_cache = False  # the KV cache is useless (and wasteful) while training
    return model


def trainable_share(model_path: str) -> dict[str, str]:
    """Trainable parameters (and % of all) per method on the model at `model_path` (a folder or a hub
    id: its config.json, from the local cache or peftcli's known shapes), counted from the shape by
    the registry: no model is built, so any size takes milliseconds and no memory."""
    from peftcli.errors import UserError
    from peftcli.methods import REGISTRY
    from peftcli.model.checks import find_config
    from peftcli.model.size import Shape
    from peftcli.recipe import ModelSection

    name = os.path.abspath(os.path.expanduser(model_path)) if os.path.exists(model_path) else model_path
    found = find_config(ModelSection(name=name))
    if not found.config:
        raise UserError(
            f"--model {model_path}: cannot read a model config: {found.source}",
            hint="name a model folder holding config.json, or download the model first",
        )
    config = found.config
    try:
        shape = Shape.from_config(config)
        base = shape.linear_params() + shape.other_params() + _bias_params(config, shape)
    except (KeyError, TypeError, ZeroDivisionError) as exc:
        raise UserError(
            f"--model {model_path}: its config.json does not describe a decoder peftcli can count "
            f"(missing or odd {exc})"
        ) from None
    model_type = config.get("model_type")
    shares: dict[str, str] = {}
    for name, method in REGISTRY.items():
        if method.model_types is not None and model_type not in method.model_types:
            shares[name] = f"n/a ({model_type})"
            continue
        spec = method.spec.model_validate({"method": name})
        try:
            trainable = method.count_trainable(spec, shape)
        except (UserError, ValueError) as exc:
            shares[name] = f"n/a ({getattr(exc, 'message', exc)})"
            continue
        shares[name] = f"{trainable:,} ({method.trainable_percent(trainable, base):.3f} %)"
    return shares


def _bias_params(config: dict, shape) -> int:
    """Biases the shape leaves out: Qwen2's q/k/v projections, `attention_bias` (all four attention
    projections) and `mlp_bias` in Llama-style configs."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_layer = 0
    if config.get("model_type") == "qwen2" or config.get("attention_bias"):
        per_layer += q + 2 * kv + (shape.hidden if config.get("attention_bias") else 0)
    if config.get("mlp_bias"):
        per_layer += 2 * shape.intermediate + shape.hidden
    return shape.layers * per_layer
