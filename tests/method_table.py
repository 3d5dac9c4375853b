"""The one table of method rows that the method tests and the estimator tests run over.

A new method adds its row here (tests/unit/test_method_table.py fails while a registered method has
none); every row is a method config on the tiny llama of conftest.py. Rows are peft-style
(name + settings) so a failing test names the row.
"""

from __future__ import annotations

from typing import Any

QV = ["q_proj", "v_proj"]

METHOD_ROWS: list[dict[str, Any]] = [
    {"name": "full"},
    {"name": "full", "optimizer": "adamw_8bit"},
    {"name": "freeze", "last_layers": 1},
    {"name": "lora", "r": 4, "target_modules": QV},
    {"name": "lora", "r": 4, "rslora": True, "lora_plus_ratio": 4.0, "target_modules": "all-linear"},
    {"name": "dora", "r": 4, "target_modules": QV},
    {"name": "qlora", "r": 4, "target_modules": QV},
    {"name": "galore", "rank": 4, "update_proj_gap": 2, "target_modules": [*QV, "gate_proj"]},
    {"name": "lora_galore", "r": 4, "rank": 4, "update_proj_gap": 2},
    {"name": "ia3"},
    {"name": "prompt_tuning", "num_virtual_tokens": 4},
    {"name": "prefix_tuning", "num_virtual_tokens": 4},
    {"name": "classification_head", "r": 4, "target_modules": QV},
    {"name": "classification_head", "r": 4, "head_only": True},
]
ROW_IDS = [f"{row['name']}-{i}" for i, row in enumerate(METHOD_ROWS)]
LABELS = ["neg", "neutral", "pos"]  # the task of a method whose spec has a classification head
