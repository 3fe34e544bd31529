"""SGTM layers on megatron-core at TP x PP x SP layouts (4 gloo ranks), against the plain-torch reference.

Invariants 1 (gradient exactness) and 2 (forward isolation) of docs/design.md, each baseline's own
rule, layout invariance of one forward/backward, and `ablate()` at every layout. The distributed
group runs once (tests/distributed/workers/sgtm_core.py); each test checks one property of its results.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launch import torchrun
from tests.support import reference_gpt
from tests.support.sgtm_cases import CASES, MBS, SEQ, layout_key, make_batch, masks_for

LAYOUT_CASES = [(case, layout) for case in CASES for layout in case.layouts]
IDS = [layout_key(case, layout) for case, layout in LAYOUT_CASES]


def for_strategy(strategy: str):
    """Parametrize over the (case, layout) pairs of one strategy."""
    pairs = [(c, lay) for c, lay in LAYOUT_CASES if c.sgtm.strategy == strategy]
    return pytest.mark.parametrize("case,layout", pairs, ids=[layout_key(c, lay) for c, lay in pairs])


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    return torchrun("sgtm_core.py", 4, tmp_path_factory.mktemp("sgtm_core"), *_selected_cases(request))


def _selected_cases(request) -> list[str]:
    """The cases of this module's selected tests: the worker runs only those (`-k` narrows it)."""
    names = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.module is request.module and callspec is not None and "case" in callspec.params:
            names.add(callspec.params["case"].name)
    return sorted(names)


def _state(results, case):
    prefix = f"{case.name}/state/"
    return {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}


def _tensors(results, key, kind, names):
    return {n: results[f"{key}/{kind}/{n}"] for n in names}


_reference_cache: dict = {}


def _reference(case, state):
    if case.name not in _reference_cache:
        batch = make_batch(case.model, SEQ, MBS, seed=11)
        grads, _ = reference_gpt.sgtm_gradients(
            state, case.model, batch, case.heads, case.units, case.layers,
            case.sgtm.strategy, case.sgtm.mask_embeddings, scale=1.0 / len(batch),
            joint_down=case.sgtm.joint_down_projections,
        )
        with torch.no_grad():
            losses = torch.cat([
                reference_gpt.forward(state, case.model, mb["tokens"], mb["targets"], mb["labels"],
                                      mb["attn_mask"], case.heads, case.units, case.layers, case.sgtm.strategy)
                for mb in batch
            ])
        labels = torch.cat([mb["labels"] for mb in batch])
        _reference_cache[case.name] = grads, losses, labels
    return _reference_cache[case.name]


