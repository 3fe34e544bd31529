"""The SGTM layers never read a tensor's value on the host during forward or backward: on a GPU every such
read (``.item()``, ``bool(t)``, ``.tolist()``, ``int(t)``, ``float(t)``, ``.nonzero()``) stalls until the
device catches up. The engines hand the layers the label flags they need, read from the host batch.

A probe replaces those Tensor methods with recording ones (every thread, so backward too) while a tiny
SGTM GPTModel runs a forward and backward on mixed labels, and records the calls made from
``megatron_sgtm`` code. It runs in a subprocess (this file as a script): the model needs megatron's
parallel state and the CPU shims, which stay out of the pytest process.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBED = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def host_reads(package: str) -> Iterator[list[str]]:
    """Records 'method file:line' for each probed Tensor method called from `package`'s code."""
    import torch

    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in PROBED}

    def recording(name, original):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_globals.get("__name__", "").startswith(package):
                calls.append(f"{name} {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, recording(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def probe() -> dict[str, list[str]]:
    """Host reads from megatron_sgtm during forward + backward, with the engine's flags and without them."""
    import socket

    from megatron_sgtm.compat.cpu import enable_cpu_execution

    enable_cpu_execution()
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_sgtm.core.labels import TokenLabel, label_flags, token_labels
    from megatron_sgtm.core.partition import SGTMConfig
    from megatron_sgtm.model import ModelConfig, build_gpt_model, resolve_partition

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    model_parallel_cuda_manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=16)
    model = build_gpt_model(cfg, cfg.transformer_config(on_gpu=False), resolve_partition(SGTMConfig(), cfg, 1))
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    positions = torch.arange(cfg.seq_length).expand(2, -1)
    labels = torch.tensor([TokenLabel.RETAIN, TokenLabel.FORGET, TokenLabel.UNLABELED]).repeat(
        2, cfg.seq_length // 3 + 1)[:, :cfg.seq_length]
    flags = label_flags(labels)  # as the engine does, on the host batch

    out = {}
    for case, given in (("with_flags", flags), ("without_flags", None)):
        with host_reads("megatron_sgtm") as calls, token_labels(labels, given):
            model(tokens, positions, None, labels=torch.roll(tokens, -1, 1)).sum().backward()
        out[case] = calls
    torch.distributed.destroy_process_group()
    return out


def test_layers_read_no_tensor_values_on_the_host():
    result = subprocess.run([sys.executable, __file__], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = json.loads(result.stdout.strip().splitlines()[-1])
    assert calls["with_flags"] == []
    # The probe sees host reads where there are some: without the engine's flags the labels are read.
    assert any(call.startswith("__bool__ labels.py") for call in calls["without_flags"])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(probe()))
