"""Loading the tokenizer and the base model: dtype, device, optional bitsandbytes quantization.

This is the only peftcli module that builds a `BitsAndBytesConfig`. Every failure a user can cause here
(a path that does not exist, a folder without config.json, code that needs trust_remote_code,
bitsandbytes that cannot run) becomes a one-line UserError before any weight is read.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from peftcli.errors import PATH_RULE, UserError
from peftcli.integrity import PICKLE_WHY, pickles
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


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_dtype(dtype: str):
    """`auto` = bfloat16 on a CUDA GPU that supports it, float32 otherwise (CPU, older GPUs)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if has_cuda() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def is_local(name: str) -> bool:
    """Recipes make every local path absolute (recipe/load.py); a relative name is a hub id."""
    return os.path.isabs(os.path.expanduser(name))


def check_model_source(model: ModelSection) -> None:
    """Fail early, with the path, when a local model folder is missing or incomplete."""
    if not is_local(model.name):
        return  # a hub id: transformers reports what it can
    path = Path(model.name)
    if not path.exists():
        raise UserError(f"model.name: {path} does not exist", hint=PATH_RULE)
    if not path.is_dir():
        raise UserError(f"model.name: {path} is a file; expected a model folder with config.json")
    if not (path / "config.json").exists():
        raise UserError(f"model.name: {path} has no config.json; is it a Hugging Face model folder?")
    if not any(path.glob("*.safetensors")):
        pickled = pickles(path)
        if pickled:  # transformers would unpickle them (torch.load): refused, with the reason
            raise UserError(
                f"model.name: {path} holds its weights only as {pickled[0]}, {PICKLE_WHY}",
                hint="convert the model to safetensors with code you trust: load it, then "
                "save_pretrained(..., safe_serialization=True)",
            )
    tokenizer_dir = Path(model.tokenizer) if model.tokenizer else path
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((tokenizer_dir / n).exists() for n in names):
        raise UserError(
            f"model: no tokenizer files in {tokenizer_dir}",
            hint="save the tokenizer beside the model, or point model.tokenizer at one",
        )


def read_config(model: ModelSection) -> dict:
    """config.json of a local model as a dict (no torch), or {} for a hub id."""
    path = Path(model.name) / "config.json"
    if not (is_local(model.name) and path.is_file()):
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"model.name: {path} is not UTF-8 text (byte {exc.start})") from None
    except ValueError as exc:
        raise UserError(
            f"model.name: {path} is not valid JSON ({exc})", hint="the model folder is damaged: copy it again"
        ) from None
    except OSError as exc:
        raise UserError(f"model.name: cannot read {path} ({exc.strerror})") from None
    if not isinstance(config, dict):
        raise UserError(f"model.name: {path} holds a JSON {type(config).__name__}, not a model config")
    return config


def check_quantization(quant: QuantizationSection | None, try_import: bool = True) -> None:
    """bitsandbytes must be installed, and (`try_import`, which costs a torch import) load here."""
    if quant is None:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"quantization: {quant.bits}-bit needs bitsandbytes, which is not installed",
            hint="pip install bitsandbytes, or remove the quantization section",
        )
    if not try_import:
        return
    try:
        import bitsandbytes  # noqa: F401 - importing is the check: it fails where the library cannot run
    except Exception as exc:  # noqa: BLE001
        raise UserError(
            f"quantization: bitsandbytes cannot run here ({exc.__class__.__name__}: {exc})",
            hint="remove the quantization section to train in full precision",
        ) from None


def check_remote_code(model: ModelSection) -> None:
    """A local model whose config maps to code shipped with it needs explicit consent to run it."""
    config = read_config(model)
    if config.get("auto_map") and not model.trust_remote_code:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if config.get("model_type") not in CONFIG_MAPPING_NAMES:
            raise UserError(
                f"model.name: {model.name} ships its own model code (config.json auto_map), which runs only with "
                "model.trust_remote_code: true",
                hint="read that code first; then set model.trust_remote_code: true",
            )


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


def sharded_launch() -> bool:
    """Under FSDP or DeepSpeed the launcher places (and shards) the weights, not us."""
    return (
        os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    )


def local_device():
    """This process's device: its GPU under a multi-process launch (LOCAL_RANK), else cuda:0 or cpu."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def load_model(model: ModelSection, quant: QuantizationSection | None = None, dtype=None, attn: str | None = None):
    """The base model in its compute dtype, quantized when `quant` is given, on this process's GPU if
    there is one. `attn` overrides `model.attn_implementation` (training resolves `auto` to a kernel)."""
    from transformers import AutoModelForCausalLM

    check_quantization(quant)
    dtype = dtype or compute_dtype(model.dtype)
    device = local_device()
    # use_safetensors: never fall back to pickled weights (torch.load), even from the hub.
    kwargs = dict(dtype=dtype, revision=model.revision, trust_remote_code=model.trust_remote_code, use_safetensors=True)
    attn = attn or (model.attn_implementation if model.attn_implementation != "auto" else None)
    if attn == "peftcli_varlen":  # our kernel: transformers knows it once registered
        from peftcli.training.attention import register

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


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA or CPU allocation failure, however the library phrased it."""
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights are counted at their unpacked size, as peft does."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def load_run(run, recipe, base: str = "as_trained", dtype=None):
    """A run's tuned model and its tokenizer (which carries the chat template used in training).

    `base`: "as_trained" (quantized as in training: eval, generate), "full_precision" (merge), or
    "dequantized" (merge of a LoftQ adapter into the 4-bit weights it corrects). Runs that trained
    the weights themselves (`full`, `freeze`) load their own `model/`."""
    from peft import PeftModel

    from peftcli.methods import method_of
    from peftcli.rundir import artifact_dir

    method = method_of(recipe.peft)
    artifact = artifact_dir(run.path, method)
    tokenizer = load_tokenizer(recipe.model, path=str(artifact))
    if method.saves_full_model:
        own = recipe.model.model_copy(update={"name": str(artifact), "revision": None})
        return load_model(own, None, dtype), tokenizer
    model = load_model(recipe.model, None if base == "full_precision" else recipe.quantization, dtype)
    if base == "dequantized":
        model = model.dequantize(dtype=dtype)
    try:
        return PeftModel.from_pretrained(model, str(artifact)), tokenizer
    except Exception as exc:  # noqa: BLE001 - torch and peft phrase a mismatch in several types
        if is_shape_mismatch(exc):
            raise adapter_mismatch(str(artifact), recipe.model.name, exc) from None
        raise


def is_shape_mismatch(exc: BaseException) -> bool:
    """Tensors (or optimizer groups) saved for another model than the one loaded (torch's wording)."""
    text = str(exc)
    return isinstance(exc, (RuntimeError, ValueError, KeyError)) and (
        "size mismatch" in text or "doesn't match the size" in text or "Missing key" in text
    )


def adapter_mismatch(adapter: str, base: str, exc: BaseException) -> UserError:
    detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
    return UserError(
        f"the adapter {adapter} does not fit the base {base}: {detail[:240]}",
        hint="an adapter loads only on the base it was trained on (same architecture and sizes); was the model "
        "folder replaced, or the adapter trained on another base?",
    )


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
