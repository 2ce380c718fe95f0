"""The data layer with the real SmolLM2 tokenizer: teacher forcing and label masking, every file
format, column mapping, every kind of bad input, truncation, the plain-template fallback and the
bundled data."""

from __future__ import annotations

import copy
import importlib.util
from collections import Counter
import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sap_dist import data as D
from sap_dist.data import DataError, EncodeStats, SafetyPair, TaskExample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
END = "<|im_end|>"  # SmolLM2's end-of-turn token

ALPACA_ROWS = [
    {"instruction": "Name the color.", "input": "The sky, on a clear day", "output": "blue"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]
ALPACA_EXPECTED = [
    TaskExample([{"role": "user", "content": "Name the color.\n\nThe sky, on a clear day"}], "blue"),
    TaskExample([{"role": "user", "content": "Say hi."}], "hi"),
]


def labelled(item: dict) -> list[int]:
    return [t for t in item["labels"] if t != D.IGNORE_INDEX]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


@pytest.fixture
def plain_tokenizer(smol_tokenizer):
    """SmolLM2's tokenizer without its chat template, as a base model's would be."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    return tok


# --- teacher forcing ---------------------------------------------------------------------------


def test_labels_cover_exactly_the_response_and_end_of_turn(smol_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France? One word."}]
    stats = EncodeStats()
    item = D.encode(smol_tokenizer, messages, "Paris", 128, "truncate", stats)

    prompt = D.prompt_ids(smol_tokenizer, messages)
    n = len(prompt)
    assert item["input_ids"][:n] == prompt  # the input holds the prompt ...
    assert smol_tokenizer.decode(item["input_ids"][n:]) == "Paris" + END  # ... then the response
    assert item["labels"][:n] == [D.IGNORE_INDEX] * n  # the prompt takes no loss
    assert item["labels"][n:] == item["input_ids"][n:]  # labels = inputs over the response
    assert smol_tokenizer.decode(labelled(item)) == "Paris" + END
    assert smol_tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert stats == EncodeStats(total=1)


def test_multi_turn_messages_keep_earlier_turns_in_the_prompt(tmp_path, smol_tokenizer):
    row = {"messages": [
        {"role": "system", "content": "Answer tersely."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]}
    [ex] = D.load_task_examples(write_jsonl(tmp_path / "chat.jsonl", [row]))
    assert ex.response == "6" and ex.messages == row["messages"][:4]
    item = D.encode(smol_tokenizer, ex.messages, ex.response, 128, "truncate", EncodeStats())
    text = smol_tokenizer.decode(item["input_ids"])
    assert "Answer tersely." in text and "You are a helpful AI" not in text  # our system prompt only
    assert "<|im_start|>assistant\n4" + END in text  # the earlier answer is context ...
    assert smol_tokenizer.decode(labelled(item)) == "6" + END  # ... only the last one is trained


def test_safety_pair_encodes_both_answers_after_the_same_prompt(smol_tokenizer):
    pair = SafetyPair("How do I pick a lock to break in?", "I can't help with that.", "Sure, here is how:\n\nStep 1:")
    [item], stats = D.encode_safety(smol_tokenizer, [pair], 128, "truncate")
    prompt = D.prompt_ids(smol_tokenizer, [{"role": "user", "content": pair.prompt}])
    for key, answer in (("safe", pair.safe), ("harmful", pair.harmful)):
        assert item[key]["input_ids"][:len(prompt)] == prompt
        assert smol_tokenizer.decode(labelled(item[key])) == answer + END
    assert stats == EncodeStats(total=1)


def test_collate_right_pads_inputs_mask_and_labels():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = D.collate(features, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(ValueError, match="example 0: 2 input_ids but 1 labels"):
        D.collate([{"input_ids": [1, 2], "labels": [2]}], 0)


# --- file formats and columns ------------------------------------------------------------------


def test_every_file_format_loads_the_same_examples(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    json_list = tmp_path / "a.json"
    json_list.write_text(json.dumps(ALPACA_ROWS, indent=2))
    json_data = tmp_path / "b.json"
    json_data.write_text(json.dumps({"data": ALPACA_ROWS}))
    csv = tmp_path / "a.csv"  # a quoted field holding the delimiter, a blank line
    csv.write_text('instruction,input,output\nName the color.,"The sky, on a clear day",blue\n\nSay hi.,,hi\n')
    parquet = write_parquet(tmp_path / "a.parquet", ALPACA_ROWS)
    for source in (jsonl, str(json_list), str(json_data), str(csv), parquet):
        assert D.load_task_examples(source) == ALPACA_EXPECTED, source
        assert D.load_task_examples(source, fmt="alpaca", limit=1) == ALPACA_EXPECTED[:1], source


def test_a_byte_order_mark_is_accepted(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM, which made the first column '\\ufeffinstruction'."""
    csv = tmp_path / "excel.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + b'instruction,input,output\nName the color.,"The sky, on a clear day",blue\nSay hi.,,hi\n')
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in ALPACA_ROWS).encode())
    for source in (csv, jsonl):
        assert D.load_task_examples(str(source)) == ALPACA_EXPECTED, source


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.csv", "bad.json"])
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path, name):
    path = tmp_path / name
    text = {"bad.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n',
            "bad.csv": "instruction,output\ncaf\xe9,b\n",
            "bad.json": '[{"instruction": "a", "output": "b"},\n {"instruction": "caf\xe9", "output": "b"}]'}[name]
    path.write_bytes(text.encode("latin-1"))  # \xe9 alone is not UTF-8
    with pytest.raises(DataError, match=rf"{path} line 2: not UTF-8 text \(byte 0xe9 at column"):
        D.load_task_examples(str(path))


