"""What `train` and `eval` produced, as typed values: `RunResult` and `EvalResult`.

They are all the report layer sees: metrics.json and report.md are both rendered from a RunResult
(metrics.py, report.py), eval.json and eval.md from an EvalResult. A field of RunResult is a key of
metrics.json, in the same order: adding a metric is adding a field (and filling it where the run
is collected, training/results.py). The in-memory model is never part of a result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftcli.data import SplitStats

if TYPE_CHECKING:
    from peftcli.recipe import Recipe

# Fields with this metadata are context for the report, not metrics.json keys.
NOT_A_METRIC = {"metric": False}


@dataclass(frozen=True)
class DataReport:
    """metrics.json `data`: both splits, and the flat keys of the training split."""

    train: SplitStats
    eval: SplitStats
    padding_fraction: float
    chat_template: str | None

    def as_json(self) -> dict:
        from dataclasses import asdict

        out: dict[str, Any] = {
            "train": asdict(self.train),
            "eval": asdict(self.eval),
            "padding_fraction": self.padding_fraction,
            "chat_template": self.chat_template,
        }
        for key in ("rows", "tokens", "truncated", "dropped", "skipped"):
            out[key] = out["train"][key]
        return out

    @classmethod
    def from_json(cls, value: dict) -> DataReport:
        return cls(
            SplitStats(**value.get("train", {})),
            SplitStats(**value.get("eval", {})),
            value.get("padding_fraction", 0.0),
            value.get("chat_template"),
        )


@dataclass(frozen=True)
class RunResult:
    """One `peftcli train`: the metrics.json keys (public: scripts read them), in their order."""

    recipe: Recipe = field(metadata=NOT_A_METRIC)
    run_dir: Path = field(metadata=NOT_A_METRIC)
    status: str  # completed | interrupted | out_of_memory
    method: str
    base_model: str
    trainable_params: int
    total_params: int
    trainable_percent: float
    train_loss: float | None
    loss_history: list[dict]  # {step, loss}
    eval_loss: float | None
    steps: int
    epochs: float
    train_runtime_s: float
    train_tokens: int
    train_tokens_per_s: float | None
    # Without the warm-up steps (allocator growth, kernel autotuning, data loader start).
    steady_tokens_per_s: float | None
    tokens_per_s_per_device: float | None
    world_size: int
    tflops: float
    mfu: float | None
    device_peak_tflops: float | None
    flops_per_token: int
    peak_memory_mb: float
    peak_memory_kind: str  # cuda_allocated | cpu_rss
    device: str
    dtype: str
    quantization: str | None
    data: DataReport
    settings: dict  # what the `auto` settings became on this machine
    versions: dict[str, str]
    eval_history: list[dict] = field(default_factory=list)  # {step, eval_loss}
    best_step: int | None = None
    best_eval_loss: float | None = None
    stopped_early: bool = False
    adapter_is: str | None = None  # best | final (set once the artifact is kept)


@dataclass(frozen=True)
class Scores:
    """Token-weighted loss, perplexity and next-token accuracy over the trained tokens."""

    loss: float
    perplexity: float
    token_accuracy: float
    tokens: int


@dataclass(frozen=True)
class Forgetting:
    """Perplexity of base and tuned on general text the user wants to keep."""

    reference: str
    examples: int
    base_perplexity: float
    tuned_perplexity: float
    forgetting_percent: float
    threshold_percent: float
    flagged: bool


@dataclass(frozen=True)
class GenerationScores:
    examples: int
    max_new_tokens: int
    temperature: float
    num_samples: int
    base: dict[str, float]  # exact_match, normalized_exact_match, token_f1, rouge_l, length
    tuned: dict[str, float]


@dataclass(frozen=True)
class BenchmarkRow:
    """One metric of one lm-eval task (or group), base vs tuned. `headline` rows are the tasks asked
    for; the others are the sub-tasks of a group. The change's standard error is paired (over the
    same examples) for a mean of per-example scores, else combined from the two standard errors."""

    task: str
    metric: str  # acc, acc_norm, ..., with lm-eval's filter when it is not "none": "exact_match (strict-match)"
    base: float
    tuned: float
    base_stderr: float | None
    tuned_stderr: float | None
    change: float
    change_stderr: float | None
    change_percent: float | None  # relative to the base; None when the base is 0
    higher_is_better: bool | None
    examples: int | None
    headline: bool
    flagged: bool  # worse by more than the threshold

    @property
    def better(self) -> bool | None:
        """Did the tuned model do better? None when unchanged or the metric has no direction."""
        if self.higher_is_better is None or self.change == 0:
            return None
        return (self.change > 0) == self.higher_is_better


@dataclass(frozen=True)
class Benchmarks:
    """`peftcli eval --tasks`: lm-evaluation-harness on the base and on base + adapter."""

    tasks: list[str]  # as asked: names or task YAML files
    lm_eval_version: str
    num_fewshot: int | None  # None: each task's own
    limit: int | None
    chat_template: bool
    threshold_percent: float
    rows: list[BenchmarkRow]

    @property
    def flagged(self) -> bool:
        return any(row.flagged for row in self.rows)


@dataclass(frozen=True)
class EvalResult:
    """One `peftcli eval`: the eval.json keys; `forgetting`, `generation` and `benchmarks` only when
    measured."""

    run: str
    data: str
    examples: int
    base: Scores
    tuned: Scores
    forgetting: Forgetting | None = None
    generation: GenerationScores | None = None
    benchmarks: Benchmarks | None = None
    # Every generated example with its scores (predictions.jsonl, and eval.md's best and worst).
    predictions: list[dict] = field(default_factory=list, repr=False)

    @property
    def delta(self) -> dict[str, float]:
        keys = ("loss", "perplexity", "token_accuracy")
        return {k: round(getattr(self.tuned, k) - getattr(self.base, k), 6) for k in keys}

    def as_json(self) -> dict:
        from dataclasses import asdict

        out = {
            "run": self.run,
            "data": self.data,
            "examples": self.examples,
            "base": asdict(self.base),
            "tuned": asdict(self.tuned),
            "delta": self.delta,
        }
        if self.forgetting is not None:
            out["forgetting"] = asdict(self.forgetting)
        if self.generation is not None:
            out["generation"] = asdict(self.generation)
        if self.benchmarks is not None:
            out["benchmarks"] = {**asdict(self.benchmarks), "flagged": self.benchmarks.flagged}
        return out
