import json

import pytest

from peftlab.config.sections import DataConfig
from peftlab.data.task import build_task_data
from peftlab.errors import DataError


def _cfg(path, **kw):
    return DataConfig(train_path=str(path), cache=False, test_fraction=0.0, validation_fraction=0.0, **kw)


def test_broken_jsonl_line_names_file_and_line(tmp_path, tiny_tokenizer):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(DataError, match=r"d\.jsonl: line 2 is not valid JSON"):
        build_task_data(_cfg(p, kind="text", format="text"), tiny_tokenizer)


def test_missing_field_named_with_present_fields(tmp_path, tiny_tokenizer):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"sentence": "a", "label": "x"}) + "\n")
    with pytest.raises(DataError, match=r"missing field 'text' \(fields present: label, sentence\)"):
        build_task_data(_cfg(p, kind="classification"), tiny_tokenizer)
    # a field mapping fixes it
    data = build_task_data(_cfg(p, kind="classification", fields={"text": "sentence"}), tiny_tokenizer)
    assert data.stats["train_examples"] == 1


def test_empty_data_set(tmp_path, tiny_tokenizer):
    p = tmp_path / "d.jsonl"
    p.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        build_task_data(_cfg(p, kind="chat"), tiny_tokenizer)


def test_label_outside_label_set_fails_or_is_skipped(tmp_path, tiny_tokenizer):
    p = tmp_path / "d.tsv"
    p.write_text("good film\t1\nbad film\t0\nodd film\t7\n")
    cfg = _cfg(p, kind="classification", label_names=["negative", "positive"], header=False)
    with pytest.raises(DataError, match="line 3: label 7 is outside the label set"):
        build_task_data(cfg, tiny_tokenizer)
    data = build_task_data(cfg.model_copy(update={"on_error": "skip"}), tiny_tokenizer)
    assert data.stats["skipped_bad_records"] == 1 and data.stats["train_examples"] == 2


def test_undecodable_bytes(tmp_path, tiny_tokenizer):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="line 2 is not valid UTF-8"):
        build_task_data(_cfg(p, kind="text", format="text"), tiny_tokenizer)


def test_conversation_without_assistant_turn(tmp_path, tiny_tokenizer):
    p = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "prompter", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    bad = {"messages": [{"role": "prompter", "content": "Hi"}]}
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match="line 2: conversation has no assistant turn"):
        build_task_data(_cfg(p, kind="chat"), tiny_tokenizer)
    data = build_task_data(_cfg(p, kind="chat", on_error="skip"), tiny_tokenizer)
    assert data.stats["skipped_bad_records"] == 1 and data.stats["train_examples"] == 1
