import copy

import torch

from conftest import build_tiny_llama
from peftlab.evaluation.generation import generate_greedy

PROMPT_TEXTS = ["the quick brown fox", "hi", "a much longer prompt with many more words in it", "dog"]


def scrambled_tiny_llama(vocab_size: int) -> torch.nn.Module:
    """The conftest llama with large random weights (seeded): the freshly initialised one repeats its
    prompt's last token, which would not tell a wrong position or mask from a right one."""
    model = build_tiny_llama(vocab_size)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()


@torch.no_grad()
def plain_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Greedy decoding written out: the argmax of the last position's logits, appended, until EOS
    (kept) or max_new_tokens; one prompt, no padding, no cache."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt) :]


def test_batched_left_padded_generation_equals_a_plain_greedy_loop(tiny_tokenizer):
    model = scrambled_tiny_llama(len(tiny_tokenizer))
    prompts = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROMPT_TEXTS]
    assert len({len(p) for p in prompts}) > 1  # padding really happens
    want = [plain_greedy(model, p, 8, tiny_tokenizer.eos_token_id) for p in prompts]
    # this model never writes EOS in 8 tokens: every answer runs to the limit, and the tokens vary
    assert [len(w) for w in want] == [8, 8, 8, 8]
    assert all(len(set(w)) > 1 for w in want)
    assert generate_greedy(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=4) == want
    assert generate_greedy(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=3) == want
    one_by_one = [
        generate_greedy(model, tiny_tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts
    ]
    assert one_by_one == want


def test_generation_stops_after_the_first_eos_in_each_row(tiny_tokenizer):
    model = scrambled_tiny_llama(len(tiny_tokenizer))
    prompts = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROMPT_TEXTS]
    free = plain_greedy(model, prompts[0], 8, eos=-1)
    stop = free[2]  # make the first prompt's third new token the end of sequence
    assert stop not in free[:2]
    tok = copy.deepcopy(tiny_tokenizer)
    tok.eos_token = tok.convert_ids_to_tokens(stop)
    assert tok.eos_token_id == stop != tok.pad_token_id
    want = [plain_greedy(model, p, 8, eos=stop) for p in prompts]
    assert want[0] == free[:3]  # three tokens, the EOS kept
    assert max(len(w) for w in want) == 8  # another row goes on while the first one has stopped
    assert generate_greedy(model, tok, prompts, max_new_tokens=8, batch_size=4) == want


def test_instruction_prompt_renders_messages_before_the_last_answer(tiny_tokenizer):
    import pytest

    from peftlab.evaluation.generation import instruction_prompt

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    ids, ref = instruction_prompt(tok, msgs)
    assert ref == "see you"
    want = "<user>hi<assistant>hello<user>bye<assistant>"
    assert ids == tok(want, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="assistant"):
        instruction_prompt(tok, msgs[:1])


def test_answer_loss_scores_only_answer_tokens():
    from peftlab.evaluation.generation import answer_loss

    table = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.5], [2.0, 1.0, 0.0]])

    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.t = torch.nn.Parameter(table)

        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": self.t[input_ids]})()  # [B, T, V]

    logp = torch.log_softmax(table, dim=-1)
    prompts, answers = [[1, 2, 2], [0]], [[1, 0], [2, 2, 1]]
    want = -(logp[2, 1] + logp[1, 0] + logp[0, 2] + logp[2, 2] + logp[2, 1]).item() / 5
    for batch_size in (1, 2):
        out = answer_loss(Bigram(), prompts, answers, batch_size=batch_size)
        assert out["answer_tokens"] == 5
        assert abs(out["answer_nll"] - want) < 1e-6
