"""SmolLM2's own chat template: only assistant replies (each with <|im_end|>) carry loss."""

import pytest
from slow_cache import CPU_FP32, private_cache  # noqa: F401 (autouse fixture)

from peftlab.data.packing import IGNORE_INDEX
from peftlab.data.templates import build_chat_prompt, tokenize_chat
from peftlab.model.loading import load_tokenizer, resolve_source

pytestmark = pytest.mark.slow


def test_smollm2_template_masks_all_but_assistant_turns():
    tok = load_tokenizer(resolve_source(CPU_FP32), CPU_FP32)
    convo = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6."},
    ]
    ex = tokenize_chat(convo, tok, "model", "assistant")
    runs, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels, strict=True):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    runs += [tok.decode(cur)] if cur else []
    assert runs == ["4.<|im_end|>", "It is 6.<|im_end|>"]
    prompt_ids = tok(build_chat_prompt(convo[:3], tok), add_special_tokens=False)["input_ids"]
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
