"""What `peftcli eval` leaves in the run, rendered from its EvalResult: eval.json, eval.md with the
best and worst generated examples side by side, eval.png (base vs tuned bars), and an eval section
in the run's report.md. The terminal tables are the command's (cli/evaluate.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from peftcli.redact import redact
from peftcli.rundir.io import atomic_save_figure, atomic_write_json, atomic_write_text
from peftcli.rundir.layout import EVAL, EVAL_MD, EVAL_PLOT, PREDICTIONS
from peftcli.rundir.result import EvalResult

LOSS_ROWS = (("loss", "lower"), ("perplexity", "lower"), ("token_accuracy", "higher"))
GEN_ROWS = (
    ("exact_match", "higher"),
    ("normalized_exact_match", "higher"),
    ("token_f1", "higher"),
    ("rouge_l", "higher"),
    ("length", None),
)
SHOWN = 5  # best and worst examples listed in eval.md


def _better(base: float, tuned: float, better: str | None) -> bool | None:
    if better is None or base == tuned:
        return None
    return tuned < base if better == "lower" else tuned > base


def rows_of(base, tuned, rows) -> list[tuple[str, str, str, str, bool | None]]:
    """(metric, base, tuned, change, better?) per row, for Scores or a dict of scores."""
    base, tuned = (x if isinstance(x, dict) else asdict(x) for x in (base, tuned))
    return [
        (
            key,
            f"{base[key]:.4f}",
            f"{tuned[key]:.4f}",
            f"{tuned[key] - base[key]:+.4f}",
            _better(base[key], tuned[key], better),
        )
        for key, better in rows
    ]


def summary_lines(result: EvalResult) -> list[str]:
    """Markdown: the eval figures (used by eval.md and report.md)."""
    lines = [
        f"Held-out data: {result.examples} examples ({result.base.tokens:,} scored tokens).",
        "",
        "| metric | base | tuned | change |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {k} | {b} | {t} | {c} |" for k, b, t, c, _ in rows_of(result.base, result.tuned, LOSS_ROWS)]
    forgetting = result.forgetting
    if forgetting:
        flag = " **above the threshold**" if forgetting.flagged else ""
        lines += [
            "",
            f"Forgetting on `{Path(forgetting.reference).name}` ({forgetting.examples} passages): "
            f"perplexity {forgetting.base_perplexity:.3f} -> {forgetting.tuned_perplexity:.3f}, "
            f"**{forgetting.forgetting_percent:+.2f} %** (threshold {forgetting.threshold_percent:g} %)"
            f"{flag}.",
        ]
    generation = result.generation
    if generation:
        mode = (
            "greedy"
            if generation.temperature == 0
            else f"temperature {generation.temperature:g}, {generation.num_samples} samples"
        )
        lines += [
            "",
            f"Generation on {generation.examples} prompts ({mode}, up to {generation.max_new_tokens} new tokens):",
            "",
            "| metric | base | tuned | change |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {k} | {b} | {t} | {c} |" for k, b, t, c, _ in rows_of(generation.base, generation.tuned, GEN_ROWS)
        ]
    return lines


def _cell(text) -> str:
    if isinstance(text, list):
        text = " / ".join(text)
    return redact(str(text)).replace("|", "\\|").replace("\n", " ")[:160]


def _examples_table(rows: list[dict]) -> list[str]:
    head = ["| prompt | reference | base | tuned | ROUGE-L base -> tuned |", "|---|---|---|---|---|"]
    return head + [
        f"| {_cell(r['prompt'])} | {_cell(r['reference'])} | {_cell(r['base'])} | {_cell(r['tuned'])} | "
        f"{r['scores']['base']['rouge_l']:.2f} -> {r['scores']['tuned']['rouge_l']:.2f} |"
        for r in rows
    ]


def plot(result: EvalResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("eval loss", result.base.loss, result.tuned.loss),
        ("token accuracy", result.base.token_accuracy, result.tuned.token_accuracy),
    ]
    if result.generation:
        gen = result.generation
        panels += [
            ("ROUGE-L", gen.base["rouge_l"], gen.tuned["rouge_l"]),
            ("exact match", gen.base["exact_match"], gen.tuned["exact_match"]),
        ]
    if result.forgetting:
        f = result.forgetting
        panels.append(("reference ppl", f.base_perplexity, f.tuned_perplexity))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3), dpi=100)
    for ax, (title, base, tuned) in zip(axes, panels):
        ax.bar(["base", "tuned"], [base, tuned], color=["#999999", "#4c72b0"])
        ax.set_title(title)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def write_eval(run, result: EvalResult) -> None:
    """eval.json, eval.png, eval.md and predictions.jsonl (report.py adds the eval section to report.md)."""
    predictions = result.predictions
    if predictions:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in predictions)
        atomic_write_text(run.path / PREDICTIONS, text)
    atomic_write_json(run.path / EVAL, result.as_json())
    plot(result, run.path / EVAL_PLOT)
    lines = [f"# Eval of `{run.path.name}`: base vs tuned", "", *summary_lines(result), "", f"![eval]({EVAL_PLOT})"]
    if predictions:
        ranked = sorted(predictions, key=lambda r: r["scores"]["tuned"]["rouge_l"])
        lines += [
            "",
            f"## Best {min(SHOWN, len(ranked))} (tuned ROUGE-L)",
            "",
            *_examples_table(ranked[::-1][:SHOWN]),
            "",
            f"## Worst {min(SHOWN, len(ranked))}",
            "",
            *_examples_table(ranked[:SHOWN]),
            "",
            "Every example, with its scores: `predictions.jsonl`.",
        ]
    atomic_write_text(run.path / EVAL_MD, "\n".join(lines) + "\n")
