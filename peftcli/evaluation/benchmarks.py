"""`peftcli eval --tasks`: standard benchmarks through EleutherAI's lm-evaluation-harness (lm-eval)
on the base and on base + adapter, compared metric by metric with the change's standard error.

- A task is an lm-eval name (`hellaswag`, `arc_easy`, a group such as `mmlu`) or a task YAML file.
  A task file's `dataset_kwargs.data_files` (and a `dataset_path` naming a local folder) resolve
  against the file's own folder, so a task shipped beside its data runs from any directory, offline
  (`recipes/tasks/calendar.yaml`). Plain lm-eval resolves them against the current directory.
- Every task is loaded, its dataset read, before any model: an unknown name, a missing file or a
  dataset that only the hub has fails at once, naming the task.
- Both columns run on the model the rest of `peftcli eval` holds (the adapter switched off for the
  base), wrapped in lm-eval's HFLM: the same precision, quantization and adapter as the other
  figures, the computation of `lm_eval --model hf --model_args pretrained=BASE,peft=RUN/adapter`.
- A headline figure (a task asked for, not a sub-task of a group) that gets worse by more than
  `eval.benchmark_threshold` % of the base's figure is flagged, as the forgetting check flags, unless
  the change is within noise (less than twice its standard error, where lm-eval gives one).

lm-eval is an extra (`pip install "peftcli[bench]"`): it is imported here only, inside functions.
"""

from __future__ import annotations

import difflib
import logging
import math
import statistics
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from peftcli import console
from peftcli.errors import UserError
from peftcli.rundir.result import BenchmarkRow, Benchmarks

# The versions the suite runs on: lm-eval's task loading API (TaskManager.load, its YAML loader)
# changes between 0.4 patch releases.
LM_EVAL_RANGE = ">=0.4.13,<0.5"
INSTALL_HINT = f'pip install "peftcli[bench]" (or: pip install "lm-eval{LM_EVAL_RANGE}")'
# Bootstrapped standard errors (metrics without a closed form: F1, BLEU, ...): lm-eval's default is
# 100000 draws in a process pool; 1000 give the same figure to about two digits.
BOOTSTRAP_ITERS = 1000
# A change within this many standard errors is noise, never flagged.
NOISE_STDERRS = 2.0
# Exceptions (by class name) that mean "the hub was not reached", besides ConnectionError.
_HUB_UNREACHABLE = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectTimeout", "ConnectError", "ReadTimeout"}


@dataclass(frozen=True)
class BenchmarkOptions:
    tasks: tuple[str, ...]  # names or task YAML files, as given
    num_fewshot: int | None = None  # None: each task's own
    limit: int | None = None  # at most this many examples per task
    chat_template: bool = False  # render each prompt with the run's chat template

    @classmethod
    def from_flag(cls, text: str, **kwargs) -> BenchmarkOptions:
        tasks = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
        if not tasks:
            raise UserError("--tasks: no task named", hint="e.g. --tasks hellaswag,arc_easy or a task YAML file")
        return cls(tasks, **kwargs)


@dataclass(frozen=True)
class LoadedTasks:
    """The tasks as lm-eval built them (datasets read), ready to run on both models."""

    manager: Any  # lm_eval.tasks.TaskManager
    objects: list[Any]  # the top-level Task and Group objects
    version: str


def require_lm_eval() -> str:
    """lm-eval's version; a UserError saying how to install it when it is missing or too old."""
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    try:
        import lm_eval  # noqa: F401

        version = metadata.version("lm_eval")
    except (ImportError, metadata.PackageNotFoundError):
        raise UserError(
            "--tasks needs lm-evaluation-harness (lm-eval), which is not installed", hint=INSTALL_HINT
        ) from None
    if version not in SpecifierSet(LM_EVAL_RANGE):
        raise UserError(f"--tasks needs lm-eval{LM_EVAL_RANGE}; lm-eval {version} is installed", hint=INSTALL_HINT)
    return version


@contextmanager
def _quiet() -> Iterator[None]:
    """Only lm-eval's errors reach the terminal (it logs every step at INFO, and warns about a model
    passed as an object, which is how peftcli passes it); simple_evaluate skips torch's environment
    report (pip, conda and nvidia-smi in subprocesses: seconds per call), of which peftcli keeps none."""
    from lm_eval import evaluator

    logger = logging.getLogger("lm_eval")
    level, report = logger.level, evaluator.add_env_info
    logger.setLevel(logging.ERROR)
    evaluator.add_env_info = lambda results: None
    try:
        yield
    finally:
        logger.setLevel(level)
        evaluator.add_env_info = report


def _is_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or "/" in spec or "\\" in spec


