from peftlab.data.packing import IGNORE_INDEX, group_concatenated, group_per_document
from peftlab.data.text import split_documents


def test_concatenated_blocks_join_documents_with_eos_and_drop_remainder():
    blocks = group_concatenated([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=4, eos_id=0)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 -> three full blocks
    assert blocks.input_ids == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert blocks.labels == blocks.input_ids
    assert blocks.real_tokens == 12 and blocks.pad_tokens == 0


def test_concatenated_blocks_respect_token_budget():
    blocks = group_concatenated([[1, 2, 3, 4, 5, 6, 7, 8, 9]], block_size=3, eos_id=None, max_tokens=7)
    assert blocks.input_ids == [[1, 2, 3], [4, 5, 6]]


def test_per_document_blocks_never_mix_documents_and_mask_padding():
    blocks = group_per_document([[1, 2, 3, 4, 5], [6, 7]], block_size=4, eos_id=0, pad_id=99)
    assert blocks.input_ids == [[1, 2, 3, 4], [5, 0, 99, 99], [6, 7, 0, 99]]
    assert blocks.labels == [[1, 2, 3, 4], [5, 0, IGNORE_INDEX, IGNORE_INDEX], [6, 7, 0, IGNORE_INDEX]]
    assert blocks.attention_mask == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert blocks.real_tokens == 9 and blocks.pad_tokens == 3
    assert abs(blocks.padding_waste - 3 / 12) < 1e-12


def test_wikitext_documents_split_at_top_level_headings_only():
    text = " = A = \n x .\n = = sub = = \n y .\n = B = \n z .\n"
    assert split_documents(text, "wikitext_headings") == [
        " = A = \n x .\n = = sub = = \n y .\n",
        " = B = \n z .\n",
    ]
    assert split_documents("a\n\n\nb\n", "blank_lines") == ["a", "b\n"]
    assert split_documents("a\n\nb", "file") == ["a\n\nb"]
