import torch

from peftlab.data.packing import (
    IGNORE_INDEX,
    PackedCollator,
    PackedDataset,
    block_diagonal_causal_mask,
    pack_examples,
)

EXAMPLES = [
    ([5, 9, 14, 20, 33, 41], [IGNORE_INDEX, IGNORE_INDEX, 14, 20, 33, 41]),
    ([7, 8, 100, 101], [IGNORE_INDEX, 8, 100, 101]),
    ([60, 61, 62, 63, 64, 65, 66], [60, 61, IGNORE_INDEX, 63, 64, 65, 66]),
    ([3, 4, 5], [3, 4, 5]),
]


def test_pack_examples_restarts_positions_and_masks_first_label():
    blocks = pack_examples(EXAMPLES, max_seq_len=12, packing=True)
    assert blocks.input_ids == [EXAMPLES[0][0] + EXAMPLES[1][0], EXAMPLES[2][0] + EXAMPLES[3][0]]
    assert blocks.position_ids[0] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert blocks.labels[0][6] == IGNORE_INDEX  # would be predicted from the previous example
    assert blocks.real_tokens == 20 and blocks.pad_tokens == 4
    unpacked = pack_examples(EXAMPLES, max_seq_len=12, packing=False)
    assert len(unpacked) == 4 and unpacked.row_length == 7 and unpacked.pad_tokens == 28 - 20


def test_block_diagonal_mask():
    mask = block_diagonal_causal_mask(torch.tensor([[0, 1, 0, 1, 2]]))
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]


def _alone(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0]  # (L, V)


def test_packed_logits_equal_logits_alone(tiny_model):
    blocks = pack_examples(EXAMPLES, max_seq_len=24, packing=True)
    assert len(blocks) == 1  # all four in one row
    for explicit in (False, True):
        batch = PackedCollator(pad_id=0, explicit_mask=explicit)([PackedDataset(blocks)[0]])
        batch.pop("labels")
        with torch.no_grad():
            packed = tiny_model(**batch).logits[0]  # (L, V)
            start = 0
            for ids, _ in EXAMPLES:
                alone = _alone(tiny_model, ids)
                assert torch.allclose(packed[start : start + len(ids)], alone, atol=1e-5), explicit
                start += len(ids)
            # and the mask really matters: without position ids the second example differs
            plain = tiny_model(input_ids=batch["input_ids"]).logits[0]
            n0 = len(EXAMPLES[0][0])
            assert not torch.allclose(plain[n0 : n0 + 4], _alone(tiny_model, EXAMPLES[1][0]), atol=1e-3)


def test_packed_batch_loss_equals_token_weighted_loss_of_examples(tiny_model):
    blocks = pack_examples(EXAMPLES, max_seq_len=12, packing=True)
    ds = PackedDataset(blocks)
    batch = PackedCollator(pad_id=0)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        packed_loss = tiny_model(**batch).loss
        total, n = 0.0, 0
        for ids, labels in EXAMPLES:
            lab = [IGNORE_INDEX, *labels[1:]]
            count = sum(1 for x in lab[1:] if x != IGNORE_INDEX)
            out = tiny_model(input_ids=torch.tensor([ids]), labels=torch.tensor([lab]))
            total += out.loss.item() * count
            n += count
    assert abs(packed_loss.item() - total / n) < 1e-5
