import json
from collections import Counter

from peftlab.config.sections import DataConfig
from peftlab.data.formats import detect_format, normalise
from peftlab.data.loading import RawRecord, load_raw
from peftlab.data.task import build_task_data


def _norm(fields, fmt="auto", **kw):
    counts: Counter[str] = Counter()
    out = normalise(
        [RawRecord(fields, "x: line 1")], fmt, kw.get("mapping", {}), kw.get("labels"), "fail", counts
    )
    return out[0], counts


def test_alpaca_with_and_without_input():
    rec, _ = _norm({"instruction": "Add.", "input": "1 2", "output": "3"})
    assert rec == {
        "messages": [{"role": "user", "content": "Add.\n\nInput: 1 2"}, {"role": "assistant", "content": "3"}]
    }
    rec, _ = _norm({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert rec["messages"][0]["content"] == "Say hi."


def test_sharegpt_roles_unknown_dropped_and_cut_to_assistant():
    conv = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Q"},
        {"from": "tool", "value": "T"},
        {"from": "gpt", "value": "A"},
        {"from": "human", "value": "Q2"},
    ]
    rec, counts = _norm({"conversations": conv})
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    assert counts["unknown_role_messages_dropped"] == 1 and counts["trailing_user_turns_cut"] == 1


def test_prompt_completion_and_classification_mapping():
    rec, _ = _norm({"prompt": "P", "completion": "C"})
    assert rec["messages"][1] == {"role": "assistant", "content": "C"}
    rec, _ = _norm(
        {"sentence": " good ", "y": 1},
        "classification",
        mapping={"text": "sentence", "label": "y"},
        labels=["neg", "pos"],
    )
    assert rec == {"text": "good", "label": "pos"}
    assert detect_format({"messages": []}, {}) == "messages"


def test_csv_with_header_and_tsv_without(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\nhello,pos\n")
    assert load_raw(str(p))[0].fields == {"text": "hello", "label": "pos"}
    q = tmp_path / "d.tsv"
    q.write_text("hello\t1\n")
    assert load_raw(str(q))[0].fields == {"text": "hello", "label": "1"}


def test_tokenised_cache_is_reused(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Q{i}", "completion": f"A{i}"}) + "\n" for i in range(10)))
    cfg = DataConfig(train_path=str(p), kind="chat", test_fraction=0.2)
    first = build_task_data(cfg, tiny_tokenizer)
    second = build_task_data(cfg, tiny_tokenizer)
    assert "cache_hit" not in first.stats and second.stats["cache_hit"] == 1
    assert first.train_dataset.blocks.input_ids == second.train_dataset.blocks.input_ids  # type: ignore[attr-defined]
    other = build_task_data(cfg.model_copy(update={"max_seq_len": 512}), tiny_tokenizer)
    assert "cache_hit" not in other.stats  # settings are part of the key


def test_parquet_and_json_array(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["P"], "completion": ["C"]}), p)
    assert load_raw(str(p))[0].fields == {"prompt": "P", "completion": "C"}
    q = tmp_path / "d.json"
    q.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [r.fields["text"] for r in load_raw(str(q))] == ["a", "b"]
    assert load_raw(str(q))[1].where.endswith("d.json: record 1")
