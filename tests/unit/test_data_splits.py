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

    from peftlab.config import DataConfig
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
