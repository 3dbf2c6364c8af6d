"""Batched decoding for Llama-family models with a preallocated KV cache and no per-step framework
overhead: the fast path of ``TransformersEngine``.

One ``decode`` call runs a left-padded batch: a prefill over the prompts, then one step per new token.
Per layer and step the work is the model's own modules (norms, projections, MLP, rotary embedding) and
``scaled_dot_product_attention`` over a view of a cache allocated once for ``prompt width +
max_new_tokens`` positions; nothing is concatenated, no mask object is rebuilt, and the LM head runs on
the last position only. Positions follow ``model.generate``: ``cumsum(attention_mask) - 1``, so the
tokens equal greedy ``generate``'s (tested).

Left-padding queries are allowed to attend to themselves only, which keeps every row free of NaNs
(their outputs are never read, and real queries never attend to them).

Supported: ``model_type`` in ``SUPPORTED`` (Llama, Mistral without a binding sliding window, Qwen2), the
modules read at call time so training in between calls is seen. Other models use ``generate``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2")


def supports(model, total_length: int) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED:
        return False
    if not hasattr(model, "model") or not hasattr(model.model, "layers") or not hasattr(model.model, "rotary_emb"):
        return False
    window = getattr(cfg, "sliding_window", None)
    return not (getattr(cfg, "use_sliding_window", True) and window is not None and window < total_length)


def pack_linears(model, batch_size: int) -> dict:
    """oneDNN-prepacked weights of the decoder's plain ``nn.Linear`` layers (and the LM head), for
    decode steps of ``batch_size`` rows: on CPUs, oneDNN with a prepacked weight runs these skinny
    products about 1.7x faster than ``F.linear`` (bench/generate.py). Empty when oneDNN is missing."""
    if model.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return {}
    linears = [m for m in model.model.layers.modules() if type(m) is torch.nn.Linear] + [model.lm_head]
    if any(type(m) is not torch.nn.Linear or m.weight.dtype != torch.float32 for m in linears):
        return {}
    return {m: torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_size) for m in linears}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticDecoder:
    """``StaticDecoder(model).decode(input_ids, attention_mask, max_new_tokens, pick)``: ``pick(logits)``
    gets the float32 logits ``[B, V]`` of the next token and returns ``(tokens [B], done [B] | None)``; the
    loop stops early once every row is done. Returns the new tokens ``[B, steps]``."""

    def __init__(self, model, packed: dict | None = None):
        self.model = model
        self.packed = packed or {}
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = self.head_dim ** -0.5

    def _linear(self, module, x):
        w = self.packed.get(module)
        if w is None or x.shape[1] != 1:  # prefill: the plain product
            return module(x)
        return torch.ops.mkldnn._linear_pointwise(x, w, module.bias, "none", [], "")

    def _layer(self, i, layer, x, cos, sin, k_cache, v_cache, start, mask):
        B, Q, _ = x.shape
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = self._linear(attn.q_proj, h).view(B, Q, self.heads, self.head_dim).transpose(1, 2)
        k = self._linear(attn.k_proj, h).view(B, Q, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self._linear(attn.v_proj, h).view(B, Q, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        end = start + Q
        k_cache[i][:, :, start:end] = k
        v_cache[i][:, :, start:end] = v
        o = F.scaled_dot_product_attention(q, k_cache[i][:, :, :end], v_cache[i][:, :, :end], attn_mask=mask,
                                           scale=self.scale, enable_gqa=self.kv_heads != self.heads)
        x = x + self._linear(attn.o_proj, o.transpose(1, 2).reshape(B, Q, -1))
        h = layer.post_attention_layernorm(x)
        mlp = layer.mlp
        return x + self._linear(mlp.down_proj, mlp.act_fn(self._linear(mlp.gate_proj, h)) * self._linear(mlp.up_proj, h))

    def _forward(self, ids, positions, k_cache, v_cache, start, mask):
        inner = self.model.model
        x = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for i, layer in enumerate(inner.layers):
            x = self._layer(i, layer, x, cos, sin, k_cache, v_cache, start, mask)
        return self._linear(self.model.lm_head, inner.norm(x[:, -1:]))[:, 0].float()

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, pick,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """``rows`` (optional, ``[B_out]``): output row ``r`` continues prompt ``rows[r]``. Each distinct
        prompt is prefilled once and its cache copied to its rows (``n`` samples of one prompt)."""
        U, W = input_ids.shape
        total = W + max_new_tokens
        device = input_ids.device
        dtype = self.model.model.embed_tokens.weight.dtype
        n_layers = len(self.model.model.layers)
        shape = (U, self.kv_heads, total, self.head_dim)
        k_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        v_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        real = torch.zeros((U, total), dtype=torch.bool, device=device)
        real[:, :W] = attention_mask.bool()
        real[:, W:] = True
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # prefill: causal over real keys; a padding query sees itself only
        causal = torch.ones((W, W), dtype=torch.bool, device=device).tril()
        mask = causal[None] & real[:, None, :W]
        mask |= torch.eye(W, dtype=torch.bool, device=device)[None]
        logits = self._forward(input_ids, positions, k_cache, v_cache, 0, mask[:, None])
        next_pos = positions[:, -1:] + 1
        if rows is not None:
            k_cache = [k.index_select(0, rows) for k in k_cache]
            v_cache = [v.index_select(0, rows) for v in v_cache]
            logits, real, next_pos = logits[rows], real[rows], next_pos[rows]
        B = logits.shape[0]
        out = torch.empty((B, max_new_tokens), dtype=torch.long, device=device)
        steps = 0
        for t in range(max_new_tokens):
            tokens, done = pick(logits)
            out[:, t] = tokens
            steps = t + 1
            if (done is not None and bool(done.all())) or t == max_new_tokens - 1:
                break
            step_mask = real[:, None, None, :W + t + 1]
            # a finished row may carry a negative marker: feed it any valid id, its output is unused
            logits = self._forward(tokens.clamp(min=0)[:, None], next_pos, k_cache, v_cache, W + t, step_mask)
            next_pos = next_pos + 1
        return out[:, :steps]
