import torch

from peftlab.evaluation.generation import generate_greedy


def test_batched_left_padded_generation_equals_one_by_one(tiny_model, tiny_tokenizer):
    texts = ["the quick brown fox", "hi", "a much longer prompt with many more words in it", "dog"]
    prompts = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) > 1  # padding really happens
    batched = generate_greedy(tiny_model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=4)
    single = [
        generate_greedy(tiny_model, tiny_tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts
    ]
    assert batched == single
    # and one-by-one equals a plain argmax loop written here
    for p, got in zip(prompts, single, strict=True):
        ids = list(p)
        for _ in range(len(got)):
            logits = tiny_model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
        assert ids[len(p) :] == got
        assert 1 <= len(got) <= 6


def test_instruction_prompt_renders_messages_before_the_last_answer(tiny_tokenizer):
    import copy

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
