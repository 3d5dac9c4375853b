"""Padding waste counted on the batches the model trains on (padding.PaddingTally)."""

from __future__ import annotations

import json

import pytest
import torch

from peftlab.data.packing import PackedCollator, PackedDataset, pack_examples
from peftlab.train.callbacks import TALLY_FILE, TALLY_KEY, PaddingTally


def rows(*lengths: int) -> list[dict[str, list[int]]]:
    blocks = pack_examples([([5] * n, [5] * n) for n in lengths], max_seq_len=64, packing=False)
    return [PackedDataset(blocks)[i] for i in range(len(blocks))]


def test_collator_tags_each_batch_with_its_real_and_pad_tokens():
    collate = PackedCollator(pad_id=0, tally_key=TALLY_KEY)
    # rows of 3, 5 and 2 tokens padded to 5: 10 real, 2 + 0 + 3 = 5 pad
    assert collate(rows(3, 5, 2))[TALLY_KEY] == (10, 5)
    assert collate(rows(4, 4))[TALLY_KEY] == (8, 0)
    assert TALLY_KEY not in PackedCollator(pad_id=0)(rows(3, 5))  # untagged unless asked


def test_only_training_forwards_count_and_the_model_never_sees_the_tag(tiny_model):
    tally = PaddingTally()
    collate = PackedCollator(pad_id=0)
    hooks = dict(tiny_model._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="training failed"), tally.attached(tiny_model, collate) as on:
        assert on and collate.tally_key == TALLY_KEY
        tiny_model.train()
        out = tiny_model(**collate(rows(3, 5, 2)))
        assert out.loss is not None
        tiny_model(**collate(rows(2, 6)))  # 8 real, 4 pad
        tiny_model.eval()
        with torch.no_grad():
            tiny_model(**collate(rows(1, 9)))  # evaluation: not counted
        raise RuntimeError("training failed")  # the hook and the tag go all the same
    assert tally.as_dict() == {"real_tokens": 18, "pad_tokens": 9, "padding_waste": 9 / 27}
    assert collate.tally_key is None and TALLY_KEY not in collate(rows(3))
    assert dict(tiny_model._forward_pre_hooks) == hooks


def test_counts_travel_with_checkpoints(tmp_path):
    class State:
        global_step = 4
        is_world_process_zero = True

    class Args:
        output_dir = str(tmp_path)

    (tmp_path / "checkpoint-4").mkdir()
    tally = PaddingTally()
    tally.real, tally.pad = 30, 10
    tally.on_save(Args(), State(), None)
    saved = json.loads((tmp_path / "checkpoint-4" / TALLY_FILE).read_text())
    assert saved["padding_waste"] == 0.25
    resumed = PaddingTally(tmp_path / "checkpoint-4")
    assert (resumed.real, resumed.pad) == (30, 10)
    with PaddingTally().attached(torch.nn.Linear(2, 2), None) as on:
        assert not on  # fixed-length blocks: nothing to tag