@pytest.mark.parametrize("case,layout", LAYOUT_CASES, ids=IDS)
def test_gradients_match_independent_reference(results, case, layout):
    """Invariant 1 (and each baseline's rule): every gathered gradient equals the reference's."""
    state = _state(results, case)
    key = layout_key(case, layout)
    ref_grads, ref_losses, _ = _reference(case, state)
    torch.testing.assert_close(results[f"{key}/losses"], ref_losses, rtol=1e-5, atol=1e-5)
    got = _tensors(results, key, "grad", state)
    for name in state:
        # fp32 round-off: elementwise within 1e-5 of the tensor's scale
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(got[name], ref_grads[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@for_strategy("sgtm")
def test_forget_tokens_never_reach_retain_parameters(results, case, layout):
    """Invariant 1: with only F positions in the loss, every Θ_R gradient element is exactly zero."""
    state = _state(results, case)
    forget, retain = masks_for(case, state)
    key = layout_key(case, layout)
    f_grads = _tensors(results, key, "fgrad", state)
    assert any(retain[n].any() for n in state)
    for name in state:
        leaked = f_grads[name][retain[name]]
        assert torch.count_nonzero(leaked) == 0, f"{name}: F positions reached Θ_R"
    # ...while Θ_F and Θ_J do learn from them.
    assert any(f_grads[n][forget[n]].abs().sum() > 0 for n in state)


@pytest.mark.parametrize("case,layout", LAYOUT_CASES, ids=IDS)
def test_retain_tokens_do_not_use_forget_parameters(results, case, layout):
    """Invariant 2: changing Θ_F leaves every output at R positions bit-identical."""
    key = layout_key(case, layout)
    _, _, labels = _reference(case, _state(results, case))
    base, perturbed = results[f"{key}/base"], results[f"{key}/pert_f"]
    is_r = labels == reference_gpt.R
    assert torch.equal(base[is_r], perturbed[is_r])
    assert not torch.equal(base[~is_r], perturbed[~is_r]), "Θ_F perturbation had no effect at all"


@for_strategy("activation_masking")
def test_activation_masking_zeroes_retain_activations_at_forget_tokens(results, case, layout):
    key = layout_key(case, layout)
    _, _, labels = _reference(case, _state(results, case))
    base, perturbed = results[f"{key}/base"], results[f"{key}/pert_r"]
    is_f = labels == reference_gpt.FG
    assert torch.equal(base[is_f], perturbed[is_f])
    assert not torch.equal(base[~is_f], perturbed[~is_f])


@for_strategy("gradient_routing")
def test_gradient_routing_detaches_retain_activations_at_forget_tokens(results, case, layout):
    """With only F positions in the loss, nothing flows back through retain heads/units."""
    state = _state(results, case)
    _, retain = masks_for(case, state)
    key = layout_key(case, layout)
    f_grads = _tensors(results, key, "fgrad", state)
    upstream = [n for n in state if n.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight",
                                                "linear_fc1.bias"))]
    for name in upstream:
        assert torch.count_nonzero(f_grads[name][retain[name]]) == 0, name
    # The retain columns of proj/fc2 still learn from F tokens (only activations are detached).
    downstream = [n for n in state if n.endswith(("linear_proj.weight", "linear_fc2.weight"))]
    assert all(f_grads[n][retain[n]].abs().sum() > 0 for n in downstream)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layout_invariance_of_one_step(results, case):
    """The same weights give the same loss and gathered gradients at every layout (fp32, 1e-5)."""
    state = _state(results, case)
    first = layout_key(case, case.layouts[0])
    for layout in case.layouts[1:]:
        key = layout_key(case, layout)
        a, b = results[f"{key}/losses"], results[f"{first}/losses"]
        assert (a - b).norm() <= 1e-5 * b.norm(), key
        for name in state:
            a, b = results[f"{key}/grad/{name}"], results[f"{first}/grad/{name}"]
            assert (a - b).norm() <= 1e-5 * b.norm() + 1e-12, f"{key} {name}"


@pytest.mark.parametrize("case,layout", LAYOUT_CASES, ids=IDS)
def test_ablate_zeroes_exactly_the_forget_set(results, case, layout):
    state = _state(results, case)
    forget, _ = masks_for(case, state)
    key = layout_key(case, layout)
    ablated = _tensors(results, key, "ablated", state)
    zeroed = 0
    for name in state:
        target = forget[name]
        if case.sgtm.strategy == "gradient_routing" and not name.endswith(
            ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias")
        ):
            target = torch.zeros_like(target)
        assert torch.count_nonzero(ablated[name][target]) == 0, name
        assert torch.equal(ablated[name][~target], state[name][~target]), name
        zeroed += int(target.sum())
    assert zeroed > 0


@pytest.mark.parametrize("case,layout", LAYOUT_CASES, ids=IDS)
def test_region_codes_follow_the_partition_on_every_rank(results, case, layout):
    """`param_regions` on each rank's chunk (what step gating uses), gathered, against the independent masks:
    Θ_F where the reference says forget, Θ_R where it says retain (incl. masked embeddings), Θ_J elsewhere."""
    state = _state(results, case)
    forget, retain = masks_for(case, state)
    codes = _tensors(results, layout_key(case, layout), "codes", state)
    for name in state:
        expected = torch.where(forget[name], 2, torch.where(retain[name], 1, 0)).to(torch.uint8)
        assert torch.equal(codes[name], expected), name
