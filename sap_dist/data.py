"""The data layer: load the task data (D_task) and the contrastive safety pairs (D_safety) from a
file, a hub dataset or the bundled files, and encode them for teacher-forced training.

Loading turns any source into plain rows (`load_rows`), then into typed examples
(`load_task_examples`, `load_safety_pairs`); every bad input raises `DataError` naming the file and
the line (jsonl/json) or row (csv/parquet), or the missing column together with the columns found.

Encoding follows docs/SAP.md: the input holds prompt and response (teacher forcing), the labels
cover only the response, and the response ends with the chat template's end-of-turn token so the
model learns to stop. The prompt is the chat template's rendering with the assistant header
(`render_prompt`), exactly what generation sees; tokenize it with `add_special_tokens=False`
(`prompt_ids`), because the rendered text already holds every special token the model expects.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a position that takes no loss (the prompt, the padding)."""

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled")
BUILTIN = {"builtin:task": "task.jsonl", "builtin:safety": "safety_pairs.jsonl"}
"""Bundled data sets, by source name; see sap_dist/bundled/SOURCES.md."""

FILE_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")

TASK_FORMATS = {
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "prompt_response": ("prompt", "response"),
}
"""Canonical columns of each task format. Alpaca's `input` is optional (absent or empty = none)."""
SAFETY_COLUMNS = ("prompt", "safe", "harmful")

PLAIN_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] + '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)
"""Chat template used for a tokenizer that has none (a base model): one block per turn,
`### User:\n<content>\n\n`, then `### Assistant:\n`, preceded by the tokenizer's BOS token if it
has one (the rendered text is tokenized without adding special tokens). The response is followed
by the EOS token so the model learns to stop. Install it on such a tokenizer
(`tokenizer.chat_template = PLAIN_TEMPLATE`) before saving so inference renders prompts the same."""

MIN_PROMPT_TOKENS = 8
"""Truncation keeps at least this many prompt tokens (its end: the question's last words and the
assistant header), cutting the response instead when both do not fit."""

TRUNCATION_MODES = ("truncate", "drop")


class DataError(ValueError):
    """Data that cannot be used; the message names the file and line/row, or the column."""


@dataclass
class TaskExample:
    """One fine-tuning example."""

    messages: list[dict[str, str]]
    """The prompt as chat messages (system/user/earlier assistant turns), without the answer."""
    response: str
    """The answer to train on."""


@dataclass
class SafetyPair:
    """One contrastive pair: a harmful prompt, a safe answer (y+) and a harmful answer (y-)."""

    prompt: str
    safe: str
    harmful: str


@dataclass
class EncodeStats:
    """What encoding did to the examples; the trainer reports it in the run summary."""

    total: int = 0
    """Examples (or pairs) seen."""
    truncated: int = 0
    """Kept, but cut to fit max_length."""
    dropped: int = 0
    """Skipped because they did not fit (truncation='drop')."""


# ---------------------------------------------------------------------------------------------
# Loading rows
# ---------------------------------------------------------------------------------------------


def load_rows(source: str, split: str = "train") -> list[dict]:
    """Rows of a data source as plain dicts.

    `builtin:task` / `builtin:safety` are the bundled files; a path ending in .jsonl, .json (a list
    of objects, or {"data": [...]}), .csv or .parquet is read by extension; an existing directory
    or any other name goes to `datasets.load_dataset(source, split=split)` (a hub dataset).
    """
    return _load_located(source, split)[0]


def _load_located(source: str, split: str) -> tuple[list[dict], list[str]]:
    """Rows plus, for each, where it came from ("file.jsonl line 7"), for error messages."""
    if source.startswith("builtin:"):
        if source not in BUILTIN:
            raise DataError(f"unknown bundled data set {source!r}; available: {', '.join(BUILTIN)}")
        return _read_file(os.path.join(BUILTIN_DIR, BUILTIN[source]))
    ext = os.path.splitext(source)[1].lower()
    if ext in FILE_EXTENSIONS:
        if not os.path.isfile(source):
            raise DataError(f"data file not found: {source}")
        return _read_file(source)
    if os.path.isfile(source):
        raise DataError(f"{source}: unsupported file type {ext or '(no extension)'!r}; "
                        f"use one of {', '.join(FILE_EXTENSIONS)}")
    return _read_hub(source, split)


def _read_file(path: str) -> tuple[list[dict], list[str]]:
    ext = os.path.splitext(path)[1].lower()
    reader = {".jsonl": read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}[ext]
    return reader(path)


