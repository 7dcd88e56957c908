"""What `peftcli eval` leaves in the run (or in `--out DIR`), rendered from its EvalResult: eval.json,
eval.md with the best and worst generated examples side by side, eval.png (base vs tuned bars, with
their values and which way is better), and an eval section in the run's report.md and model card,
the benchmark table (`eval --tasks`) included.
The terminal tables are the command's (cli/evaluate.py).

Markdown written here (and by report.py) goes through `markdown_text` / `markdown_cell`: model
output and recipe values can carry terminal escapes, NULs or pipes, which must not reach a file
that people open in editors, viewers and the hub."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

from peftcli.errors import UserError
from peftcli.redact import redact
from peftcli.rundir.guard import check_replaceable, has_content, remove_owned
from peftcli.rundir.io import atomic_save_figure, atomic_write_json, atomic_write_text
from peftcli.rundir.layout import EVAL, EVAL_MD, EVAL_PLOT, MARKER, PREDICTIONS
from peftcli.rundir.result import BenchmarkRow, Benchmarks, EvalResult

LOSS_ROWS = (("loss", "lower"), ("perplexity", "lower"), ("token_accuracy", "higher"))
GEN_ROWS = (
    ("exact_match", "higher"),
    ("normalized_exact_match", "higher"),
    ("token_f1", "higher"),
    ("rouge_l", "higher"),
    ("length", None),
)
SHOWN = 5  # best and worst examples listed in eval.md
EVAL_KIND = "eval"  # the marker's kind in an `eval --out` folder
EVAL_OUTPUTS = (EVAL, EVAL_MD, EVAL_PLOT, PREDICTIONS)

# C0 controls but tab and newline, DEL, and C1 controls (U+0080-U+009F).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def markdown_text(text: str) -> str:
    """`text` with its control characters shown as `\\xNN` (so a stray escape is visible, not
    acted on by a terminal or viewer), line endings as newlines and tabs as spaces."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def markdown_cell(text) -> str:
    """A value for a Markdown table cell: one line, no raw controls, pipes escaped."""
    return markdown_text(str(text)).replace("\n", " ").replace("|", "\\|")


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


def _figure(value: float, stderr: float | None, sign: str = "") -> str:
    def number(x: float, sign: str = "") -> str:
        return f"{x:{sign}.4f}" if abs(x) < 1e4 else f"{x:{sign}.4g}"  # word perplexities run to 1e8

    return number(value, sign) + ("" if stderr is None else f" ± {number(stderr)}")


def benchmark_cells(row: BenchmarkRow) -> tuple[str, str, str, str, str, str]:
    """(task, metric, base, tuned, change, change %) as shown: figures with their standard errors,
    the change with its own, then in % of the base; ↓ marks a metric where lower is better."""
    return (
        row.task,
        row.metric + (" ↓" if row.higher_is_better is False else ""),
        _figure(row.base, row.base_stderr),
        _figure(row.tuned, row.tuned_stderr),
        _figure(row.change, row.change_stderr, "+"),
        "" if row.change_percent is None else f"{row.change_percent:+.1f} %",
    )


def benchmark_setting(benchmarks: Benchmarks) -> str:
    """How the benchmarks ran, in a few words (the figures depend on each of these)."""
    shots = "each task's few-shot" if benchmarks.num_fewshot is None else f"{benchmarks.num_fewshot}-shot"
    words = [f"lm-eval {benchmarks.lm_eval_version}", shots]
    if benchmarks.chat_template:
        words.append("chat template")
    if benchmarks.limit is not None:
        words.append(f"at most {benchmarks.limit} examples per task")
    return ", ".join(words)


