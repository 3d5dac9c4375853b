from peftlab.data.packing import IGNORE_INDEX
from peftlab.data.templates import (
    CHATML_FALLBACK,
    build_chat_prompt,
    tokenize_chat,
    tokenize_classification,
)

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a fox."},
    {"role": "assistant", "content": "The quick brown fox."},
    {"role": "user", "content": "And a dog?"},
    {"role": "assistant", "content": "The lazy dog."},
]


def _unmasked_runs(ids, labels):
    """Consecutive runs of tokens that carry loss."""
    runs, cur = [], []
    for tok, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tok
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def test_only_every_assistant_reply_with_its_end_token_carries_loss(tiny_tokenizer):
    ex = tokenize_chat(CONVO, tiny_tokenizer, "model", "assistant")
    runs = [tiny_tokenizer.decode(r) for r in _unmasked_runs(ex.input_ids, ex.labels)]
    assert runs == ["The quick brown fox.<|im_end|>", "The lazy dog.<|im_end|>"]


def test_train_on_all_keeps_every_token(tiny_tokenizer):
    ex = tokenize_chat(CONVO, tiny_tokenizer, "model", "all")
    assert ex.labels == ex.input_ids


def test_serving_prompt_is_the_training_prompt_prefix(tiny_tokenizer):
    ex = tokenize_chat(CONVO, tiny_tokenizer, "model", "assistant")
    prompt = build_chat_prompt(CONVO[:-1], tiny_tokenizer)
    prompt_ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    # the first token after the prompt is the first token of the last reply, and it carries loss
    assert ex.labels[len(prompt_ids)] == ex.input_ids[len(prompt_ids)]
    assert ex.labels[len(prompt_ids) - 1] == IGNORE_INDEX


def test_chatml_fallback_ends_turns_with_eos(tiny_tokenizer):
    ex = tokenize_chat(CONVO[1:3], tiny_tokenizer, "chatml", "assistant")
    runs = [tiny_tokenizer.decode(r) for r in _unmasked_runs(ex.input_ids, ex.labels)]
    assert runs == ["The quick brown fox." + tiny_tokenizer.eos_token]
    assert "eos_token" in CHATML_FALLBACK


def test_system_message_merged_when_template_rejects_it(tiny_tokenizer):
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    saved = tiny_tokenizer.chat_template
    tiny_tokenizer.chat_template = strict
    try:
        prompt = build_chat_prompt(CONVO[:2], tiny_tokenizer)
    finally:
        tiny_tokenizer.chat_template = saved
    assert prompt == "<|im_start|>user\nBe brief.\n\nName a fox.<|im_end|>\n<|im_start|>assistant\n"


def test_classification_loss_only_on_label_tokens(tiny_tokenizer):
    ex = tokenize_classification("the dog sat", "positive", tiny_tokenizer, "{text}\nAnswer:")
    kept = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX]
    assert tiny_tokenizer.decode(kept) == " positive"
    prompt = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE_INDEX]
    assert tiny_tokenizer.decode(prompt) == "the dog sat\nAnswer:"