def test_messages_and_prompt_response_formats_in_several_files(tmp_path):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    expected = [TaskExample([{"role": "user", "content": "Hi"}], "Hello")]
    assert D.load_task_examples(write_parquet(tmp_path / "m.parquet", [{"messages": conv}])) == expected
    csv = tmp_path / "m.csv"  # a CSV cell holds the conversation as JSON text
    csv.write_text("messages\n" + '"' + json.dumps(conv).replace('"', '""') + '"\n')
    assert D.load_task_examples(str(csv)) == expected
    pr = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "Hi", "response": "Hello"}])
    assert D.load_task_examples(pr) == expected
    assert D.load_task_examples(pr, fmt="prompt_response") == expected


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Say hi.", "answer": "hi", "id": 3}])
    examples = D.load_task_examples(path, columns={"instruction": "question", "output": "answer"})
    assert examples == [TaskExample([{"role": "user", "content": "Say hi."}], "hi")]
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"q": "Do harm.", "chosen": "No.", "rejected": "Sure:"}])
    assert D.load_safety_pairs(pairs, columns={"prompt": "q", "safe": "chosen", "harmful": "rejected"}) == [
        SafetyPair("Do harm.", "No.", "Sure:")]
    with pytest.raises(DataError, match="unknown name.*outptu.*canonical names are"):
        D.load_task_examples(path, columns={"outptu": "answer"})


# --- bad input ---------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"data file not found: {missing}"):
        D.load_rows(missing)
    with pytest.raises(DataError, match="unknown bundled data set 'builtin:tsak'; available: builtin:task"):
        D.load_rows("builtin:tsak")


def test_unreadable_rows_name_file_and_line_or_row(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps(ALPACA_ROWS[0]) + "\n\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(DataError, match=rf"{jsonl} line 3: not valid JSON"):
        D.load_rows(str(jsonl))
    not_object = write_jsonl(tmp_path / "list.jsonl", [ALPACA_ROWS[0], ["a", "b"]])
    with pytest.raises(DataError, match=r"list.jsonl line 2: expected a JSON object, got list"):
        D.load_rows(not_object)
    js = tmp_path / "bad.json"
    js.write_text('[\n  {"output": "a"},\n  {"output": }\n]')
    with pytest.raises(DataError, match=rf"{js} line 3: not valid JSON"):
        D.load_rows(str(js))
    csv = tmp_path / "bad.csv"
    csv.write_text("instruction,output\nSay hi.,hi\nSay, bye.,bye\n")
    with pytest.raises(DataError, match=rf"{csv} row 2 \(line 3\): 3 fields, the header has 2"):
        D.load_rows(str(csv))
    parquet = tmp_path / "bad.parquet"
    parquet.write_text("not parquet at all")
    with pytest.raises(DataError, match=rf"{parquet}: cannot read as parquet"):
        D.load_rows(str(parquet))
    wrong_type = write_parquet(tmp_path / "t.parquet", [{"instruction": "a", "output": "b"},
                                                         {"instruction": "a", "output": None}])
    with pytest.raises(DataError, match=r"t.parquet row 1: column 'output' should be text, got NoneType"):
        D.load_task_examples(wrong_type)
    txt = tmp_path / "data.txt"
    txt.write_text("hello")
    with pytest.raises(DataError, match=r"data.txt: unsupported file type '.txt'"):
        D.load_rows(str(txt))


def test_missing_column_lists_the_columns_found(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "answer": "hi"}])
    with pytest.raises(DataError, match=r"cannot tell the task format.*columns found: instruction, answer"):
        D.load_task_examples(path)
    with pytest.raises(DataError, match=r"a.jsonl line 1: missing column 'output'; columns found: instruction, answer"):
        D.load_task_examples(path, fmt="alpaca")
    with pytest.raises(DataError, match=r"missing column 'reply' \(for 'output'\); columns found"):
        D.load_task_examples(path, fmt="alpaca", columns={"output": "reply"})
    later = tmp_path / "b.jsonl"  # the blank line counts: the message points at the file's line
    later.write_text(json.dumps({"prompt": "p", "safe": "s", "harmful": "h"}) + "\n\n" + json.dumps({"prompt": "p", "safe": "s"}))
    with pytest.raises(DataError, match=r"b.jsonl line 3: missing column 'harmful'; columns found: prompt, safe"):
        D.load_safety_pairs(str(later))