def benchmark_table(rows: list[BenchmarkRow]) -> list[str]:
    lines = ["| task | metric | base | tuned | change | % | |", "|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        task, metric, base, tuned, change, percent = (markdown_cell(cell) for cell in benchmark_cells(row))
        flag = "**regression**" if row.flagged else ""
        lines.append(f"| {task} | {metric} | {base} | {tuned} | {change} | {percent} | {flag} |")
    return lines


def benchmark_lines(benchmarks: Benchmarks) -> list[str]:
    """Markdown: the headline benchmark figures (eval.md, report.md and the model card)."""
    lines = [
        f"Benchmarks ({benchmark_setting(benchmarks)}): figure ± standard error (↓: lower is better). A figure "
        f"worse by more than {benchmarks.threshold_percent:g} % of the base's is flagged, unless the change is "
        "within twice its standard error (noise).",
        "",
        *benchmark_table([row for row in benchmarks.rows if row.headline]),
    ]
    if benchmarks.flagged:
        worse = sorted({row.task for row in benchmarks.rows if row.flagged})
        lines += ["", f"**Benchmark regression** on {', '.join(f'`{markdown_cell(t)}`' for t in worse)}."]
    return lines


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
    if result.benchmarks:
        lines += ["", *benchmark_lines(result.benchmarks)]
    return lines


def _cell(text) -> str:
    if isinstance(text, list):
        text = " / ".join(text)
    return markdown_cell(redact(str(text))[:160])


def _examples_table(rows: list[dict]) -> list[str]:
    head = ["| prompt | reference | base | tuned | ROUGE-L base -> tuned |", "|---|---|---|---|---|"]
    return head + [
        f"| {_cell(r['prompt'])} | {_cell(r['reference'])} | {_cell(r['base'])} | {_cell(r['tuned'])} | "
        f"{r['scores']['base']['rouge_l']:.2f} -> {r['scores']['tuned']['rouge_l']:.2f} |"
        for r in rows
    ]


def _panels(result: EvalResult) -> list[tuple[str, float, float, str]]:
    """(title, base, tuned, which way is better) per bar chart of eval.png."""
    panels = [
        ("eval loss", result.base.loss, result.tuned.loss, "lower"),
        ("token accuracy", result.base.token_accuracy, result.tuned.token_accuracy, "higher"),
    ]
    if result.generation:
        gen = result.generation
        panels += [
            ("ROUGE-L", gen.base["rouge_l"], gen.tuned["rouge_l"], "higher"),
            ("exact match", gen.base["exact_match"], gen.tuned["exact_match"], "higher"),
        ]
    if result.forgetting:
        f = result.forgetting
        panels.append(("reference perplexity", f.base_perplexity, f.tuned_perplexity, "lower"))
    return panels


def eval_figure(result: EvalResult):
    """The base vs tuned bars, each with its value, each panel saying which way is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(result)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.7 * len(panels), 3.3), dpi=100, squeeze=False)
    for ax, (title, base, tuned, better) in zip(axes[0], panels):
        verdict = _better(base, tuned, better)
        tuned_colour = {True: "#55a868", False: "#c44e52", None: "#4c72b0"}[verdict]
        bars = ax.bar(["base", "tuned"], [base, tuned], color=["#999999", tuned_colour])
        ax.bar_label(bars, labels=[f"{base:.4g}", f"{tuned:.4g}"], padding=2, fontsize=8)
        ax.set_title(f"{title}\n({better} is better)", fontsize=10)
        # Every figure here is >= 0: the axis starts at 0, with room above for the labels (and a
        # unit axis when both are 0, where matplotlib would centre an empty axis on 0).
        finite = [v for v in (base, tuned) if math.isfinite(v)]
        top = max(finite, default=0.0)
        ax.set_ylim(0, top * 1.2 if top > 0 else 1)
    fig.tight_layout()
    return fig


def plot(result: EvalResult, path: Path) -> None:
    atomic_save_figure(eval_figure(result), path)


def check_eval_out(out: Path, run_path: Path, overwrite: bool) -> None:
    """`eval --out DIR` may write into a new or empty folder, or replace an earlier `eval --out`
    there with --overwrite; never into a folder holding other files, nor into or around the run."""
    check_replaceable(out, overwrite, "--out", (EVAL_KIND,), protect=run_path, flag="--overwrite", owns=_eval_owns)


def _eval_owns(name: str) -> bool:
    return name in EVAL_OUTPUTS or name == MARKER


def write_eval_out(out: Path, run_path: Path, overwrite: bool, result: EvalResult) -> None:
    """eval.* in `eval --out DIR`: the folder is created, checked again under its lock (something may
    have appeared while eval ran), emptied of an earlier eval's files and marked as an eval's output."""
    from peftcli.rundir.lock import RunLock

    check_eval_out(out, run_path, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out: cannot create {out}: {exc.strerror}") from None
    with RunLock(out):
        check_eval_out(out, run_path, overwrite)
        if has_content(out):
            remove_owned(out, _eval_owns)
        atomic_write_json(out / MARKER, {"kind": EVAL_KIND, "run": str(run_path), "files": list(EVAL_OUTPUTS)})
        write_eval(out, result)


def write_eval(folder: Path, result: EvalResult) -> None:
    """eval.json, eval.png, eval.md and predictions.jsonl in `folder` (the run, or --out); report.py
    adds the eval section to report.md and the model card."""
    predictions = result.predictions
    if predictions:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in predictions)
        atomic_write_text(folder / PREDICTIONS, text)
    else:  # an earlier --generate's predictions would no longer match eval.json
        (folder / PREDICTIONS).unlink(missing_ok=True)
    atomic_write_json(folder / EVAL, result.as_json())
    plot(result, folder / EVAL_PLOT)
    name = Path(result.run).name
    lines = [f"# Eval of `{name}`: base vs tuned", "", *summary_lines(result), "", f"![eval]({EVAL_PLOT})"]
    details = [row for row in result.benchmarks.rows if not row.headline] if result.benchmarks else []
    if details:
        lines += ["", "## Benchmark sub-tasks", "", *benchmark_table(details)]
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
    atomic_write_text(folder / EVAL_MD, markdown_text(redact("\n".join(lines) + "\n")))
