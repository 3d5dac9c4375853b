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
