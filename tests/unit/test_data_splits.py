from collections import Counter

from peftlab.data.splits import remove_overlap, sample, split_by_group


def test_group_split_never_straddles():
    records = [{"i": i} for i in range(200)]
    groups = [f"conv{i // 3}" for i in range(200)]  # records share conversations, like oasst1 paths
    train, test = split_by_group(records, groups, 0.2, seed=1)
    train_groups = {groups[r["i"]] for r in train}
    test_groups = {groups[r["i"]] for r in test}
    assert train_groups.isdisjoint(test_groups)
    assert len(train) + len(test) == 200 and 0 < len(test) < 200


def test_sample_is_seeded_and_counts():
    data = list(range(100))
    assert sample(data, 10, 3) == sample(data, 10, 3)
    assert sample(data, 10, 3) != sample(data, 10, 4)
    assert len(sample(data, 0.25, 0)) == 25


def test_overlap_removal_exact_and_normalised_counts():
    test = [{"text": "The dog sat.", "label": "1"}, {"messages": [{"role": "user", "content": "Hi  there"}]}]
    train = [
        {"text": "The dog sat.", "label": "0"},  # same sentence, other label: still a leak (exact)
        {"text": "the  DOG sat.", "label": "1"},  # normalised match
        {"messages": [{"role": "user", "content": "hi there"}]},  # normalised match
        {"text": "A cat.", "label": "1"},
    ]
    counts: Counter[str] = Counter()
    kept = remove_overlap(train, test, counts)
    assert kept == [{"text": "A cat.", "label": "1"}]
    assert counts["overlap_removed_exact"] == 1 and counts["overlap_removed_normalised"] == 2


def test_group_keys_stay_aligned_when_bad_records_are_skipped(tmp_path, tiny_tokenizer):
    import json

    from peftlab.config.sections import DataConfig
    from peftlab.data.task import build_task_data

    rows = []
    for i in range(30):
        reply = [] if i % 5 == 0 else [{"role": "assistant", "content": f"A{i // 3}"}]
        rows.append({"cid": f"g{i // 3}", "messages": [{"role": "user", "content": f"Q{i // 3}"}, *reply]})
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(
        train_path=str(p),
        kind="chat",
        group_key="cid",
        on_error="skip",
        test_fraction=0.3,
        cache=False,
        dedupe=False,
    )
    data = build_task_data(cfg, tiny_tokenizer)
    test_groups = {r["messages"][0]["content"] for r in data.test_records}
    train_prompts = {tiny_tokenizer.decode(ids) for ids in data.train_dataset.blocks.input_ids}  # type: ignore[attr-defined]
    assert data.stats["skipped_bad_records"] == 6
    # every record of a group holds the same question: no test question appears in train
    assert test_groups and not any(f"\n{q}<|im_end|>" in text for q in test_groups for text in train_prompts)


# --- validation split (issue 5): three parts, group-aware, deduped, seeded, counted -------------


def _chat_rows(n_groups: int, per_group: int) -> list[dict]:
    """Records of a conversation share its group id, and every record names its group (g<k>)."""
    return [
        {
            "cid": f"c{g}",
            "messages": [
                {"role": "user", "content": f"question g{g}x{i}"},
                {"role": "assistant", "content": f"answer g{g}x{i}"},
            ],
        }
        for g in range(n_groups)
        for i in range(per_group)
    ]


def _write_jsonl(path, rows) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _groups_in(dataset, tokenizer) -> set[str]:
    import re

    texts = [tokenizer.decode(ids) for ids in dataset.blocks.input_ids]
    return {m for text in texts for m in re.findall(r"g\d+(?=x)", text)}


def _chat_data(tmp_path, tokenizer, seed=42, **settings):
    from peftlab.config.sections import DataConfig
    from peftlab.data.task import build_task_data

    path = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows(40, 3))
    cfg = DataConfig(train_path=path, kind="chat", group_key="cid", cache=False, **settings)
    return build_task_data(cfg, tokenizer, seed)


def test_no_group_straddles_train_validation_and_test(tmp_path, tiny_tokenizer):
    data = _chat_data(tmp_path, tiny_tokenizer, test_fraction=0.2, validation_fraction=0.25)
    train = _groups_in(data.train_dataset, tiny_tokenizer)
    validation = _groups_in(data.validation_dataset, tiny_tokenizer)
    test = {r["messages"][0]["content"].split()[1].split("x")[0] for r in data.test_records}
    assert train and validation and test
    assert train.isdisjoint(validation) and train.isdisjoint(test) and validation.isdisjoint(test)
    assert len(train | validation | test) == 40
    s = data.stats
    # 40 groups: 8 to test; 8 of the remaining 32 to validation; 3 records each
    assert (s["test_groups"], s["validation_groups"], s["train_groups"]) == (8, 8, 24)
    assert (s["test_records"], s["validation_records"], s["train_records"]) == (24, 24, 72)
    assert s["validation_examples"] == 24 and s["validation_blocks"] >= 1
    assert "groups (cid)" in s["validation_source"]


