"""Region codes as blocks: `SGTMAdamW` keeps a shard's regions as contiguous ranges and strided row views, for
any cut of the flat parameter (ZeRO and megatron's DistributedOptimizer cut at arbitrary offsets); its steps on
such shards equal torch AdamWs over each region's elements."""

from __future__ import annotations

import pytest
import torch

from megatron_sgtm.core.gating import Gate, SGTMAdamW, region_blocks
from megatron_sgtm.core.strategy import Region

ROWS, COLS = 7, 9
HYPER = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _column_split() -> torch.Tensor:
    """A row-parallel weight: columns 6..8 are Θ_F, the rest Θ_R."""
    codes = torch.full((ROWS, COLS), Region.RETAIN, dtype=torch.uint8)
    codes[:, 6:] = Region.FORGET
    return codes


# (name, flat codes of one shard): whole rows, a cut mid-row on both ends, and a ZeRO partition spanning a
# Θ_J tensor, a column-split weight and a row-split one.
SHARDS = {
    "whole_rows": _column_split().reshape(-1),
    "cut_mid_row": _column_split().reshape(-1)[4:ROWS * COLS - 5],
    "zero_partition": torch.cat([
        torch.full((5,), Region.JOINT, dtype=torch.uint8), _column_split().reshape(-1)[3:],
        torch.tensor([Region.RETAIN] * 8 + [Region.FORGET] * 4, dtype=torch.uint8),
    ]),
}


@pytest.mark.parametrize("name", SHARDS)
def test_blocks_cover_each_region_exactly(name):
    codes = SHARDS[name]
    opt = SGTMAdamW([param := torch.nn.Parameter(torch.zeros(codes.shape))])
    opt.set_region_codes(param, codes)
    assert torch.equal(opt.codes_of(param), codes)


def test_a_column_split_over_whole_rows_is_one_strided_block_per_region():
    blocks = region_blocks(_column_split())
    assert {region: len(own) for region, own in blocks.items()} == {Region.RETAIN: 1, Region.FORGET: 1}
    assert blocks[Region.FORGET][0].rows == ROWS


@pytest.mark.parametrize("name", SHARDS)
def test_steps_on_a_shard_equal_torch_adamw_per_region(name):
    codes = SHARDS[name]
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(codes.shape, generator=gen)
    gates = [Gate(), Gate(retain=True), Gate(), Gate(forget=True), Gate(retain=True), Gate()]
    grads = [torch.randn(codes.shape, generator=gen) for _ in gates]

    param = torch.nn.Parameter(init.clone())
    opt = SGTMAdamW([param], **HYPER)
    opt.set_region_codes(param, codes)
    refs = {region: torch.nn.Parameter(init[codes == region].clone()) for region in Region if (codes == region).any()}
    ref_opts = {region: torch.optim.AdamW([p], foreach=False, **HYPER) for region, p in refs.items()}
    for gate, grad in zip(gates, grads):
        param.grad = grad.clone()
        opt.gate = gate
        opt.step()
        for region, p in refs.items():
            if (region == Region.RETAIN and gate.retain) or (region == Region.FORGET and gate.forget):
                continue
            p.grad = grad[codes == region].clone()
            ref_opts[region].step()
    for region, p in refs.items():
        torch.testing.assert_close(param.detach()[codes == region], p.detach(), rtol=1e-6, atol=1e-7)
