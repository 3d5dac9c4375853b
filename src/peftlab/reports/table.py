"""Before/after tables from a run's metrics.json (or eval.json), as aligned text or Markdown."""

from __future__ import annotations

from typing import Any

from peftlab.sizing.resources import gib

Row = tuple[str, ...]


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pair(label: str, base: Any, tuned: Any, spec: str) -> Row:
    return (label, _fmt(base, spec), _fmt(tuned, spec))


def evaluation_rows(
    base: dict[str, Any], tuned: dict[str, Any], forgetting: dict[str, Any] | None = None
) -> list[Row]:
    """One row per metric either side has: held-out text, classification, generation, forgetting."""
    rows: list[Row] = []
    if "perplexity" in base or "perplexity" in tuned:
        window = base.get("window") or tuned.get("window")
        stride = base.get("stride") or tuned.get("stride")
        bu, tu = base.get("units", {}), tuned.get("units", {})
        rows += [
            _pair(
                f"perplexity (token-level, L={window}, S={stride})",
                base.get("perplexity"),
                tuned.get("perplexity"),
                ".3f",
            ),
            _pair("token accuracy", base.get("token_accuracy"), tuned.get("token_accuracy"), ".4f"),
            _pair(
                f"word perplexity (lm-eval-harness, L={bu.get('window') or tu.get('window')})",
                bu.get("word_perplexity"),
                tu.get("word_perplexity"),
                ".3f",
            ),
            _pair("bits per byte", bu.get("bits_per_byte"), tu.get("bits_per_byte"), ".4f"),
            _pair("eval tokens scored", base.get("tokens"), tuned.get("tokens"), ",d"),
        ]
    bc, tc = base.get("classification"), tuned.get("classification")
    if bc or tc:
        bc, tc = bc or {}, tc or {}
        n = bc.get("examples") or tc.get("examples")
        rows += [
            _pair(f"label accuracy ({n} examples)", bc.get("accuracy"), tc.get("accuracy"), ".4f"),
            _pair("macro-F1", bc.get("macro_f1"), tc.get("macro_f1"), ".4f"),
        ]
    bg, tg = base.get("generation"), tuned.get("generation")
    if bg or tg:
        bg, tg = bg or {}, tg or {}
        n, new = (
            bg.get("examples") or tg.get("examples"),
            bg.get("max_new_tokens") or tg.get("max_new_tokens"),
        )
        rows += [
            _pair(
                f"BLEU-4 (greedy, {new} new tokens, {n} examples)", bg.get("bleu4"), tg.get("bleu4"), ".2f"
            ),
            _pair("ROUGE-L F (stemmed)", bg.get("rouge_l"), tg.get("rouge_l"), ".4f"),
            _pair(
                "reference-answer perplexity",
                bg.get("answer_perplexity"),
                tg.get("answer_perplexity"),
                ".3f",
            ),
        ]
    bt, tt = base.get("general_text"), tuned.get("general_text")
    if bt or tt:
        bt, tt = bt or {}, tt or {}
        rows.append(
            _pair(
                f"general-text cross-entropy ({bt.get('tokens') or tt.get('tokens')} tokens)",
                bt.get("mean_nll"),
                tt.get("mean_nll"),
                ".4f",
            )
        )
    if forgetting and "forgetting" in forgetting:
        rows.append(("forgetting (tuned - base CE)", "", f"{forgetting['forgetting']:+.4f}"))
    elif forgetting and "skipped" in forgetting and tuned:
        rows.append(("forgetting", "", "skipped"))
    return rows


def before_after_rows(metrics: dict[str, Any]) -> list[Row]:
    base, tuned = metrics.get("base", {}), metrics.get("tuned", {})
    mem = metrics.get("memory", {})
    return [
        *evaluation_rows(base, tuned, metrics.get("forgetting")),
        ("train time", "", f"{metrics.get('train_seconds', 0):.1f} s"),
        ("train tokens/s (real tokens)", "", _fmt(metrics.get("tokens_per_second"), ".1f")),
        ("peak RSS during training", "", gib(mem.get("peak_rss_bytes"))),
        ("peak CUDA allocated", "", gib(mem.get("cuda_peak_allocated_bytes"))),
        (
            "trainable params",
            "",
            f"{metrics.get('trainable_params', 0):,d} / {metrics.get('total_params', 0):,d} ({metrics.get('trainable_percent', 0):.4f}%)",
        ),
    ]


def render_text(rows: list[Row], headers: Row = ("metric", "base", "tuned")) -> str:
    rows = [r[: len(headers)] for r in rows]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(out)


def render_markdown(rows: list[Row], headers: Row = ("metric", "base", "tuned")) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r[: len(headers)]) + " |" for r in rows]
    return "\n".join(out)