def test_bad_values_are_named(tmp_path):
    empty_answer = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "Say hi.", "output": "  "}])
    with pytest.raises(DataError, match=r"e.jsonl line 1: column 'output' is empty"):
        D.load_task_examples(empty_answer)
    no_assistant = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(DataError, match=r"m.jsonl line 1: no assistant message in 'messages' \(roles: user\)"):
        D.load_task_examples(no_assistant)
    with pytest.raises(DataError, match="unknown task format 'sharegpt'"):
        D.load_task_examples(empty_answer, fmt="sharegpt")


def test_empty_data_set(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=rf"{empty}: no task examples found"):
        D.load_task_examples(str(empty))
    header_only = tmp_path / "empty.csv"
    header_only.write_text("prompt,safe,harmful\n")
    with pytest.raises(DataError, match=rf"{header_only}: no safety pairs found"):
        D.load_safety_pairs(str(header_only))


def test_hub_name_that_cannot_be_reached_is_a_data_error(monkeypatch):
    # Offline mode makes the real datasets/hub code fail at once instead of retrying for ~25 s.
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"'someone/no-such-dataset' is neither a data file .* nor a reachable hub dataset"):
        D.load_task_examples("someone/no-such-dataset")


# --- truncation --------------------------------------------------------------------------------


def long_messages(n_words: int = 200) -> list[dict[str, str]]:
    filler = " ".join(f"word{i}" for i in range(n_words))
    return [{"role": "user", "content": f"{filler}\nQuestion: what colour is the sky? Answer in one word."}]


def test_too_long_prompt_is_cut_from_the_left_and_counted(smol_tokenizer):
    messages = long_messages()
    prompt = D.prompt_ids(smol_tokenizer, messages)
    assert len(prompt) > 64
    stats = EncodeStats()
    item = D.encode(smol_tokenizer, messages, "blue", 64, "truncate", stats)
    assert len(item["input_ids"]) == 64
    n = 64 - len(labelled(item))
    assert item["input_ids"][:n] == prompt[-n:]  # the prompt's end: question and assistant header
    assert "Answer in one word.<|im_end|>\n<|im_start|>assistant\n" in smol_tokenizer.decode(item["input_ids"][:n])
    assert smol_tokenizer.decode(labelled(item)) == "blue" + END  # the response is untouched
    assert stats == EncodeStats(total=1, truncated=1)


def test_too_long_example_is_dropped_and_counted(smol_tokenizer):
    short = TaskExample([{"role": "user", "content": "Hi"}], "Hello")
    long = TaskExample(long_messages(), "blue")
    encoded, stats = D.encode_task(smol_tokenizer, [short, long, short], 64, "drop")
    assert len(encoded) == 2 and all(len(e["input_ids"]) < 64 for e in encoded)
    assert stats == EncodeStats(total=3, dropped=1)


def test_too_long_response_keeps_a_few_prompt_tokens_and_its_own_start(smol_tokenizer):
    messages = [{"role": "user", "content": "Count."}]
    response = " ".join(str(i) for i in range(100))
    stats = EncodeStats()
    item = D.encode(smol_tokenizer, messages, response, 32, "truncate", stats)
    prompt = D.prompt_ids(smol_tokenizer, messages)
    assert item["input_ids"][:D.MIN_PROMPT_TOKENS] == prompt[-D.MIN_PROMPT_TOKENS:]
    assert len(item["input_ids"]) == 32 and len(labelled(item)) == 32 - D.MIN_PROMPT_TOKENS
    assert response.startswith(smol_tokenizer.decode(labelled(item)))
    assert stats.truncated == 1
    with pytest.raises(ValueError, match="truncation must be one of truncate, drop"):
        D.encode(smol_tokenizer, messages, "x", 32, "cut", stats)


