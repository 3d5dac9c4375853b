import pytest
import torch

from peftlab.evaluation.classification import classification_metrics, label_loglikelihoods, plot_confusion


class BigramModel(torch.nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)  # [V, V] next-token logits given the current token

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()  # [B, T, V]


class CharTokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": ["_xyab".index(c) for c in text]}


# after 'x' the model prefers 'a', after 'y' it prefers 'b'; after 'a'/'b' it prefers 'a' weakly
TABLE = torch.tensor(
    [
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 3.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 3.0],
        [0.0, 0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0, 0.0],
    ]
)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_label_scores_equal_hand_computed_loglikelihoods(batch_size):
    logp = torch.log_softmax(TABLE, dim=-1)
    tok = CharTokenizer()
    prompts, completions = ["x", "yx", "y"], ["a", "bb"]
    scores = label_loglikelihoods(BigramModel(TABLE), tok, prompts, completions, batch_size=batch_size)
    for n, p in enumerate(prompts):
        for k, c in enumerate(completions):
            ids = tok(p + c)["input_ids"]
            start = len(p)
            want = sum(logp[ids[t - 1], ids[t]].item() for t in range(start, len(ids)))
            assert scores[n, k].item() == pytest.approx(want, rel=1e-6)
    assert scores.argmax(1).tolist() == [0, 0, 1]  # the labels the toy model prefers
    normed = label_loglikelihoods(BigramModel(TABLE), tok, prompts, completions, length_normalise=True)
    assert torch.allclose(normed, scores / torch.tensor([1.0, 2.0]))