def _local(value: Any, folder: Path) -> Any:
    """data_files (a path, a list, or a dict of split -> path or list) made absolute against `folder`."""
    if isinstance(value, list):
        return [_local(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: _local(v, folder) for k, v in value.items()}
    if isinstance(value, str) and "://" not in value:
        return str((folder / Path(value).expanduser()).resolve())
    return value


def _file_config(spec: str) -> dict:
    """A task file's config, a task's local paths made absolute against the file's folder."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"--tasks: task file {spec} not found", hint="a task file's path is relative to this directory")
    try:
        config = load_yaml(path, resolve_func=True, recursive=True)
    except Exception as exc:  # noqa: BLE001 - YAML, an include or a !function: all the file's fault
        raise UserError(f"--tasks: {spec} is not a valid lm-eval task file: {exc}") from None
    if "group" in config or "class" in config:
        if not isinstance(config.get("group", ""), str):
            raise UserError(f"--tasks: {spec}: `group` must be a name")
        return config
    if not isinstance(config.get("task"), str):
        raise UserError(f"--tasks: {spec} names no task", hint="an lm-eval task file has a `task: NAME` key")
    folder = path.resolve().parent
    kwargs = dict(config.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = _local(kwargs["data_files"], folder)
        config["dataset_kwargs"] = kwargs
    dataset = config.get("dataset_path")
    if isinstance(dataset, str) and (folder / dataset).exists():
        config["dataset_path"] = str((folder / dataset).resolve())
    return config


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _load_error(spec: str, exc: Exception) -> UserError:
    chain = list(_chain(exc))
    said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if any(isinstance(e, ConnectionError) or type(e).__name__ in _HUB_UNREACHABLE for e in chain):
        return UserError(
            f"--tasks: task {spec} needs its dataset from the Hugging Face hub, which is not reachable ({said})",
            hint="run it where the hub is reachable (once fills the datasets cache, which HF_DATASETS_OFFLINE=1 "
            "then reads), or use a task YAML with local data_files (recipes/tasks/calendar.yaml)",
        )
    if any(isinstance(e, FileNotFoundError) for e in chain):
        return UserError(
            f"--tasks: task {spec}: {said}", hint="data_files in a task file resolve against the file's folder"
        )
    return UserError(f"--tasks: task {spec} could not be loaded: {type(exc).__name__}: {said}")


def _top_level(loaded: dict) -> list[Any]:
    """What one spec built: its group (a group's members run inside it), else its task(s) (a tag
    stands for several)."""
    groups = loaded["groups"]
    if not groups:
        return list(loaded["tasks"].values())
    members = {name for names in loaded["group_map"].values() for name in names}
    return [group for name, group in groups.items() if name not in members]


def load_tasks(options: BenchmarkOptions) -> LoadedTasks:
    """Every task of `options` built by lm-eval, its data read: a UserError naming the task if not."""
    version = require_lm_eval()
    from lm_eval.tasks import TaskManager

    specs: dict[str, Any] = {}  # what lm-eval loads: a name, a task's config, or a file's path
    folders: list[str] = []  # of group files: lm-eval finds a group, and its members, by name
    members: set[str] = set()
    for spec in options.tasks:
        if not _is_file(spec):
            specs[spec] = spec
            continue
        config = _file_config(spec)
        if "group" in config:
            specs[spec] = config["group"]
            folders.append(str(Path(spec).expanduser().resolve().parent))
            listed = config.get("task")
            members.update(m for m in (listed if isinstance(listed, list) else [listed]) if isinstance(m, str))
        elif "class" in config:  # a Python task: lm-eval builds it from its file
            specs[spec] = str(Path(spec).expanduser().resolve())
        else:
            specs[spec] = config
    with _quiet(), console.err.status("lm-eval: loading the tasks"):
        # lm-eval's own index reads ~15k YAML files (half a minute on 2 cores): only when a name needs it.
        names = any(spec == what for spec, what in specs.items())
        manager = TaskManager(include_defaults=names, include_path=folders or None)
        if not names and not members <= set(manager.all_tasks):
            manager = TaskManager(include_path=folders)  # a group of lm-eval's own tasks
        objects: list[Any] = []
        for spec, what in specs.items():
            if spec == what and what not in manager.all_tasks:
                close = difflib.get_close_matches(what, manager.all_tasks, n=3)
                raise UserError(
                    f"--tasks: unknown lm-eval task '{what}'",
                    hint=(f"did you mean {', '.join(close)}? " if close else "")
                    + "`lm-eval ls tasks` lists them; a task file is given by its path (ending in .yaml)",
                )
            try:
                objects += _top_level(manager.load([what]))
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - lm-eval and datasets raise many types; each names the task
                raise _load_error(spec, exc) from None
    return LoadedTasks(manager, objects, version)


@cache
def _run_lm_class():
    from lm_eval.models.huggingface import HFLM

    class RunLM(HFLM):
        """lm-eval's HF model on a model peftcli loaded."""

        def _model_call(self, inps, attn_mask=None, labels=None):
            logits = super()._model_call(inps, attn_mask, labels)
            # Prompt-learning methods prepend virtual tokens to the output: keep the input's positions.
            return logits[:, -inps.shape[1] :, :]

        def get_model_info(self) -> dict:
            return {}  # lm-eval would ask the hub for the revision of a model given by name

    return RunLM


def run_benchmarks(
    use: Callable[[str], AbstractContextManager[Any]],
    tokenizer,
    tasks: LoadedTasks,
    options: BenchmarkOptions,
    batch_size: int,
    threshold: float,
) -> Benchmarks:
    """Both models on every task; `use(which)` lends the base or the tuned model."""
    from lm_eval import simple_evaluate

    if options.chat_template and not tokenizer.chat_template:
        raise UserError("--chat-template: the run's tokenizer has no chat template", hint="drop --chat-template")
    raw = {}
    for which in ("base", "tuned"):
        console.err.print(f"lm-eval: {', '.join(options.tasks)} ({which})", markup=False, highlight=False)
        with use(which) as model, _quiet():
            lm = _run_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            raw[which] = simple_evaluate(
                model=lm,
                tasks=tasks.objects,
                task_manager=tasks.manager,
                num_fewshot=options.num_fewshot,
                limit=options.limit,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=True,  # per-example scores: the paired standard error of the change
                apply_chat_template=options.chat_template,
            )
    return Benchmarks(
        tasks=list(options.tasks),
        lm_eval_version=tasks.version,
        num_fewshot=options.num_fewshot,
        limit=options.limit,
        chat_template=options.chat_template,
        threshold_percent=threshold,
        rows=compare(raw["base"], raw["tuned"], threshold),
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _figures(scores: dict) -> dict[str, float]:
    """{"acc,none": 0.5, ...}: the metric figures of one task's results (no alias, no stderr)."""
    out = {}
    for key, value in scores.items():
        number = _number(value)
        if "," in key and "_stderr," not in key and number is not None:
            out[key] = number
    return out


def _per_example(result: dict, task: str, metric: str, filter_key: str) -> dict[Any, float]:
    values = {}
    for sample in result.get("samples", {}).get(task, []):
        value = _number(sample.get(metric))
        if sample.get("filter") == filter_key and value is not None:
            values[sample["doc_id"]] = value
    return values


def _paired_stderr(base: dict, tuned: dict, task: str, key: str, b: float, t: float) -> float | None:
    """Standard error of the change over the same examples, when the figure is the mean of
    per-example scores (accuracy and the like): tighter than combining the two errors, which
    treats the columns as independent samples."""
    metric, _, filter_key = key.partition(",")
    before, after = _per_example(base, task, metric, filter_key), _per_example(tuned, task, metric, filter_key)
    if len(before) < 2 or before.keys() != after.keys():
        return None
    if abs(statistics.fmean(before.values()) - b) > 1e-6 or abs(statistics.fmean(after.values()) - t) > 1e-6:
        return None  # aggregated otherwise (perplexity, F1 over the corpus, ...)
    changes = [after[doc] - before[doc] for doc in before]
    return statistics.stdev(changes) / math.sqrt(len(changes))


def worse_percent(base: float, tuned: float, higher_is_better: bool) -> float:
    """How much worse tuned is than base, in % of the base (0 when it is not worse)."""
    worse = base - tuned if higher_is_better else tuned - base
    if worse <= 0:
        return 0.0
    return math.inf if base == 0 else 100 * worse / abs(base)


def compare(base: dict, tuned: dict, threshold: float) -> list[BenchmarkRow]:
    """One row per task and metric from two lm-eval results; a headline row worse by more than
    `threshold` % of the base, and beyond noise, is flagged."""
    results = base.get("results", {})
    # A group with its own figure stands for its members: they are detail, not headlines.
    members = {
        name
        for group, names in base.get("group_subtasks", {}).items()
        if _figures(results.get(group, {}))
        for name in names
    }
    rows = []
    for task, scores in results.items():
        theirs = tuned.get("results", {}).get(task, {})
        higher = base.get("higher_is_better", {}).get(task, {})
        examples = base.get("n-samples", {}).get(task, {}).get("effective")
        for key, b in _figures(scores).items():
            t = _number(theirs.get(key))
            if t is None:
                continue
            metric, _, filter_key = key.partition(",")
            stderr_key = f"{metric}_stderr,{filter_key}"
            b_se, t_se = _number(scores.get(stderr_key)), _number(theirs.get(stderr_key))
            change_se = _paired_stderr(base, tuned, task, key, b, t)
            if change_se is None and b_se is not None and t_se is not None:
                change_se = math.hypot(b_se, t_se)
            better = higher.get(metric)
            better = better if isinstance(better, bool) else None
            headline = task not in members
            beyond_noise = change_se is None or abs(t - b) > NOISE_STDERRS * change_se
            rows.append(
                BenchmarkRow(
                    task=task,
                    metric=metric if filter_key in ("none", "") else f"{metric} ({filter_key})",
                    base=round(b, 6),
                    tuned=round(t, 6),
                    base_stderr=None if b_se is None else round(b_se, 6),
                    tuned_stderr=None if t_se is None else round(t_se, 6),
                    change=round(t - b, 6),
                    change_stderr=None if change_se is None else round(change_se, 6),
                    change_percent=None if b == 0 else round(100 * (t - b) / abs(b), 3),
                    higher_is_better=better,
                    examples=examples,
                    headline=headline,
                    flagged=headline
                    and better is not None
                    and worse_percent(b, t, better) > threshold
                    and beyond_noise,
                )
            )
    return rows
