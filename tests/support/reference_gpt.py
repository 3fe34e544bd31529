"""An independent single-process GPT in plain torch, written from the method's definition.

It shares no code with megatron_sgtm: the global weight layout (megatron's group-major qkv,
[gate; up] fc1) and the forget index sets are re-derived here, so a test comparing the two checks
the implementation against the specification.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

U, R, FG = 0, 1, 2  # unlabeled, retain, forget


def forget_masks(state: dict[str, torch.Tensor], cfg, heads, units, layers, strategy="sgtm", embeddings=False,
                 joint_down=False):
    """Elementwise Θ_F (True) and Θ_R masks of the global state, from the partition's index sets. `joint_down`:
    the attention output and MLP down-projections (weights and biases) are neither: Θ_J."""
    hd = cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_query_groups
    per = cfg.num_attention_heads // groups
    forget, retain = {}, {}
    for name, tensor in state.items():
        forget[name] = torch.zeros(tensor.shape, dtype=torch.bool)
        retain[name] = torch.zeros(tensor.shape, dtype=torch.bool)
    for layer in layers:
        p = f"decoder.layers.{layer}."
        qkv_rows = torch.zeros((per + 2) * hd * groups, dtype=torch.bool)
        for g in {h // per for h in heads}:
            qkv_rows[g * (per + 2) * hd:(g + 1) * (per + 2) * hd] = True
        proj_cols = torch.zeros(cfg.num_attention_heads * hd, dtype=torch.bool)
        for h in heads:
            proj_cols[h * hd:(h + 1) * hd] = True
        unit = torch.zeros(cfg.ffn_hidden_size, dtype=torch.bool)
        unit[list(units)] = True
        fc1_rows = torch.cat([unit, unit]) if cfg.gated else unit
        split = {
            "self_attention.linear_qkv.weight": qkv_rows[:, None],
            "self_attention.linear_qkv.bias": qkv_rows,
            "mlp.linear_fc1.weight": fc1_rows[:, None],
            "mlp.linear_fc1.bias": fc1_rows,
        }
        if not joint_down:
            split["self_attention.linear_proj.weight"] = proj_cols[None, :]
            split["mlp.linear_fc2.weight"] = unit[None, :]
        for suffix, mask in split.items():
            if p + suffix in state:
                full = mask.expand(state[p + suffix].shape)
                forget[p + suffix] = full.clone()
                retain[p + suffix] = ~full
        for suffix in ("self_attention.linear_proj.bias", "mlp.linear_fc2.bias"):
            if p + suffix in state and not joint_down:
                retain[p + suffix][:] = True
    if embeddings:
        if not cfg.tie_embeddings:
            retain["embedding.word_embeddings.weight"][:] = True
        if "embedding.position_embeddings.weight" in state:
            retain["embedding.position_embeddings.weight"][:] = True
    return forget, retain


def _norm(x, state, prefix, cfg):
    w = state[prefix + ".weight"]
    if cfg.normalization == "RMSNorm":
        return F.rms_norm(x, (x.shape[-1],), w, eps=1e-5)
    return F.layer_norm(x, (x.shape[-1],), w, state[prefix + ".bias"], eps=1e-5)


def _linear(x, state, prefix):
    return F.linear(x, state[prefix + ".weight"], state.get(prefix + ".bias"))


def _rope(x, base):
    # x: [b, s, heads, d]; megatron's non-interleaved rotary embedding
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(x.shape[1], dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def _rule(x, labels, forget_cols, strategy):
    """Forward rule at a row-parallel input (head contexts / MLP activations)."""
    if strategy == "none":
        return x
    is_r = (labels == R)[..., None]
    is_f = (labels == FG)[..., None]
    fc = forget_cols[None, None, :]
    x = torch.where(is_r & fc, torch.zeros_like(x), x)
    if strategy == "activation_masking":
        x = torch.where(is_f & ~fc, torch.zeros_like(x), x)
    if strategy == "gradient_routing":
        x = torch.where(is_f & ~fc, x.detach(), x)
    return x


def forward(state, cfg, tokens, targets, labels, attn_mask, heads, units, layers, strategy="sgtm"):
    """Per-token cross entropy [b, s]. attn_mask: bool [b, 1, s, s], True = masked out (or None)."""
    b, s = tokens.shape
    out = logits(state, cfg, tokens, labels, attn_mask, heads, units, layers, strategy)
    return F.cross_entropy(out.reshape(b * s, -1), targets.reshape(-1), reduction="none").view(b, s)


def logits(state, cfg, tokens, labels, attn_mask, heads, units, layers, strategy="sgtm"):
    """The output layer's logits [b, s, vocab] (see `forward`)."""
    b, s = tokens.shape
    hd = cfg.hidden_size // cfg.num_attention_heads
    nq, ng = cfg.num_attention_heads, cfg.num_query_groups
    per = nq // ng
    x = state["embedding.word_embeddings.weight"][tokens]
    if cfg.position_embedding == "learned_absolute":
        x = x + state["embedding.position_embeddings.weight"][torch.arange(s)][None]
    if attn_mask is None:
        attn_mask = ~torch.ones(s, s, dtype=torch.bool).tril()[None, None].expand(b, 1, s, s)
    act = F.silu if cfg.gated else F.gelu
    for layer in range(cfg.num_layers):
        p = f"decoder.layers.{layer}."
        masked = layer in layers
        h = _norm(x, state, p + "input_layernorm", cfg)
        qkv = _linear(h, state, p + "self_attention.linear_qkv")
        qkv = qkv.view(b, s, ng, per + 2, hd)
        q = qkv[:, :, :, :per].reshape(b, s, nq, hd)
        k, v = qkv[:, :, :, per], qkv[:, :, :, per + 1]
        if cfg.position_embedding == "rope":
            q, k = _rope(q, cfg.rotary_base), _rope(k, cfg.rotary_base)
        k = k.repeat_interleave(per, dim=2)
        v = v.repeat_interleave(per, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / hd**0.5
        scores = scores.masked_fill(attn_mask, float("-inf"))
        ctx = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, nq * hd)
        if masked:
            cols = torch.zeros(nq * hd, dtype=torch.bool)
            for head in heads:
                cols[head * hd:(head + 1) * hd] = True
            ctx = _rule(ctx, labels, cols, strategy)
        x = x + _linear(ctx, state, p + "self_attention.linear_proj")
        h = _norm(x, state, p + "pre_mlp_layernorm", cfg)
        a = _linear(h, state, p + "mlp.linear_fc1")
        if cfg.gated:
            gate, up = a.chunk(2, dim=-1)
            a = act(gate) * up
        else:
            a = act(a)
        if masked:
            cols = torch.zeros(cfg.ffn_hidden_size, dtype=torch.bool)
            cols[list(units)] = True
            a = _rule(a, labels, cols, strategy)
        x = x + _linear(a, state, p + "mlp.linear_fc2")
    x = _norm(x, state, "decoder.final_layernorm", cfg)
    out_w = state["embedding.word_embeddings.weight"] if cfg.tie_embeddings else state["output_layer.weight"]
    return F.linear(x, out_w)


def sgtm_gradients(state, cfg, batch, heads, units, layers, strategy, embeddings, scale, joint_down=False):
    """Expected gradients: Θ_R from the loss without F positions, everything else from the full loss."""
    forget, retain = forget_masks(state, cfg, heads, units, layers, strategy, embeddings, joint_down)

    def grads(loss_mask):
        params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
        total = 0.0
        for mb in batch:
            losses = forward(params, cfg, mb["tokens"], mb["targets"], mb["labels"], mb["attn_mask"],
                             heads, units, layers, strategy)
            total = total + (losses * loss_mask(mb)).sum()
        total = total * scale
        total.backward()
        return {k: p.grad for k, p in params.items()}, float(total.detach())

    full, loss = grads(lambda mb: torch.ones_like(mb["labels"], dtype=torch.float32))
    if strategy != "sgtm":
        return full, loss
    not_forget, _ = grads(lambda mb: (mb["labels"] != FG).float())
    return {k: torch.where(retain[k], not_forget[k], full[k]) for k in state}, loss
