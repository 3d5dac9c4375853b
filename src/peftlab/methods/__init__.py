"""Fine-tuning methods. Importing this package registers every built-in method."""

from peftlab.methods import (  # noqa: F401
    classification_head,
    dora,
    freeze,
    full,
    galore,
    ia3,
    lora,
    lora_galore,
    prompt_tuning,
    qlora,
)
from peftlab.methods.registry import MethodSpec, get_method, method_names, register_method

__all__ = ["MethodSpec", "get_method", "method_names", "register_method"]