def _read_text(path: str) -> str:
    """The file as text: UTF-8, with or without the byte-order mark Excel's "CSV UTF-8" writes;
    other bytes are a DataError naming the line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start, lineno = raw.rfind(b"\n", 0, e.start) + 1, raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} "
                        f"at column {e.start - line_start + 1}); save the file as UTF-8") from None


def read_jsonl(path: str) -> tuple[list[dict], list[str]]:
    """The objects of a JSON-lines file and where each stands (`PATH line N`); blank lines are
    skipped; bad bytes, bad JSON or a non-object line is a DataError naming the line."""
    rows, where = [], []
    with io.StringIO(_read_text(path)) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing one) are not rows
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            where.append(f"{path} line {lineno}")
    return rows, where


def _read_json(path: str) -> tuple[list[dict], list[str]]:
    with io.StringIO(_read_text(path)) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects or {{\"data\": [...]}}, "
                        f"got {type(data).__name__}" + (f" with keys {sorted(data)}" if isinstance(data, dict) else ""))
    # json.load keeps no line numbers; the item's index is the next best pointer.
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path} item {i}: expected a JSON object, got {type(row).__name__}")
    return data, [f"{path} item {i}" for i in range(len(data))]


def _read_csv(path: str) -> tuple[list[dict], list[str]]:
    rows, where = [], []
    with io.StringIO(_read_text(path), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return [], []
        # Row numbers count data rows from 1 (the header is not a row); the line helps with
        # quoted fields that span several lines.
        for rowno, values in enumerate(reader, start=1):
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise DataError(f"{path} row {rowno} (line {reader.line_num}): {len(values)} fields, "
                                f"the header has {len(header)} ({', '.join(header)})")
            rows.append(dict(zip(header, values)))
            where.append(f"{path} row {rowno}")
    return rows, where


def _read_parquet(path: str) -> tuple[list[dict], list[str]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt or non-parquet file
        raise DataError(f"{path}: cannot read as parquet ({e})") from None
    return rows, [f"{path} row {i}" for i in range(len(rows))]


def _read_hub(name: str, split: str) -> tuple[list[dict], list[str]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing repo, missing split: all mean "cannot use this name"
        raise DataError(f"{name!r} is neither a data file ({', '.join(FILE_EXTENSIONS)}) nor a reachable "
                        f"hub dataset with split {split!r}: {type(e).__name__}: {e}") from e
    rows = ds.to_list()
    return rows, [f"{name} [{split}] row {i}" for i in range(len(rows))]


# ---------------------------------------------------------------------------------------------
# Rows -> examples
# ---------------------------------------------------------------------------------------------


def load_task_examples(source: str, fmt: str = "auto", columns: dict[str, str] | None = None,
                       split: str = "train", limit: int | None = None) -> list[TaskExample]:
    """Task examples from `source` (see `load_rows`).

    fmt: `alpaca` (instruction, input, output), `messages` (a list of {role, content}; the last
    assistant message is the response, the turns before it the prompt, any after it are ignored),
    `prompt_response` (prompt, response), or `auto` (picked from the first row's columns).
    columns: canonical name -> column name in the data, e.g. {"output": "answer"}.
    limit: keep the first `limit` examples.
    """
    _check_limit(limit)
    rows, where = _load_located(source, split)
    if limit is not None:
        rows, where = rows[:limit], where[:limit]
    if not rows:
        raise DataError(f"{source}: no task examples found")
    known = sorted({c for cols in TASK_FORMATS.values() for c in cols})
    mapping = _mapping(columns, known, source)
    if fmt == "auto":
        fmt = _detect_format(rows[0], mapping, where[0])
    elif fmt not in TASK_FORMATS:
        raise DataError(f"unknown task format {fmt!r}; use auto, {', '.join(TASK_FORMATS)}")
    convert = {"alpaca": _alpaca, "messages": _messages, "prompt_response": _prompt_response}[fmt]
    return [convert(row, mapping, loc) for row, loc in zip(rows, where)]


def load_safety_pairs(source: str, columns: dict[str, str] | None = None, split: str = "train",
                      limit: int | None = None) -> list[SafetyPair]:
    """Contrastive pairs (prompt, safe, harmful) from `source`; `columns` maps those names to
    the data's columns; `limit` keeps the first pairs."""
    _check_limit(limit)
    rows, where = _load_located(source, split)
    if limit is not None:
        rows, where = rows[:limit], where[:limit]
    if not rows:
        raise DataError(f"{source}: no safety pairs found")
    mapping = _mapping(columns, list(SAFETY_COLUMNS), source)
    return [SafetyPair(*(_text(row, mapping, name, loc) for name in SAFETY_COLUMNS))
            for row, loc in zip(rows, where)]


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")


def _mapping(columns: dict[str, str] | None, known: list[str], source: str) -> dict[str, str]:
    """canonical -> data column for every canonical name; an unknown key is a typo, not data."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(known))
    if unknown:
        raise DataError(f"{source}: column mapping has unknown name(s) {', '.join(unknown)}; "
                        f"the canonical names are {', '.join(known)}")
    return {name: columns.get(name, name) for name in known}


def _detect_format(row: dict, mapping: dict[str, str], where: str) -> str:
    if mapping["messages"] in row:
        return "messages"
    if mapping["instruction"] in row and mapping["output"] in row:
        return "alpaca"
    if mapping["prompt"] in row and mapping["response"] in row:
        return "prompt_response"
    raise DataError(f"{where}: cannot tell the task format; expected columns "
                    f"{mapping['instruction']}+{mapping['output']} (alpaca), {mapping['messages']} (messages) or "
                    f"{mapping['prompt']}+{mapping['response']} (prompt_response); columns found: {_found(row)}")


def _found(row: dict) -> str:
    return ", ".join(map(str, row)) or "(none)"


def _text(row: dict, mapping: dict[str, str], name: str, where: str, optional: bool = False) -> str:
    """The row's value for canonical column `name` as non-empty text (empty allowed if optional)."""
    column = mapping[name]
    if column not in row:
        if optional:
            return ""
        raise DataError(f"{where}: missing column {column!r}" + (f" (for {name!r})" if column != name else "")
                        + f"; columns found: {_found(row)}")
    value = row[column]
    if value is None and optional:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a numeric answer in JSON is still an exact-match text answer
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} should be text, got {type(value).__name__}")
    if not value.strip() and not optional:
        raise DataError(f"{where}: column {column!r} is empty")
    return value


