"""The peftlab command turns on PyTorch's transparent-huge-page CPU allocation for its own process
(before torch is imported); importing peftlab changes no environment variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

PROBE = (
    "from peftlab.cpu.huge_pages import for_this_command\n"
    "with for_this_command():\n"
    "    import torch\n"
    "    ptrs = [torch.empty(3 << 20, dtype=torch.uint8).data_ptr() for _ in range(8)]\n"
    "    print(sum(p % 4096 == 0 for p in ptrs))\n"
)


def _page_aligned_buffers() -> int:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="THP allocation is Linux-only in c10")
def test_the_command_enables_huge_page_allocation_for_large_tensors():
    # With THP allocation c10 page-aligns (and madvises) every buffer of 2 MiB or more; its default
    # alignment is 64 bytes (THP_MEM_ALLOC_ENABLE=0 gives 0 of 8 page-aligned buffers here).
    assert _page_aligned_buffers() == 8


def test_a_user_setting_is_kept():
    code = (
        "import os\nfrom peftlab.cpu.huge_pages import for_this_command, in_effect\n"
        "with for_this_command() as set_here:\n"
        "    print(set_here, os.environ['THP_MEM_ALLOC_ENABLE'], in_effect()['set_by'])\n"
    )
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "0", "environment"]


def test_importing_peftlab_changes_no_environment_variable_and_the_command_gives_it_back():
    code = (
        # the libraries first: importing peft imports torch._dynamo, which sets TORCHINDUCTOR_CACHE_DIR
        # (torch's own doing, listed in docs/architecture.md); what peftlab's modules add must be nothing
        "import os\nimport torch, transformers, peft\nbefore = dict(os.environ)\n"
        "import peftlab, peftlab.cli, peftlab.train.recipe, peftlab.evaluation.saved_run, peftlab.compare.executors\n"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
        "from peftlab.cpu.huge_pages import for_this_command, in_effect\n"
        "with for_this_command() as set_here:\n"
        "    inside = (set_here, os.environ.get('THP_MEM_ALLOC_ENABLE'), in_effect()['set_by'])\n"
        "print(inside, dict(os.environ) == before)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    # torch is imported by then (the training modules import it), so the command no longer sets it
    assert out.stdout.strip() == "(False, None, None) True"


TRIM_PROBE = (
    "import psutil, torch\n"
    "from peftlab.cpu.malloc import return_freed_heap\n"
    "rss = lambda: psutil.Process().memory_info().rss\n"
    # 64 KiB tensors come from glibc's heap (below its 128 KiB mmap threshold); the last one stays
    # alive, so the freed space is not at the heap's top, where glibc would trim it by itself.
    "blocks = [torch.ones(16 << 10) for _ in range(4000)]\n"
    "del blocks[:-1]\n"
    "held = rss()\n"
    "assert return_freed_heap()\n"
    "print(held - rss())\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_freed_heap_memory_goes_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip().splitlines()[-1]) > 200 * 2**20  # of the 250 MiB freed


HOLES_PROBE = (
    "import sys, psutil, torch\n"
    "from peftlab.cpu.malloc import heap_trimmed_every\n"
    "rss = lambda: psutil.Process().memory_info().rss\n"
    "class Layer(torch.nn.Module):\n"
    # a forward that frees 250 MiB of 64 KiB temporaries (glibc heap) and keeps an activation
    # allocated after them, so the holes are not at the heap's top, which glibc trims by itself
    "    def forward(self, x):\n"
    "        temporaries = [torch.ones(16 << 10) for _ in range(4000)]\n"
    "        self.kept = temporaries[-1] * 2\n"
    "        return x + self.kept.sum()\n"
    "layers = torch.nn.ModuleList([Layer(), Layer()])\n"
    "with heap_trimmed_every(layers, int(sys.argv[1])) as trimming:\n"
    "    start = rss()\n"
    "    out = layers[1](layers[0](torch.zeros(3)))\n"
    "    held = rss() - start\n"
    "assert torch.equal(out, torch.full((3,), 4.0 * (16 << 10)))\n"  # the hooks change nothing
    "assert not any(layer._forward_hooks for layer in layers)\n"  # and are gone after the block
    "print(trimming, held)\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_trimming_after_layers_returns_the_holes_a_forward_leaves():
    def run(every: int) -> tuple[int, int]:
        out = subprocess.run(
            [sys.executable, "-c", HOLES_PROBE, str(every)], capture_output=True, text=True, check=True
        )
        trimming, held = out.stdout.split()
        return int(trimming), int(held)

    never, every_layer = run(0), run(1)
    assert never[0] == 0 and every_layer[0] == 2
    assert never[1] > 200 * 2**20  # the freed temporaries stay resident without a trim
    assert every_layer[1] < never[1] - 200 * 2**20


def test_every_nth_layer_trims():
    from peftlab.cpu.malloc import _glibc, heap_trimmed_every

    layers = torch.nn.ModuleList([torch.nn.Identity() for _ in range(30)])
    expected = 6 if _glibc() is not None else 0
    with heap_trimmed_every(layers, 5) as trimming:
        assert trimming == expected
        assert [i for i, layer in enumerate(layers) if layer._forward_hooks] == (
            [4, 9, 14, 19, 24, 29] if expected else []
        )
    with heap_trimmed_every(layers, 0) as none, heap_trimmed_every(None, 5) as no_layers:
        assert none == no_layers == 0
