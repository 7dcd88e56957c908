"""`peftcli methods`: the registry as a table — keys and defaults, mergeable, quantized base, and
(with `--model`) the trainable-parameter share each method gives on that model.

The share is computed on the model built from its config on PyTorch's meta device: no weights are
read or allocated, so it takes a second even for an 8B model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from peftcli.errors import UserError
from peftcli.methods import REGISTRY, Method, MethodContext


def _format_default(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def key_summary(method: Method) -> str:
    keys = method.keys()
    return ", ".join(f"{k}={_format_default(v)}" for k, v in keys.items()) if keys else "(none)"


def trainable_share(model_path: str) -> dict[str, str]:
    """Trainable parameters (and % of all) per method on the model at `model_path`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftcli.modeling import count_params, quiet_libraries

    quiet_libraries()
    try:
        config = AutoConfig.from_pretrained(model_path)
    except Exception as exc:  # noqa: BLE001 - anything that is not a loadable config
        raise UserError(f"--model {model_path}: cannot read a model config ({exc.__class__.__name__})") from None
    shares: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as scratch:
        ctx = MethodContext(model_path, total_steps=1000, scratch_dir=Path(scratch))
        for name, method in REGISTRY.items():
            if method.model_types is not None and config.model_type not in method.model_types:
                shares[name] = f"n/a ({config.model_type})"
                continue
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            spec = method.spec.model_validate({"method": name})
            try:
                trainable, total = count_params(method.apply(spec, model, ctx))
            except UserError as exc:
                shares[name] = f"n/a ({exc.message})"
                continue
            shares[name] = f"{trainable:,} ({100 * trainable / total:.3f} %)"
    return shares


def rows(model_path: str | None = None) -> list[dict[str, str]]:
    shares = trainable_share(model_path) if model_path else {}
    return [
        {
            "method": name,
            "what it trains": method.summary,
            "keys (defaults)": key_summary(method),
            "mergeable": "yes" if method.mergeable else "no",
            "quantized base": "yes" if method.quantized_base else "no",
            **({"trainable params": shares[name]} if shares else {}),
        }
        for name, method in REGISTRY.items()
    ]


def markdown(table: list[dict[str, str]]) -> str:
    header = list(table[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h].replace("|", "\\|") for h in header) + " |" for row in table]
    return "\n".join(lines)


def print_table(table: list[dict[str, str]], console) -> None:
    from rich.table import Table

    view = Table(show_lines=True)
    for column in table[0]:
        view.add_column(column, overflow="fold")
    for row in table:
        view.add_row(*row.values())
    console.print(view)
