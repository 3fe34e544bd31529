"""`megatron-sgtm unlearn rmu | cir --checkpoint IN --out OUT [--data PATH] [method flags]`.

Post-hoc unlearning of a trained model (usually the no-filter baseline) on the forget categories' training
documents; writes a model-only checkpoint that `eval`, `export-hf`, `ablate` and `attack` read. One process, on
CPU; the held-out forget/retain losses before and after are printed and kept in meta.json.
"""

from __future__ import annotations

import argparse
import json

# The checkpoint readers' errors for a bad input directory (besides UserError and OSError).
READER_ERRORS = (ValueError, KeyError)


def _run(args: argparse.Namespace, method: str) -> None:
    from megatron_sgtm.unlearning.common import check_out, load_unlearning, progress, write_result

    check_out(args.out)
    source = load_unlearning(args.checkpoint, args.data)
    progress(f"{method}: {len(source.forget_docs)} forget and {len(source.retain_docs)} retain training documents")
    count = args.eval_batches if args.eval_batches is not None else source.cfg.train.eval_batches or 8
    before = source.heldout_losses(count)
    if method == "rmu":
        from megatron_sgtm.unlearning.rmu import RMUSettings, unlearn

        settings = RMUSettings(layer=args.layer, steering_coeff=args.steering_coeff, alpha=args.alpha, lr=args.lr,
                               steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    else:
        from megatron_sgtm.unlearning.cir import CIRSettings, unlearn

        settings = CIRSettings(start=args.start_layer, end=args.end_layer, collapse=args.collapse,
                               forget_loss=args.forget_loss, disruption_mask=args.disruption_mask,
                               act_directions=args.act_directions, grad_directions=args.grad_directions,
                               ridge=args.ridge, retain_momentum=args.retain_momentum,
                               unlearning_rate=args.unlearning_rate, retaining_rate=args.retaining_rate,
                               loss_budget=args.loss_budget, max_epochs=args.max_epochs, batch_size=args.batch_size,
                               forget_batches=args.forget_batches, seed=args.seed)
    resolved, params, originals = unlearn(source, settings)
    after = source.heldout_losses(count)
    losses = {"heldout_batches": count, "before": before, "after": after}
    changed = write_result(source, args.out, method, resolved, params, originals, losses)
    report = {k: {"before": before[k], "after": after[k], "change": after[k] - before[k]} for k in before}
    progress(f"{method}: held-out losses {json.dumps(report)}")
    progress(f"wrote {args.out} ({len(changed)} tensors changed; the source's SGTM partition is kept)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a training or model-only checkpoint directory")
    p.add_argument("--out", required=True, help="the new model-only checkpoint directory")
    p.add_argument("--data", help="the training shard directory (default: the checkpoint's data.path)")
    p.add_argument("--seed", type=int, default=42, help="control vector, batch order and PCA (default 42)")
    p.add_argument("--eval-batches", type=int, help="held-out micro-batches per category for the before/after "
                   "losses (default: the run's train.eval_batches)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parent = subparsers.add_parser("unlearn", help="post-hoc unlearning baselines (RMU, CIR) -> model-only "
                                   "checkpoint", description=__doc__)
    methods = parent.add_subparsers(dest="unlearn_method", required=True)

    p = methods.add_parser("rmu", help="Representation Misdirection for Unlearning (Li et al. 2024)")
    _common(p)
    p.add_argument("--layer", type=int, help="decoder layer whose output is steered (default: 7/16 of the depth); "
                   "the MLPs of layers layer-2..layer are updated")
    p.add_argument("--steering-coeff", type=float, default=20.0, help="c, the control vector's norm (default 20)")
    p.add_argument("--alpha", type=float, default=100.0, help="retain loss weight (default 100)")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default 5e-5)")
    p.add_argument("--steps", type=int, default=250, help="steps (default 250)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forget and retain batch (default 4)")
    p.set_defaults(func=lambda a: _run(a, "rmu"), user_errors=READER_ERRORS)

    p = methods.add_parser("cir", help="Collapse of Irrelevant Representations (Sondej & Yang 2025)")
    _common(p)
    p.add_argument("--start-layer", type=int, help="first MLP broken by --forget-loss mlp-breaking (default: "
                   "6/16 of the depth)")
    p.add_argument("--end-layer", type=int, help="one past the last MLP broken and updated (the MLPs of layers "
                   "0..end-1 are; default: 12/16 of the depth)")
    p.add_argument("--collapse", default="retain",
                   help="retain: whiten each linear's inputs by the retain activations' second moment (default); "
                   "forget: project out the forget activations' mean + top PCs (the paper)")
    p.add_argument("--forget-loss", default="label-logit",
                   help="label-logit: lower the forget tokens' next-token logits (default; the authors' later "
                   "CIR); mlp-breaking: the paper's MLP breaking loss")
    p.add_argument("--disruption-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="keep only forget tokens whose update lowers the retain loss to first order (default on)")
    p.add_argument("--act-directions", type=int, default=24,
                   help="--collapse forget: directions projected out of each linear's inputs, mean + PCs "
                   "(default 24)")
    p.add_argument("--grad-directions", type=int, default=0,
                   help="directions projected out of each linear's output gradients, mean + PCs (default 0: "
                   "none; the paper: 36)")
    p.add_argument("--ridge", type=float, default=1e-3,
                   help="--collapse retain: ridge added to the second moment, times its mean eigenvalue (1e-3)")
    p.add_argument("--retain-momentum", type=float, default=0.9,
                   help="momentum of the retain gradient the disruption mask judges against (default 0.9)")
    p.add_argument("--unlearning-rate", type=float, default=0.05, help="norm of each forget update (default 0.05)")
    p.add_argument("--retaining-rate", type=float, default=3e-4, help="SGD lr of the retain step (default 3e-4)")
    p.add_argument("--loss-budget", type=float, default=1.001,
                   help="stop when the retain loss exceeds its start by this factor (default 1.001)")
    p.add_argument("--max-epochs", type=int, default=200, help="(default 200)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--forget-batches", type=int, default=16, help="forget batches per epoch (default 16)")
    p.set_defaults(func=lambda a: _run(a, "cir"), user_errors=READER_ERRORS)
