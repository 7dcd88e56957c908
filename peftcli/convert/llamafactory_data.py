"""LLaMA-Factory datasets: the names a config's `dataset:` lists, declared in dataset_info.json, ->
peftcli data sources ({path, format, columns, roles}).

An entry's `formatting` picks the format (alpaca, sharegpt, openai -> messages), its `columns` and
`tags` become the source's columns and roles. Preference (ranking), KTO and multimodal entries are
refused: peftcli trains text SFT only.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from peftcli.convert.common import names
from peftcli.convert.ledger import Ledger, is_empty, read_json
from peftcli.convert.sources import clean_source, hub_or_local
from peftcli.errors import UserError

INFO_FILE = "dataset_info.json"
# LLaMA-Factory's alpaca columns -> peftcli's alpaca fields (the defaults are peftcli's names too).
ALPACA = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": "history",
    "system": "system",
    "tools": "tools",
}
# Its sharegpt tags -> peftcli roles; the defaults are LLaMA-Factory's (DatasetAttr).
TAG_ROLES = {
    "user_tag": ("human", "user"),
    "assistant_tag": ("gpt", "assistant"),
    "observation_tag": ("observation", "tool"),
    "function_tag": ("function_call", "tool_call"),
    "system_tag": ("system", "system"),
}
MULTIMODAL = ("images", "videos", "audios")
# Keys of an entry that name where the data lives, other than file_name and hf_hub_url.
ELSEWHERE = {
    "ms_hub_url": "ModelScope",
    "om_hub_url": "Modelers (OpenMind)",
    "script_url": "a loading script",
    "cloud_file_name": "cloud storage",
}
_HANDLED = {"file_name", "hf_hub_url", "formatting", "ranking", "columns", "tags", "split", "subset"}
_HANDLED |= set(ELSEWHERE)


def read_info(path: Path) -> dict[str, Any]:
    if path.suffix.lower() in (".yaml", ".yml"):
        raise UserError(
            f"{path}: a LLaMA-Factory v1 dataset YAML, which peftcli does not convert",
            hint=f"pass the {INFO_FILE} that declares the datasets (--dataset-info), or name the files in data.train",
        )
    info = read_json(path, INFO_FILE)
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a mapping of dataset names to declarations")
    return info


def sources(ledger: Ledger, key: str, wanted: Any, info: dict | None, info_path: Path | None, stage: str) -> list[dict]:
    """The sources for the dataset names `wanted` (a list or "a,b"); `info` None: names are hub ids."""
    out: list[dict] = []
    for name in names(wanted):
        if info is None:  # dataset_dir: ONLINE
            out.append({"path": name})
            continue
        if name not in info:
            close = difflib.get_close_matches(name, list(info), n=3)
            raise UserError(
                f"{key}: '{name}' is not declared in {info_path}",
                hint=f"did you mean {', '.join(close)}?" if close else f"it declares: {', '.join(list(info)[:12])}",
            )
        assert info_path is not None
        source = entry_source(ledger, name, info[name], info_path.parent, stage)
        if source is not None:
            out.append(source)
    return out


def entry_source(ledger: Ledger, name: str, entry: Any, folder: Path, stage: str) -> dict | None:
    where = f"dataset_info.{name}"
    if not isinstance(entry, dict):
        raise UserError(f"{INFO_FILE}: '{name}' is not a mapping of file_name, formatting, columns, ...")
    columns = dict(entry.get("columns") or {})
    _refuse(name, entry, columns)
    source = _location(ledger, where, entry, folder)
    formatting = entry.get("formatting", "alpaca")
    # Plain text: a pt run, a .txt file, or an entry that declares only a prompt column (LLaMA-Factory's
    # pre-training corpora: c4_demo, wiki_demo, fineweb, ...).
    text = stage == "pt" or source["path"].lower().endswith(".txt") or set(columns) == {"prompt"}
    if formatting == "alpaca" and text:
        if stage != "pt" and not source["path"].lower().endswith(".txt"):
            ledger.change(f"{where}: only a prompt column -> format: text (pre-training text)", "dataset")
        prompt = columns.pop("prompt", "instruction")
        source.update(format="text", columns={"text": prompt} if prompt != "text" else None)
    elif formatting == "alpaca":
        source.update(format="alpaca", columns=_alpaca_columns(columns))
    elif formatting in ("sharegpt", "openai"):
        source.update(_chat(ledger, where, formatting, columns, entry.get("tags") or {}))
    else:
        raise UserError(
            f"{INFO_FILE}: '{name}' has formatting: {formatting}", hint="LLaMA-Factory's are alpaca, sharegpt, openai"
        )
    for column, value in columns.items():
        ledger.drop(f"{where}.columns.{column}", value, f"the {source['format']} format has no such field")
    for key, value in entry.items():
        if key not in _HANDLED and not is_empty(value):
            reasons = {"num_samples": "peftcli reads every row of a source", "folder": "peftcli has no data_dir"}
            ledger.drop(f"{where}.{key}", value, reasons.get(key, "peftcli has no equivalent"))
    return clean_source(ledger, where, source)


def _refuse(name: str, entry: dict, columns: dict) -> None:
    if entry.get("ranking"):
        raise UserError(
            f"{INFO_FILE}: '{name}' has ranking: true (preference pairs, for DPO/ORPO/reward models)",
            hint="peftcli trains supervised fine-tuning only; pick an SFT dataset",
        )
    if columns.get("kto_tag"):
        raise UserError(
            f"{INFO_FILE}: '{name}' has a kto_tag column (KTO preference labels)",
            hint="peftcli trains supervised fine-tuning only; pick an SFT dataset",
        )
    media = [column for column in MULTIMODAL if columns.get(column)]
    if media:
        raise UserError(
            f"{INFO_FILE}: '{name}' has {'/'.join(media)} columns (multimodal data)",
            hint="peftcli trains text-only causal LMs; pick a text dataset",
        )


def _location(ledger: Ledger, where: str, entry: dict, folder: Path) -> dict:
    """path, split and subset: a local file under the dataset folder, or a Hugging Face hub id."""
    name = where.split(".", 1)[1]
    if entry.get("hf_hub_url"):
        source: dict[str, Any] = {"path": entry["hf_hub_url"]}
        for key in ELSEWHERE:
            if entry.get(key):  # another copy of the same data, for users of that hub: nothing lost
                ledger.also(f"{where}.{key} (hf_hub_url is read)", "dataset")
        if entry.get("split", "train") != "train":
            source["split"] = entry["split"]
        if entry.get("subset"):
            source["subset"] = entry["subset"]
        return source
    for key, what in ELSEWHERE.items():
        if entry.get(key):
            raise UserError(
                f"{INFO_FILE}: '{name}' is read from {what} ({key}: {entry[key]})",
                hint="peftcli reads local files and the Hugging Face hub; download the data and declare file_name",
            )
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise UserError(f"{INFO_FILE}: '{name}' has no file_name (nor hf_hub_url)", hint="declare where its data is")
    local = (folder / Path(file_name).expanduser()).resolve()
    source, _ = hub_or_local(ledger, f"{where}.file_name", file_name, local if local.exists() else None, folder)
    for key in ("split", "subset"):
        if entry.get(key) not in (None, "train"):
            ledger.drop(f"{where}.{key}", entry[key], "applies to hub datasets; this one is a local file")
    return source


def _alpaca_columns(columns: dict) -> dict | None:
    mapped = {}
    for column in list(columns):
        if column in ALPACA:
            value = columns.pop(column)
            if value and value != ALPACA[column]:
                mapped[ALPACA[column]] = value
    return mapped or None


def _chat(ledger: Ledger, where: str, formatting: str, columns: dict, tags: dict) -> dict:
    """sharegpt / openai entries: the turns column, the keys inside a turn, system/tools, roles."""
    messages = columns.pop("messages", "conversations")
    role, content = tags.get("role_tag", "from"), tags.get("content_tag", "value")
    if formatting == "sharegpt" and (role, content) == ("from", "value"):
        fmt, mapped = "sharegpt", {"conversations": messages} if messages != "conversations" else {}
    elif formatting == "sharegpt" and role != "role" and content != "content":
        fmt, mapped = "sharegpt", {"conversations": messages, "from": role, "value": content}
    else:  # role/content turns (or openai): peftcli's messages format
        fmt, mapped = "messages", {"messages": messages} if messages != "messages" else {}
        mapped.update({k: v for k, v in (("role", role), ("content", content)) if k != v})
    for column in ("system", "tools"):
        value = columns.pop(column, None)
        if value:
            mapped[column] = value
    mapped = {k: v for k, v in mapped.items() if k != v}  # a column already named as peftcli names it
    roles = {}
    for tag, (default, peftcli_role) in TAG_ROLES.items():
        value = tags.get(tag, default)
        if value and value != peftcli_role:
            roles[str(value)] = peftcli_role
    for tag, value in tags.items():
        if tag not in TAG_ROLES and tag not in ("role_tag", "content_tag"):
            ledger.drop(f"{where}.tags.{tag}", value, "peftcli has no such tag")
    return {"format": fmt, "columns": mapped or None, "roles": roles or None}
