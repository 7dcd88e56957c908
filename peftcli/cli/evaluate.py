"""`peftcli eval`: base vs tuned on held-out data (evaluation/), standard benchmarks with --tasks,
and its tables on the terminal (or, with --json, eval.json's object on stdout and the tables on
stderr)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from peftcli import console, interruption
from peftcli.cli._options import RunArg
from peftcli.errors import UserError


def evaluate(
    run: RunArg,
    data: Annotated[
        Path | None, typer.Option("--data", help="Evaluate on this file instead of the run's eval data.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Examples per forward pass.")] = 8,
    generate: Annotated[bool, typer.Option("--generate", help="Also generate completions and score them.")] = False,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", min=1, help="Generation length (eval section).")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", min=0, help="0 = greedy (eval section).")
    ] = None,
    num_samples: Annotated[
        int | None, typer.Option("--num-samples", min=1, help="Samples per prompt (eval section).")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Generate for at most N eval prompts.")] = None,
    reference: Annotated[
        Path | None, typer.Option("--reference", help="General text to measure forgetting on.")
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="Benchmarks with lm-evaluation-harness, comma-separated: task names (hellaswag,arc_easy) "
            "or task YAML files.",
        ),
    ] = None,
    num_fewshot: Annotated[
        int | None,
        typer.Option("--num-fewshot", min=0, help="Few-shot examples per benchmark prompt (default: the task's)."),
    ] = None,
    task_limit: Annotated[
        int | None,
        typer.Option("--task-limit", min=1, help="At most N examples per benchmark task (a quick look)."),
    ] = None,
    chat_template: Annotated[
        bool, typer.Option("--chat-template", help="Render benchmark prompts with the run's chat template.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write eval.json/.md/.png and predictions here; the run is left untouched."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier eval written to the same --out.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print eval.json's object on stdout; the tables go to stderr.")
    ] = False,
) -> None:
    """Base vs tuned on held-out data: loss, perplexity, token accuracy; generation scores; forgetting;
    standard benchmarks (--tasks).

    [dim]Example: peftcli eval runs/demo --generate --tasks recipes/tasks/calendar.yaml[/]
    """
    from peftcli.evaluation.benchmarks import BenchmarkOptions
    from peftcli.evaluation.evaluate import GenerateOptions, run_eval
    from peftcli.rundir import open_run

    options = None
    if generate:
        defaults = open_run(run).recipe().eval
        options = GenerateOptions(
            max_new_tokens=max_new_tokens or defaults.max_new_tokens,
            temperature=defaults.temperature if temperature is None else temperature,
            num_samples=num_samples or defaults.num_samples,
            limit=limit,
        )
    elif any(v is not None for v in (max_new_tokens, temperature, num_samples, limit)):
        raise UserError("--max-new-tokens, --temperature, --num-samples and --limit apply with --generate")
    benchmarks = None
    if tasks is not None:
        benchmarks = BenchmarkOptions.from_flag(
            tasks, num_fewshot=num_fewshot, limit=task_limit, chat_template=chat_template
        )
    elif num_fewshot is not None or task_limit is not None or chat_template:
        raise UserError("--num-fewshot, --task-limit and --chat-template apply with --tasks")
    if overwrite and out is None:
        raise UserError(
            "--overwrite applies with --out", hint="without --out, eval replaces the run's eval.* as it always has"
        )
    folder = out.resolve() if out is not None else run.resolve()
    with interruption.saving(f"the eval results were not written ({folder / 'eval.json'} is as it was)"):
        result = run_eval(
            run,
            data_path=data,
            batch_size=batch_size,
            generate=options,
            reference=os.path.abspath(reference) if reference else None,  # resolve() crashes on a symlink loop
            out=folder if out is not None else None,
            overwrite=overwrite,
            benchmarks=benchmarks,
        )
    print_tables(result, console.err if as_json else console.out, folder)
    if as_json:
        print(json.dumps(result.as_json(), ensure_ascii=False))


def print_tables(result, console, folder: Path) -> None:
    """The eval figures on the terminal: base, tuned and the change, coloured by better or worse."""
    from rich.table import Table

    from peftcli.rundir import EVAL, EVAL_MD, EVAL_PLOT
    from peftcli.rundir.eval_report import GEN_ROWS, LOSS_ROWS, rows_of

    def table(title: str, base, tuned, rows) -> Table:
        view = Table(title=title)
        view.add_column("metric")
        for column in ("base", "tuned", "change"):
            view.add_column(column, justify="right")
        for key, b, t, change, better in rows_of(base, tuned, rows):
            colour = {True: "green", False: "red", None: "white"}[better]
            view.add_row(key, b, t, f"[{colour}]{change}[/]")
        return view

    title = f"base vs tuned on {result.examples} examples ({result.base.tokens:,} tokens)"
    console.print(table(title, result.base, result.tuned, LOSS_ROWS))
    if result.generation:
        gen = result.generation
        console.print(table(f"generation on {gen.examples} prompts", gen.base, gen.tuned, GEN_ROWS))
    if result.forgetting:
        f = result.forgetting
        flag = "  [red]above the threshold[/]" if f.flagged else ""
        console.print(
            f"forgetting on {Path(f.reference).name}: perplexity {f.base_perplexity:.3f} -> "
            f"{f.tuned_perplexity:.3f} ({f.forgetting_percent:+.2f} %, threshold {f.threshold_percent:g} %){flag}"
        )
    if result.benchmarks:
        print_benchmarks(result.benchmarks, console)
    console.print(
        f"written to {folder / EVAL} (and {EVAL_MD}, {EVAL_PLOT}"
        + (", predictions.jsonl)" if result.generation else ")"),
        markup=False,
    )


def print_benchmarks(benchmarks, console) -> None:
    """The headline benchmark figures: base and tuned with their standard errors, the change with
    its own, red where it is worse, flagged above the threshold."""
    from rich.markup import escape
    from rich.table import Table

    from peftcli.rundir.eval_report import benchmark_cells, benchmark_setting

    view = Table(title=f"benchmarks ({benchmark_setting(benchmarks)})")
    for column in ("task", "metric", "base", "tuned", "change", "%"):
        view.add_column(column, justify="left" if column in ("task", "metric") else "right")
    headline = [row for row in benchmarks.rows if row.headline]
    for row in headline:
        task, metric, base, tuned, change, percent = benchmark_cells(row)
        colour = {True: "green", False: "red", None: "white"}[row.better]
        flag = " [red bold]![/]" if row.flagged else ""
        view.add_row(
            escape(task), escape(metric), base, tuned, f"[{colour}]{change}[/]", f"[{colour}]{percent}[/]{flag}"
        )
    console.print(view)
    details = len(benchmarks.rows) - len(headline)
    if details:
        console.print(f"{details} sub-task figures more in eval.md and eval.json", markup=False)
    if benchmarks.flagged:
        worse = sorted({row.task for row in benchmarks.rows if row.flagged})
        console.print(
            f"[red bold]![/] benchmark regression on {escape(', '.join(worse))}: worse by more than "
            f"{benchmarks.threshold_percent:g} % of the base's figure (eval.benchmark_threshold), beyond noise"
        )
