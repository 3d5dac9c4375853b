"""Before/after tables from a run's metrics.json, as aligned text or Markdown."""

from __future__ import annotations

from typing import Any

from peftlab.resources import gib


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def before_after_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    base, tuned = metrics.get("base", {}), metrics.get("tuned", {})
    window = base.get("window") or tuned.get("window")
    stride = base.get("stride") or tuned.get("stride")
    mem = metrics.get("memory", {})
    return [
        (
            f"perplexity (token-level, L={window}, S={stride})",
            _fmt(base.get("perplexity"), ".3f"),
            _fmt(tuned.get("perplexity"), ".3f"),
        ),
        ("token accuracy", _fmt(base.get("token_accuracy"), ".4f"), _fmt(tuned.get("token_accuracy"), ".4f")),
        (
            f"word perplexity (lm-eval-harness, L={base.get('units', {}).get('window')})",
            _fmt(base.get("units", {}).get("word_perplexity"), ".3f"),
            _fmt(tuned.get("units", {}).get("word_perplexity"), ".3f"),
        ),
        (
            "bits per byte",
            _fmt(base.get("units", {}).get("bits_per_byte"), ".4f"),
            _fmt(tuned.get("units", {}).get("bits_per_byte"), ".4f"),
        ),
        ("eval tokens scored", _fmt(base.get("tokens"), ",d"), _fmt(tuned.get("tokens"), ",d")),
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


def render_text(
    rows: list[tuple[str, str, str]], headers: tuple[str, str, str] = ("metric", "base", "tuned")
) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(3)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def render_markdown(
    rows: list[tuple[str, str, str]], headers: tuple[str, str, str] = ("metric", "base", "tuned")
) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)
