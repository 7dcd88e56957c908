"""Every name peftcli writes into a run directory: one place to look them up."""

from __future__ import annotations

import re
from pathlib import Path

ADAPTER = "adapter"
MODEL = "model"  # `full`/`freeze` runs train the base weights and save the whole model here
RECIPE = "recipe.yaml"
METRICS = "metrics.json"
REPORT = "report.md"
LOSS_PLOT = "loss.png"
EVAL = "eval.json"
EVAL_MD = "eval.md"
EVAL_PLOT = "eval.png"
PREDICTIONS = "predictions.jsonl"
BEST_ADAPTER = "best-adapter"  # the best adapter so far (early stopping); becomes adapter/ at the end
BEST_INFO = "best.json"
TENSORBOARD = "tensorboard"
LOCK = ".peftcli.lock"  # lock.py
# Written into every folder peftcli owns: run directories ({"kind": "run"}) and merge/combine
# outputs (with the list of files written). It, not the presence of recipe.yaml, is what lets
# --overwrite and --force replace a folder: a user's project folder also holds a recipe.yaml.
MARKER = "peftcli.json"
TMP_PREFIX = ".tmp-"
# Every name peftcli writes at the top of a run directory (plus checkpoint-N and .tmp-* staging).
RUN_ENTRIES = frozenset(
    {
        ADAPTER,
        MODEL,
        RECIPE,
        METRICS,
        REPORT,
        LOSS_PLOT,
        EVAL,
        EVAL_MD,
        EVAL_PLOT,
        PREDICTIONS,
        BEST_ADAPTER,
        BEST_INFO,
        TENSORBOARD,
        LOCK,
        MARKER,
    }
)


_CHECKPOINT_NAME = re.compile(r"^checkpoint-\d+$")


def artifact_dir(run_dir: Path, method) -> Path:
    return run_dir / (MODEL if method.saves_full_model else ADAPTER)


def run_owns(name: str) -> bool:
    """Whether a run directory entry is one peftcli writes there."""
    return name in RUN_ENTRIES or name.startswith(TMP_PREFIX) or bool(_CHECKPOINT_NAME.match(name))
