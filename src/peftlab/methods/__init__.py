"""Fine-tuning methods. Importing this package registers every built-in method."""

from peftlab.methods import full, lora  # noqa: F401  (imported for their register_method calls)
from peftlab.methods.registry import MethodSpec, get_method, method_names, register_method

__all__ = ["MethodSpec", "get_method", "method_names", "register_method"]
