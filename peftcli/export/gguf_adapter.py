"""A LoRA adapter as a GGUF adapter file for llama.cpp's `--lora` (and ollama's ADAPTER).

llama.cpp's adapter format: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`,
and for each adapted weight `<its GGUF name>.lora_a` (rank x in) and `.lora_b` (out x rank); llama.cpp
scales the update by alpha / rank. Names and layouts come from llama.cpp's converter for the base's
architecture: each lora_B goes through the same `modify_tensors` as the weight it updates (Llama's
query/key rows are permuted for llama.cpp's rotary layout, and so must be B's rows); lora_A acts on
the input side, which the converter leaves as it is. The adapter is then verified on a GGUF of the
base, as the model export is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from peftcli.errors import UserError
from peftcli.export.gguf_convert import PEFTCLI_KEY, model_class

PREFIX = "base_model.model."


def lora_pairs(peft_model) -> dict[str, tuple[Any, Any, float]]:
    """{base weight name: (lora_A, lora_B, scaling)} of every adapted linear layer, in float32."""
    from peft.tuners.lora import LoraLayer

    pairs = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if module.lora_embedding_A:
            raise UserError(
                f"--adapter-only: the adapter updates an embedding ({name.removeprefix(PREFIX)}), which llama.cpp "
                "adapters do not carry",
                hint="export the merged model instead (drop --adapter-only)",
            )
        for adapter, lora_a in module.lora_A.items():
            weight_a: Any = lora_a.weight
            weight_b: Any = module.lora_B[adapter].weight
            pairs[f"{name.removeprefix(PREFIX)}.weight"] = (
                weight_a.detach().float().cpu(),
                weight_b.detach().float().cpu(),
                float(module.scaling[adapter]),
            )
    if not pairs:
        raise UserError("--adapter-only: the adapter has no LoRA layers to export")
    return pairs


def _alpha(pairs) -> tuple[float, bool]:
    """llama.cpp's one `alpha` for the file; when ranks or scalings differ per layer (rsLoRA keeps
    them equal; rank patterns do not), each layer's scaling is folded into its B and alpha is 0,
    which llama.cpp reads as "scale 1"."""
    ranks_and_scales = {(a.shape[0], scaling) for a, _, scaling in pairs.values()}
    if len(ranks_and_scales) == 1:
        ((rank, scaling),) = ranks_and_scales
        return scaling * rank, False
    return 0.0, True


def write_adapter(base_dir: Path, pairs, out: Path, dtype: str, name: str) -> None:
    """Write the pairs as a llama.cpp LoRA adapter for the base model saved in `base_dir`."""
    import gguf
    import numpy as np
    import torch

    from peftcli import __version__

    cls, _ = model_class(base_dir)
    names = cls(base_dir, gguf.LlamaFileType.ALL_F32, out, model_name=name)  # its tensor names and layouts
    alpha, folded = _alpha(pairs)
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[cls.model_arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    # llama.cpp's adapter type, spelt as its keys spell it ("adapter.lora.alpha"): a file format's
    # word, not a peftcli method name (which only the registry holds)
    writer.add_string(gguf.Keys.Adapter.TYPE, gguf.Keys.Adapter.LORA_ALPHA.split(".")[1])
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_string(PEFTCLI_KEY, __version__)
    numpy_dtype = np.float16 if dtype == "f16" else np.float32
    for weight, (lora_a, lora_b, scaling) in pairs.items():
        block = re.search(r"\.(\d+)\.", weight)
        if folded:
            lora_b = lora_b * scaling
        with torch.inference_mode():
            mapped = list(names.modify_tensors(lora_b, weight, int(block.group(1)) if block else None))
        if len(mapped) != 1 or tuple(mapped[0][1].shape) != tuple(lora_b.shape):
            raise UserError(
                f"--adapter-only: llama.cpp stores {weight} in a layout a LoRA adapter cannot follow",
                hint="export the merged model instead (drop --adapter-only)",
            )
        gguf_name, lora_b = mapped[0]
        writer.add_tensor(f"{gguf_name}.lora_a", lora_a.numpy().astype(numpy_dtype))
        writer.add_tensor(f"{gguf_name}.lora_b", lora_b.contiguous().numpy().astype(numpy_dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