def _alpaca(row: dict, mapping: dict[str, str], where: str) -> TaskExample:
    instruction = _text(row, mapping, "instruction", where)
    extra = _text(row, mapping, "input", where, optional=True)
    output = _text(row, mapping, "output", where)
    # The usual Alpaca layout without its preamble: the chat template supplies the framing.
    content = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return TaskExample(messages=[{"role": "user", "content": content}], response=output)


def _prompt_response(row: dict, mapping: dict[str, str], where: str) -> TaskExample:
    prompt = _text(row, mapping, "prompt", where)
    return TaskExample(messages=[{"role": "user", "content": prompt}],
                       response=_text(row, mapping, "response", where))


def _messages(row: dict, mapping: dict[str, str], where: str) -> TaskExample:
    column = mapping["messages"]
    if column not in row:
        raise DataError(f"{where}: missing column {column!r}; columns found: {_found(row)}")
    messages = row[column]
    if isinstance(messages, str):  # a CSV cell holds the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: column {column!r} is not a JSON list of messages ({e.msg})") from None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: column {column!r} should be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: message {i} of {column!r} should be {{role: text, content: text}}, got {m!r}")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: no assistant message in {column!r} (roles: "
                        f"{', '.join(m['role'] for m in messages)}), so there is no response to train on")
    if last == 0:
        raise DataError(f"{where}: the assistant message is the first one in {column!r}; there is no prompt")
    if not messages[last]["content"].strip():
        raise DataError(f"{where}: the last assistant message in {column!r} is empty")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    return TaskExample(messages=prompt, response=messages[last]["content"])


# ---------------------------------------------------------------------------------------------
# Rendering and encoding
# ---------------------------------------------------------------------------------------------

_warned_plain: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _has_template(tokenizer) -> bool:
    if getattr(tokenizer, "chat_template", None):
        return True
    try:
        first = tokenizer not in _warned_plain  # warn once per tokenizer, not once per example
        _warned_plain.add(tokenizer)
    except TypeError:  # an object that takes no weak reference: warn every time rather than never
        first = True
    if first:
        logger.warning("tokenizer %s has no chat template; using sap_dist.data.PLAIN_TEMPLATE "
                       "('### User:' / '### Assistant:' blocks, response + EOS)",
                       getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    return False


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt as the model sees it at generation time: the chat template with the assistant
    header (add_generation_prompt=True), or PLAIN_TEMPLATE for a tokenizer without one."""
    template = None if _has_template(tokenizer) else PLAIN_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `render_prompt` (no special tokens added: the rendered text holds them)."""
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


def render_response(tokenizer, messages: list[dict], response: str) -> str:
    """The text the model must produce after the prompt: the response and the template's
    end-of-turn token, i.e. the full conversation's rendering minus the rendered prompt. Trailing
    whitespace after the end-of-turn (ChatML's newline between turns) is dropped: generation stops
    at the end-of-turn token and never sees it."""
    prompt = render_prompt(tokenizer, messages)
    if not _has_template(tokenizer):
        return response + (tokenizer.eos_token or "")
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                         tokenize=False)
    if not full.startswith(prompt):
        # The template renders the prompt differently with an answer after it, so a model trained
        # on `full` would not see at generation time what it saw in training.
        raise DataError("the tokenizer's chat template does not render the prompt as a prefix of the "
                        "conversation; teacher forcing would not match generation.\nprompt: "
                        f"{prompt!r}\nconversation: {full!r}")
    tail = full[len(prompt):].rstrip()
    if tail == response.rstrip() and tokenizer.eos_token:
        tail = response + tokenizer.eos_token  # a template with no end-of-turn marker: teach EOS
    return tail


