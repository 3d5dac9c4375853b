"""A private $PEFTLAB_CACHE for the slow tests, so they test this code and not what an earlier
version left in the user's cache (a base evaluation, tokenised data, a converted model).

Each test gets an empty cache folder whose models/ is a link to one folder per pytest session: the
embedded SmolLM2's GGUF -> safetensors conversion (about 30 s) is done by this code once per session,
by the first test that resolves the model, reused by the later ones, and deleted when the session
ends. Base evaluations and tokenised data are never shared between tests.

Not a conftest.py: the test modules import `conftest` by name, and a second conftest.py would take
its place in sys.modules. A slow test module imports `private_cache` (an autouse fixture).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from peftlab.cache import CACHE_ENV
from peftlab.config.sections import ModelConfig

# the real model, pinned: the same dtype and device on every machine, however `auto` would choose
CPU_FP32 = ModelConfig(device="cpu", dtype="float32")
CPU_FP32_OVERRIDES = ["model.device=cpu", "model.dtype=float32"]


@pytest.fixture(autouse=True)
def private_cache(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    models = tmp_path_factory.getbasetemp() / "smollm2-models"  # one per session
    if not models.exists():
        models.mkdir()
        # the converted model is ~0.5 GB; pytest keeps the last three sessions' temporary folders
        request.config.add_cleanup(lambda: shutil.rmtree(models, ignore_errors=True))
    cache = tmp_path_factory.mktemp("cache")
    (cache / "models").symlink_to(models, target_is_directory=True)
    monkeypatch.setenv(CACHE_ENV, str(cache))
    return cache