def test_validation_split_is_seeded(tmp_path, tiny_tokenizer):
    def validation_groups(seed):
        data = _chat_data(tmp_path, tiny_tokenizer, seed, validation_fraction=0.25)
        return _groups_in(data.validation_dataset, tiny_tokenizer)

    assert validation_groups(1) == validation_groups(1)
    assert validation_groups(1) != validation_groups(2)


def test_validation_fraction_zero_turns_it_off(tmp_path, tiny_tokenizer):
    data = _chat_data(tmp_path, tiny_tokenizer, validation_fraction=0)
    assert data.validation_dataset is None
    assert data.stats["validation_records"] == 0 and data.stats["validation_source"] == "none"


def test_validation_is_disjoint_from_train_exactly_and_normalised(tmp_path, tiny_tokenizer):
    from peftlab.config.sections import DataConfig
    from peftlab.data.task import build_task_data

    def rec(text, label):
        return {"text": text, "label": label}

    train = [rec(f"sentence number {i}", i % 2) for i in range(20)]
    train += [rec("The dog sat.", 0), rec("the  DOG   sat.", 1), rec("A cat ran.", 1)]
    validation = [rec("The dog sat.", 1), rec("a CAT ran.", 0), rec("sentence number 3", 1)]
    test = [rec("sentence number 3", 1)]  # also in validation: removed from validation, not test
    cfg = DataConfig(
        kind="classification",
        train_path=_write_jsonl(tmp_path / "train.jsonl", train),
        validation_path=_write_jsonl(tmp_path / "valid.jsonl", validation),
        test_path=_write_jsonl(tmp_path / "test.jsonl", test),
        label_names=["neg", "pos"],
        cache=False,
    )
    data = build_task_data(cfg, tiny_tokenizer)
    s = data.stats
    # train loses: 'The dog sat.' (exact), 'the  DOG   sat.' and 'A cat ran.' (normalised), number 3 (exact)
    assert s["overlap_removed_exact"] == 2 and s["overlap_removed_normalised"] == 2
    assert s["validation_overlap_removed_exact"] == 1 and s["validation_overlap_removed_normalised"] == 0
    assert s["train_records"] == 19 and s["validation_records"] == 2 and s["test_records"] == 1
    assert s["validation_source"] == "data.validation_path"
    train_text = " ".join(tiny_tokenizer.decode(ids) for ids in data.train_dataset.blocks.input_ids)
    assert "dog" not in train_text.lower() and "cat" not in train_text.lower()


def test_raw_text_holds_out_the_last_training_blocks(tmp_path, tiny_tokenizer):
    import torch

    from peftlab.config.sections import DataConfig
    from peftlab.data.task import build_task_data

    path = tmp_path / "train.raw"
    path.write_text(" = A = \n" + " the quick brown fox" * 200)
    whole = build_task_data(
        DataConfig(train_path=str(path), block_size=16, validation_fraction=0), tiny_tokenizer
    )
    split = build_task_data(
        DataConfig(train_path=str(path), block_size=16, validation_fraction=0.1), tiny_tokenizer
    )
    n = len(whole.train_dataset)
    n_val = round(n * 0.1)
    assert whole.validation_dataset is None and whole.stats["validation_source"] == "none"
    assert len(split.train_dataset) == n - n_val and len(split.validation_dataset) == n_val
    assert torch.equal(split.validation_dataset[0]["input_ids"], whole.train_dataset[n - n_val]["input_ids"])
    assert torch.equal(
        split.train_dataset[n - n_val - 1]["input_ids"], whole.train_dataset[n - n_val - 1]["input_ids"]
    )
    assert (
        split.stats["validation_source"]
        == f"the last {n_val} of {n} training blocks (data.validation_fraction=0.1)"
    )
    assert (
        split.stats["train_real_tokens"] + split.stats["validation_real_tokens"]
        == whole.stats["train_real_tokens"]
    )

    valid = tmp_path / "valid.raw"
    valid.write_text(" the lazy dog" * 30)
    own = build_task_data(
        DataConfig(train_path=str(path), block_size=16, validation_path=str(valid)), tiny_tokenizer
    )
    assert len(own.train_dataset) == n and own.stats["validation_source"].startswith("data.validation_path")
    assert "lazy dog" in tiny_tokenizer.decode(own.validation_dataset[0]["input_ids"])
