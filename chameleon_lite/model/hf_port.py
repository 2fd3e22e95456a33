"""Weight conversion between :class:`chameleon_lite.model.decoder.Decoder` and Hugging Face Chameleon.

The decoder's math is Hugging Face ``ChameleonModel``'s (RMSNorm, per-head LayerNorm QK-norm before RoPE,
``rotate_half`` RoPE, SwiGLU, pre-norm or swin-norm), so a state dict maps one-to-one apart from names and
the padded vocabulary rows. ``transformers`` is only needed by :func:`hf_chameleon_config` (imported lazily);
the conversions work on any module exposing the usual ``state_dict()``.

Differences to keep in mind:
- HF Chameleon always has QK-norm: ``qk_norm=False`` decoders cannot be exported.
- HF ``ChameleonForConditionalGeneration.forward`` sets the logits of the ids named ``IMGIMG*`` in its
  ``vocabulary_map`` to the dtype minimum (text-only decoding); our decoder masks only padded columns.
- HF keeps no vocabulary padding: rows ``>= vocab_size`` of our embedding/output are zeroed on import and
  dropped on export.
"""

from __future__ import annotations

from typing import Any

import torch

from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import Decoder

_BLOCK_NAMES = {  # ours (inside layers.{i}.) -> HF (inside model.layers.{i}.)
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.q_norm.bias": "self_attn.q_norm.bias",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "attn.k_norm.bias": "self_attn.k_norm.bias",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
_VOCAB_ROWS = {"embed_tokens.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}


def name_map(config: DecoderConfig) -> dict[str, str]:
    """Our parameter names -> HF ``ChameleonForConditionalGeneration`` names."""
    names = dict(_VOCAB_ROWS)
    names["norm.weight"] = "model.norm.weight"
    for i in range(config.n_layers):
        for ours, theirs in _BLOCK_NAMES.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def decoder_config_from_hf(hf_config: Any, **overrides: Any) -> DecoderConfig:
    """A :class:`DecoderConfig` with the shape of an HF ``ChameleonConfig`` (``overrides`` win)."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only default RoPE is supported, got rope_type={rope.get('rope_type')!r}")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise ValueError("HF config uses biases in attention/MLP; the decoder has none")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_config.hidden_act!r}; the decoder's SwiGLU uses silu")
    kwargs: dict[str, Any] = dict(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        mlp_hidden=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        norm_eps=hf_config.rms_norm_eps,
        qk_norm=True,
        swin_norm=bool(hf_config.swin_norm),
        dropout=float(hf_config.attention_dropout or 0.0),
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        init_std=hf_config.initializer_range,
    )
    kwargs.update(overrides)
    return DecoderConfig(**kwargs)


def hf_chameleon_config(
    config: DecoderConfig, *, vocabulary_map: dict[str, int] | None = None, vq_config: dict | None = None, **kwargs
):
    """An HF ``ChameleonConfig`` with the decoder's shape (no network access; ``kwargs`` go to ``ChameleonConfig``).

    ``vocabulary_map`` defaults to ``{}`` (no image placeholder, no masked ``IMGIMG*`` logits); ``vq_config``
    defaults to a tiny VQ-VAE because HF always builds one inside ``ChameleonModel``.
    """
    if not config.qk_norm:
        raise ValueError("HF Chameleon always applies QK-norm; cannot express qk_norm=False")
    from transformers import ChameleonConfig  # lazy: test/dev dependency only

    tiny_vq = dict(embed_dim=8, num_embeddings=16, latent_channels=8, resolution=8, base_channels=32,
                   channel_multiplier=[1], num_res_blocks=1, attn_resolutions=None)
    return ChameleonConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.mlp_hidden,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        swin_norm=config.swin_norm,
        attention_dropout=config.dropout,
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
        vocabulary_map={} if vocabulary_map is None else vocabulary_map,
        vq_config=tiny_vq if vq_config is None else vq_config,
        **kwargs,
    )


@torch.no_grad()
def load_hf_chameleon_state(decoder: Decoder, hf_model: torch.nn.Module) -> None:
    """Copy the text decoder weights of an HF ``ChameleonForConditionalGeneration`` into ``decoder`` (in place).

    The VQ-VAE inside the HF model is ignored. Padded vocabulary rows are zeroed.

    Raises:
        ValueError: the decoder has no QK-norm, or a tensor is missing or has the wrong shape.
    """
    if not decoder.config.qk_norm:
        raise ValueError("HF Chameleon always has QK-norm; build the decoder with qk_norm=True")
    theirs = hf_model.state_dict()
    ours = decoder.state_dict()
    V = decoder.config.vocab_size
    for our_name, hf_name in name_map(decoder.config).items():
        if hf_name not in theirs:
            raise ValueError(f"HF state dict has no {hf_name!r} (needed for {our_name!r})")
        src, dst = theirs[hf_name], ours[our_name]
        if our_name in _VOCAB_ROWS:
            if src.shape != (V, dst.shape[1]):
                raise ValueError(f"{hf_name}: HF shape {tuple(src.shape)}, expected {(V, dst.shape[1])}")
            dst.zero_()
            dst[:V].copy_(src)
        else:
            if src.shape != dst.shape:
                raise ValueError(f"{hf_name}: HF shape {tuple(src.shape)} != ours {tuple(dst.shape)} ({our_name})")
            dst.copy_(src)


@torch.no_grad()
def export_hf_chameleon_state(decoder: Decoder) -> dict[str, torch.Tensor]:
    """The decoder's weights under HF ``ChameleonForConditionalGeneration`` names (padded rows dropped).

    Load with ``hf_model.load_state_dict(sd, strict=False)`` (the HF VQ-VAE weights are not part of it).
    """
    if not decoder.config.qk_norm:
        raise ValueError("HF Chameleon always has QK-norm; cannot export a qk_norm=False decoder")
    ours = decoder.state_dict()
    V = decoder.config.vocab_size
    out = {}
    for our_name, hf_name in name_map(decoder.config).items():
        tensor = ours[our_name]
        out[hf_name] = (tensor[:V] if our_name in _VOCAB_ROWS else tensor).detach().clone()
    return out