def test_classification_metrics_equal_hand_computed_values(tmp_path):
    gold = ["pos", "pos", "neg", "neg", "neu"]
    pred = ["pos", "neg", "neg", "neg", "pos"]
    m = classification_metrics(gold, pred, ["pos", "neg", "neu"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["pos"]["precision"] == pytest.approx(1 / 2)
    assert m["per_class"]["pos"]["recall"] == pytest.approx(1 / 2)
    assert m["per_class"]["neg"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["neg"]["recall"] == pytest.approx(1.0)
    f1_neg = 2 * (2 / 3) / (2 / 3 + 1)
    assert m["macro_f1"] == pytest.approx((0.5 + f1_neg + 0.0) / 3)
    plot_confusion(m["confusion_matrix"], m["labels"], tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


class VirtualTokens(torch.nn.Module):
    """Like peft prompt tuning: logits for k virtual positions come before the inputs' own."""

    def __init__(self, inner: torch.nn.Module, k: int = 3):
        super().__init__()
        self.inner, self.k = inner, k

    def forward(self, input_ids, attention_mask=None):
        logits = self.inner(input_ids).logits  # [B, T, V]
        junk = torch.full((logits.size(0), self.k, logits.size(2)), 5.0)
        junk[..., 0] = 50.0  # would dominate any score it leaked into
        return type("Out", (), {"logits": torch.cat([junk, logits], dim=1)})()  # [B, k + T, V]


def test_virtual_token_positions_are_never_scored():
    from peftlab.evaluation.generation import answer_loss

    tok = CharTokenizer()
    prompts, completions = ["x", "yx", "y"], ["a", "bb"]
    plain = label_loglikelihoods(BigramModel(TABLE), tok, prompts, completions, batch_size=2)
    wrapped = label_loglikelihoods(VirtualTokens(BigramModel(TABLE)), tok, prompts, completions, batch_size=2)
    assert torch.allclose(plain, wrapped)
    ids, answers = [[1, 3], [2]], [[3, 4], [4, 4, 3]]
    want = answer_loss(BigramModel(TABLE), ids, answers, batch_size=2)
    assert answer_loss(VirtualTokens(BigramModel(TABLE)), ids, answers, batch_size=2) == want


# --- every prompt once for all labels (packed rows) against one forward per (example, label) ---

from transformers import LlamaForCausalLM  # noqa: E402

from conftest import build_tiny_llama, prepared_tiny_model  # noqa: E402
from peftlab.evaluation.classification import label_loglikelihoods_reference, packs_labels  # noqa: E402

# prompts of different lengths (the batches mix them, so rows are padded differently)
PROMPTS = [
    "The quick brown fox",
    "A tiny model learns tiny things from tiny text. The cat sat on the mat and the dog",
    "cat",
    "Numbers like 1 2 3 appear in text and",
    "Valkyria Chronicles is a tactical",
]
SINGLE = [" dog", " tiny", " sat"]
MULTI = [" dog", " the lazy dog", " tiny text", " cat sat on the mat"]  # 1, 5, 2 and 7 tokens


class Calls:
    """Every forward of a model (packed or not: packed ones pass logits_to_keep) and the input
    shape of every call of its output head."""

    def __init__(self, model: torch.nn.Module, head: torch.nn.Module):
        self.forwards: list[dict] = []
        self.head_inputs: list[torch.Size] = []
        model.register_forward_pre_hook(
            lambda _m, args, kwargs: self.forwards.append(kwargs), with_kwargs=True
        )
        head.register_forward_pre_hook(lambda _m, args: self.head_inputs.append(args[0].shape))

    def packed(self) -> list[dict]:
        return [f for f in self.forwards if "logits_to_keep" in f]


def token_counts(tokenizer, texts):
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


@pytest.mark.parametrize("labels", ["single", "multi"])
@pytest.mark.parametrize("length_normalise", [False, True])
@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_packed_scores_equal_the_reference(tiny_tokenizer, tiny_model, labels, length_normalise, batch_size):
    completions = SINGLE if labels == "single" else MULTI
    lengths = token_counts(tiny_tokenizer, completions)
    if labels == "single":
        assert set(lengths) == {1}
    else:
        assert len(set(lengths)) == len(lengths)
    calls = Calls(tiny_model, tiny_model.lm_head)
    args = (tiny_model, tiny_tokenizer, PROMPTS, completions, batch_size, length_normalise)
    packed = label_loglikelihoods(*args)
    assert len(calls.packed()) == -(-len(PROMPTS) // batch_size)  # the packed path ran, not the fallback
    reference = label_loglikelihoods_reference(*args)
    assert packed.shape == (len(PROMPTS), len(completions))
    torch.testing.assert_close(packed, reference, rtol=0, atol=1e-4)
    assert packed.argmax(1).tolist() == reference.argmax(1).tolist()


def test_each_prompt_runs_once_and_the_head_sees_label_positions_only(tiny_tokenizer, tiny_model):
    calls = Calls(tiny_model, tiny_model.lm_head)
    label_loglikelihoods(tiny_model, tiny_tokenizer, PROMPTS, MULTI, batch_size=2)
    prompt_lengths = token_counts(tiny_tokenizer, PROMPTS)
    tail = sum(n - 1 for n in token_counts(tiny_tokenizer, MULTI))  # every label's tokens but its last
    packed = calls.packed()
    # one row per example, in one forward: 3 forwards for 5 examples, 2 + 2 + 1 rows
    assert sorted(f["input_ids"].shape[0] for f in packed) == [1, 2, 2]
    longest_first = sorted(prompt_lengths, reverse=True)
    for f, batch in zip(packed, [longest_first[0:2], longest_first[2:4], longest_first[4:]], strict=True):
        assert f["input_ids"].shape[1] == max(batch) + tail  # each prompt once, then the labels
        assert f["logits_to_keep"] == tail + 1
    packed_heads = [
        s for s, f in zip(calls.head_inputs, calls.forwards, strict=True) if "logits_to_keep" in f
    ]
    assert [s[1] for s in packed_heads] == [tail + 1] * 3  # never a prompt position but the last
    # besides: one reference forward of a single example's K rows (the first batch's check)
    others = [f for f in calls.forwards if "logits_to_keep" not in f]
    assert len(others) == 1 and others[0]["input_ids"].shape[0] == len(MULTI)


def test_packed_scores_equal_the_reference_under_lora(tiny_tokenizer):
    model = prepared_tiny_model(
        len(tiny_tokenizer), {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (an adapter that changes nothing)
            torch.nn.init.normal_(param, std=0.5)
    assert packs_labels(model) and model.training
    packed = label_loglikelihoods(model, tiny_tokenizer, PROMPTS, MULTI, batch_size=2)
    assert model.training  # the mode is given back
    reference = label_loglikelihoods_reference(model, tiny_tokenizer, PROMPTS, MULTI, batch_size=2)
    torch.testing.assert_close(packed, reference, rtol=0, atol=1e-4)
    with model.disable_adapter():
        base = label_loglikelihoods(model, tiny_tokenizer, PROMPTS, MULTI, batch_size=2)
    assert (packed - base).abs().max() > 1e-2  # the adapter was in effect


@pytest.mark.parametrize(
    "method",
    [{"name": "prompt_tuning", "num_virtual_tokens": 4}, {"name": "prefix_tuning", "num_virtual_tokens": 4}],
)
def test_virtual_token_methods_are_scored_by_the_reference(tiny_tokenizer, method):
    model = prepared_tiny_model(len(tiny_tokenizer), method)
    assert not packs_labels(model)  # peft prepends virtual tokens (or keys and values) to a 2D mask only
    scores = label_loglikelihoods(model, tiny_tokenizer, PROMPTS, MULTI, batch_size=2)
    reference = label_loglikelihoods_reference(model, tiny_tokenizer, PROMPTS, MULTI, batch_size=2)
    torch.testing.assert_close(scores, reference, rtol=0, atol=1e-4)


class IgnoresCustomMask(LlamaForCausalLM):
    """A model whose forward drops a 4D mask: packed completions would see each other and pads."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, logits_to_keep=0, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


def test_a_model_that_fails_the_first_batch_check_is_scored_by_the_reference(tiny_tokenizer):
    tiny = build_tiny_llama(len(tiny_tokenizer))
    model = IgnoresCustomMask(tiny.config).eval()
    model.load_state_dict(tiny.state_dict())
    calls = Calls(model, model.lm_head)
    scores = label_loglikelihoods(model, tiny_tokenizer, PROMPTS, MULTI, batch_size=2)
    assert len(calls.packed()) == 1  # tried once, then the reference for every example
    reference = label_loglikelihoods_reference(model, tiny_tokenizer, PROMPTS, MULTI, batch_size=2)
    torch.testing.assert_close(scores, reference, rtol=0, atol=1e-4)