def _fit(n_prompt: int, n_response: int, max_length: int) -> tuple[int, int]:
    """How many prompt tokens (kept from the end) and response tokens (kept from the start) fit."""
    if n_prompt + n_response <= max_length:
        return n_prompt, n_response
    keep_prompt = max(max_length - n_response, min(n_prompt, MIN_PROMPT_TOKENS))
    return keep_prompt, max_length - keep_prompt


def _check_encode_args(max_length: int, truncation: str) -> None:
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_MODES)}, got {truncation!r}")
    if max_length <= MIN_PROMPT_TOKENS:
        raise ValueError(f"max_length must exceed {MIN_PROMPT_TOKENS} (the prompt tokens truncation keeps), "
                         f"got {max_length}")


def _join(prompt: list[int], response: list[int]) -> dict[str, list[int]]:
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}


def encode(tokenizer, messages: list[dict], response: str, max_length: int, truncation: str,
           stats: EncodeStats) -> dict | None:
    """{input_ids, labels} of one example for teacher forcing: input = prompt + response tokens,
    labels = -100 over the prompt and the response tokens over the response (which ends with the
    end-of-turn token). Too long: 'truncate' keeps the prompt's end (at least MIN_PROMPT_TOKENS)
    and then the response's start; 'drop' returns None. Counted in `stats`."""
    _check_encode_args(max_length, truncation)
    stats.total += 1
    p = prompt_ids(tokenizer, messages)
    r = tokenizer(render_response(tokenizer, messages, response), add_special_tokens=False)["input_ids"]
    n_p, n_r = _fit(len(p), len(r), max_length)
    if (n_p, n_r) == (len(p), len(r)):
        return _join(p, r)
    if truncation == "drop":
        stats.dropped += 1
        return None
    stats.truncated += 1
    return _join(p[len(p) - n_p:], r[:n_r])


def encode_task(tokenizer, examples: list[TaskExample], max_length: int,
                truncation: str) -> tuple[list[dict], EncodeStats]:
    """Encode every task example; dropped ones are left out and counted."""
    stats = EncodeStats()
    encoded = [encode(tokenizer, ex.messages, ex.response, max_length, truncation, stats) for ex in examples]
    return [e for e in encoded if e is not None], stats


def encode_safety(tokenizer, pairs: list[SafetyPair], max_length: int,
                  truncation: str) -> tuple[list[dict], EncodeStats]:
    """Encode each pair as {"safe": {input_ids, labels}, "harmful": {input_ids, labels}}, the
    prompt rendered as a single user message. Both answers are conditioned on the same prompt
    tokens: truncation cuts the prompt once, to what the longer answer leaves room for, so that
    logp(safe|x) and logp(harmful|x) compare answers to one x. Stats count pairs."""
    _check_encode_args(max_length, truncation)
    stats = EncodeStats()
    out = []
    for pair in pairs:
        stats.total += 1
        messages = [{"role": "user", "content": pair.prompt}]
        p = prompt_ids(tokenizer, messages)
        answers = {k: tokenizer(render_response(tokenizer, messages, text), add_special_tokens=False)["input_ids"]
                   for k, text in (("safe", pair.safe), ("harmful", pair.harmful))}
        longest = max(len(r) for r in answers.values())
        n_p, _ = _fit(len(p), longest, max_length)
        if len(p) + longest <= max_length:
            out.append({k: _join(p, r) for k, r in answers.items()})
            continue
        if truncation == "drop":
            stats.dropped += 1
            continue
        stats.truncated += 1
        kept = p[len(p) - n_p:]
        out.append({k: _join(kept, r[:max_length - n_p]) for k, r in answers.items()})
    return out, stats


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch of {input_ids, labels}: long tensors right-padded to the longest, attention_mask 1 on
    real tokens, labels -100 on padding."""
    if not features:
        raise ValueError("collate needs at least one example")
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        if len(f["labels"]) != n:
            raise ValueError(f"example {i}: {n} input_ids but {len(f['labels'])} labels")
        ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(f["labels"], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
