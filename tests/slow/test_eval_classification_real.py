"""Label log-likelihoods on the real SmolLM2-135M: every prompt once for all labels (packed rows)
equals one forward per (example, label) pair, on SST-2 dev sentences prompted as
configs/sst2-classification.yaml says, for its two one-token labels and for four labels of one and
two tokens."""

from collections import Counter

import pytest
import torch
from slow_cache import CPU_FP32, private_cache  # noqa: F401 (autouse fixture)

from conftest import REPO, SHARED_DATA
from peftlab.config.loading import load_config
from peftlab.data.formats import normalise
from peftlab.data.loading import load_raw
from peftlab.data.templates import build_classification_prompt, label_completion
from peftlab.evaluation.classification import (
    label_loglikelihoods,
    label_loglikelihoods_reference,
    packs_labels,
)
from peftlab.model.loading import load_model, load_tokenizer, resolve_source

pytestmark = pytest.mark.slow
N_SENTENCES = 16


def test_packed_label_scores_equal_the_reference_on_sst2():
    data = load_config(REPO / "configs" / "sst2-classification.yaml").data
    raw = load_raw(str(SHARED_DATA / "sst2" / "sentiment-dev"), data.file_format, data.header, data.columns)
    records = normalise(raw, "classification", data.fields, data.label_names, "fail", Counter())
    prompts = [build_classification_prompt(r["text"], data.prompt_template) for r in records[:N_SENTENCES]]
    source = resolve_source(CPU_FP32)
    tokenizer = load_tokenizer(source, CPU_FP32)
    model = load_model(source, CPU_FP32, torch.device("cpu"), torch.float32)
    assert packs_labels(model)
    packed_forwards = []
    model.register_forward_pre_hook(
        lambda _m, _args, kwargs: packed_forwards.append(kwargs) if "logits_to_keep" in kwargs else None,
        with_kwargs=True,
    )
    assert data.label_names == ["negative", "positive"]
    for labels in (data.label_names, ["very negative", "negative", "positive", "very positive"]):
        completions = [label_completion(label) for label in labels]
        packed_forwards.clear()
        packed = label_loglikelihoods(model, tokenizer, prompts, completions, batch_size=4)
        assert len(packed_forwards) == N_SENTENCES // 4  # packed rows, not the fallback
        reference = label_loglikelihoods_reference(model, tokenizer, prompts, completions, batch_size=4)
        torch.testing.assert_close(packed, reference, rtol=0, atol=1e-4)
        assert packed.argmax(1).tolist() == reference.argmax(1).tolist()
