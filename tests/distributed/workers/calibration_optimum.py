"""Worker for the calibration test: the output bias `training.calibration.calibrated` fits on an ablated model,
and the ablated model's logits on the same batches, so the test can fit the bias independently.

argv: OUT_DIR. One rank (the calibration is collective, but its optimum does not depend on the layout,
which `test_train_megatron.py` checks). Saves results.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from megatron_sgtm.training.distributed import init_distributed

if __name__ == "__main__":
    init_distributed()  # CPU shims before megatron modules are imported and built

from megatron_sgtm.regions import ablated  # noqa: E402
from megatron_sgtm.training.calibration import SMOOTHING, calibrated  # noqa: E402
from megatron_sgtm.training.config import from_dict  # noqa: E402
from megatron_sgtm.training.engine_megatron import MegatronEngine  # noqa: E402
from tests.support.train_fixtures import tiny_config  # noqa: E402

ITERATIONS = 12


def main(out: Path) -> None:
    cfg = from_dict(tiny_config(out, out / "run", method="sgtm"))
    engine = MegatronEngine(cfg, cfg.sgtm.resolve(cfg.model.dims()), on_gpu=False)
    gen = torch.Generator().manual_seed(7)
    mbs, seq, vocab = cfg.optim.micro_batch_size, cfg.model.seq_length, cfg.model.vocab_size
    batches = []
    for _ in range(4):
        tokens = torch.randint(0, vocab, (mbs, seq + 1), generator=gen)
        batches.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
                        "token_labels": torch.zeros(mbs, seq, dtype=torch.uint8),
                        "loss_mask": (torch.rand(mbs, seq, generator=gen) > 0.2).float(),
                        "position_ids": torch.arange(seq).expand(mbs, seq).clone()})
    with calibrated(engine, batches, ITERATIONS) as bias:
        fitted = bias.value.detach().clone()
        residuals = torch.tensor(bias.residuals)
    engine.model.eval()
    with torch.no_grad(), ablated(engine.model):  # one causal document per row, as the engine's evaluation sees
        logits = torch.cat([engine.model(mb["tokens"], mb["position_ids"], None).reshape(-1, fitted.numel())
                            for mb in batches])
    keep = torch.cat([mb["loss_mask"].reshape(-1) for mb in batches]) > 0
    targets = torch.cat([mb["targets"].reshape(-1) for mb in batches])
    torch.save({"fitted": fitted, "residuals": residuals, "logits": logits[keep].double(),
                "targets": targets[keep], "smoothing": torch.tensor(SMOOTHING)}, out / "results.pt")
    engine.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