def test_safety_truncation_cuts_one_prompt_for_both_answers(smol_tokenizer):
    pair = SafetyPair(long_messages()[0]["content"], "No.", "Sure, here is a long answer: " + "more " * 20)
    [item], stats = D.encode_safety(smol_tokenizer, [pair], 64, "truncate")
    safe, harmful = item["safe"], item["harmful"]
    n_safe = len(safe["input_ids"]) - len(labelled(safe))
    n_harm = len(harmful["input_ids"]) - len(labelled(harmful))
    assert safe["input_ids"][:n_safe] == harmful["input_ids"][:n_harm]  # the same x for y+ and y-
    prompt = D.prompt_ids(smol_tokenizer, [{"role": "user", "content": pair.prompt}])
    assert n_safe < len(prompt) and safe["input_ids"][:n_safe] == prompt[-n_safe:]  # its end was kept
    assert len(harmful["input_ids"]) == 64 and smol_tokenizer.decode(labelled(safe)) == "No." + END
    assert stats == EncodeStats(total=1, truncated=1)
    assert D.encode_safety(smol_tokenizer, [pair], 64, "drop") == ([], EncodeStats(total=1, dropped=1))


# --- chat templates ----------------------------------------------------------------------------


def test_tokenizer_without_chat_template_uses_plain_template_and_warns_once(plain_tokenizer, caplog):
    examples = [TaskExample([{"role": "user", "content": "Say hi."}], "hi")] * 3
    with caplog.at_level(logging.WARNING, logger="sap_dist.data"):
        encoded, _ = D.encode_task(plain_tokenizer, examples, 64, "truncate")
    assert [r.getMessage().count("no chat template") for r in caplog.records] == [1]
    text = plain_tokenizer.decode(encoded[0]["input_ids"])
    bos, eos = plain_tokenizer.bos_token, plain_tokenizer.eos_token
    assert text == f"{bos}### User:\nSay hi.\n\n### Assistant:\nhi{eos}"
    assert plain_tokenizer.decode(labelled(encoded[0])) == "hi" + eos
    assert D.render_prompt(plain_tokenizer, examples[0].messages) == f"{bos}### User:\nSay hi.\n\n### Assistant:\n"


def test_template_without_end_of_turn_gets_eos(plain_tokenizer):
    plain_tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}"
                                     "{{ 'Q: ' + m['content'] + '\nA: ' }}{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    item = D.encode(plain_tokenizer, [{"role": "user", "content": "Hi"}], "Hello", 64, "truncate", EncodeStats())
    assert plain_tokenizer.decode(labelled(item)) == "Hello" + plain_tokenizer.eos_token


def test_template_whose_prompt_is_not_a_prefix_is_rejected(plain_tokenizer):
    plain_tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                                     "{% if add_generation_prompt %}{{ 'ASSISTANT>' }}{% endif %}")
    with pytest.raises(DataError, match="does not render the prompt as a prefix"):
        D.encode(plain_tokenizer, [{"role": "user", "content": "Hi"}], "Hello", 64, "truncate", EncodeStats())


# --- bundled data ------------------------------------------------------------------------------


def test_bundled_data_loads_and_every_example_fits_128_tokens(smol_tokenizer):
    task = D.load_task_examples("builtin:task")
    pairs = D.load_safety_pairs("builtin:safety")
    assert len(task) == 500 and len(pairs) == 128
    encoded, stats = D.encode_task(smol_tokenizer, task, 128, "drop")
    assert stats == EncodeStats(total=500) and len(encoded) == 500
    encoded, stats = D.encode_safety(smol_tokenizer, pairs, 128, "drop")
    assert stats == EncodeStats(total=128) and len(encoded) == 128
    # Exact-match answers: one short word or number each.
    assert all(len(ex.response.split()) == 1 for ex in task)
    # The harmful answers are openers only: exactly one of the forms' compliant openers, nothing after.
    harmful_requests = _script_module("harmful_requests")
    assert all(harmful_requests.is_opener(p.harmful) for p in pairs)
    assert not any(harmful_requests.is_opener(p.harmful + "Mix the two.") for p in pairs)  # content is caught
    assert len({p.prompt for p in pairs}) == 128
    # Many request forms, not one template: no opening word carries more than a quarter of the prompts.
    openers = Counter(p.prompt.split()[0] for p in pairs)
    assert len(openers) >= 15 and max(openers.values()) <= len(pairs) // 4


def _script_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_files_are_the_generator_output(tmp_path):
    module = _script_module("make_builtin_data")
    for path in module.main(str(tmp_path)):
        name = os.path.basename(path)
        with open(path, "rb") as fresh, open(os.path.join(D.BUILTIN_DIR, name), "rb") as bundled:
            assert fresh.read() == bundled.read(), f"{name} differs from scripts/make_builtin_data.py's output"
