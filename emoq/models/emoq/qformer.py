"""EmoQ-Former: learnable queries that read speech frames and share self-attention with the transcript.

BLIP-2's Q-Former (post-LN BERT blocks) with three EmoQ choices:
- self-attention runs over [queries ; transcript tokens], so the queries see the words being said
  (the transcript is optional: speech-only input simply has no text positions);
- cross-attention from the *queries only* to the speech frames, every `cross_attention_frequency`
  blocks; text positions never read audio directly;
- a separate feed-forward network for query positions (BLIP-2 habit), so the text path and the
  query path do not have to share one FFN.
Window-level queries (SALMONN): with `window_seconds`, each window of frames gets its own copy of
the queries, so long audio is summarised window by window instead of being truncated.
The module always computes in fp32: in fp16 a Q-Former's attention overflows.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from .configuration_emoq import EmoQFormerConfig


def _additive_mask(keep: torch.Tensor) -> torch.Tensor:
    """[B, K] bool (True = attend) -> [B, 1, 1, K] float additive mask for scaled_dot_product_attention."""
    bias = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)
    return bias.masked_fill(~keep, torch.finfo(torch.float32).min)[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention followed by dropout, residual and LayerNorm (BERT post-LN)."""

    def __init__(self, config: EmoQFormerConfig, kv_size: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.q = nn.Linear(config.hidden_size, config.hidden_size)
        self.k = nn.Linear(kv_size, config.hidden_size)
        self.v = nn.Linear(kv_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attn_dropout = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            self._heads(self.q(x)),
            self._heads(self.k(kv)),
            self._heads(self.v(kv)),
            attn_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(x.shape)
        return self.norm(x + self.dropout(self.out(out)))


class FeedForward(nn.Module):
    def __init__(self, config: EmoQFormerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.fc2(self.act(self.fc1(x)))))


class EmoQFormerLayer(nn.Module):
    def __init__(self, config: EmoQFormerConfig, has_cross_attention: bool):
        super().__init__()
        self.self_attention = Attention(config, config.hidden_size)
        self.cross_attention = Attention(config, config.encoder_hidden_size) if has_cross_attention else None
        self.query_ffn = FeedForward(config)
        self.text_ffn = FeedForward(config)

    def forward(self, hidden, self_mask, num_queries, frames, frame_mask):
        hidden = self.self_attention(hidden, hidden, self_mask)
        queries, text = hidden[:, :num_queries], hidden[:, num_queries:]
        if self.cross_attention is not None:
            queries = self.cross_attention(queries, frames, frame_mask)
        queries = self.query_ffn(queries)
        if text.shape[1]:
            text = self.text_ffn(text)
        return torch.cat([queries, text], dim=1)


class EmoQFormer(nn.Module):
    """queries [Nq, H] + frames [B, T, Ha] (+ transcript embeddings [B, L, Ht]) -> query states [B, Nq*, H].

    Nq* = Nq, or Nq * num_windows with window-level queries (see `num_windows`).
    """

    def __init__(self, config: EmoQFormerConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.query_tokens = nn.Parameter(torch.randn(1, config.num_query_tokens, h) * config.initializer_range)
        self.text_proj = nn.Linear(config.text_hidden_size, h)
        self.text_positions = nn.Embedding(config.max_text_positions, h)
        self.text_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.frame_norm = nn.LayerNorm(config.encoder_hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(
            EmoQFormerLayer(config, has_cross_attention=i % config.cross_attention_frequency == 0)
            for i in range(config.num_hidden_layers)
        )
        self.gradient_checkpointing = False

    def text_modules(self) -> list[nn.Module]:
        """The transcript side: unused (and so never trained) when the model runs without transcripts."""
        return [self.text_proj, self.text_positions, self.text_norm, *(layer.text_ffn for layer in self.layers)]

    def frames_per_window(self) -> int | None:
        if self.config.window_seconds is None:
            return None
        return max(1, round(self.config.window_seconds * self.config.frames_per_second))

    def forward(
        self,
        frames: torch.Tensor,
        frame_mask: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (query states [B, Nq*, H], query mask [B, Nq*] bool: False for windows past a clip's end)."""
        with torch.autocast(device_type=frames.device.type, enabled=False):
            frames = self.frame_norm(frames.float())
            batch = frames.shape[0]
            per_window = self.frames_per_window()
            if per_window is not None:
                frames, frame_mask, window_valid, windows = _split_windows(frames, frame_mask, per_window)
                if text_embeds is not None:  # every window of a clip sees the clip's whole transcript
                    text_embeds = text_embeds.repeat_interleave(windows, dim=0)
                    text_mask = text_mask.repeat_interleave(windows, dim=0)
            queries = self.query_tokens.float().expand(frames.shape[0], -1, -1)
            nq = queries.shape[1]
            if text_embeds is not None and text_embeds.shape[1] > 0:
                text = self.text_proj(text_embeds.float())
                text = text + self.text_positions.weight[: text.shape[1]]
                text = self.text_norm(text)
                keep = torch.cat([torch.ones_like(queries[..., 0], dtype=torch.bool), text_mask.bool()], dim=1)
                hidden = torch.cat([queries, text], dim=1)
            else:
                keep = torch.ones_like(queries[..., 0], dtype=torch.bool)
                hidden = queries
            self_mask, cross_mask = _additive_mask(keep), _additive_mask(frame_mask.bool())
            for layer in self.layers:
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    # keep each block's input only; its activations are recomputed in backward (same dropout
                    # masks: the RNG state is replayed)
                    hidden = checkpoint(layer, hidden, self_mask, nq, frames, cross_mask, use_reentrant=False)
                else:
                    hidden = layer(hidden, self_mask, nq, frames, cross_mask)
            out = hidden[:, :nq]
            if per_window is None:
                return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
            # [B*W, Nq, H] -> [B, W*Nq, H]; windows holding no frame of the clip are masked out
            out = out.reshape(batch, windows * nq, -1)
            return out, window_valid.view(batch, windows).repeat_interleave(nq, dim=1)


def _split_windows(frames: torch.Tensor, frame_mask: torch.Tensor, per_window: int):
    """[B, T, H] -> ([B*W, per_window, H], attend mask, window validity [B*W], W) with W = ceil(T / per_window)."""
    b, t, h = frames.shape
    windows = max(1, math.ceil(t / per_window))
    pad = windows * per_window - t
    frames = F.pad(frames, (0, 0, 0, pad)).view(b * windows, per_window, h)
    frame_mask = F.pad(frame_mask.bool(), (0, pad), value=False).view(b * windows, per_window)
    valid = frame_mask.any(-1)
    # a window past the clip's end would give NaN attention: let it see its zero frames; its queries are dropped
    return frames, frame_mask | ~valid[:, None], valid, windows


def num_windows(num_frames: int, window_seconds: float | None, frames_per_second: float) -> int:
    """How many windows a clip with `num_frames` encoder frames yields (1 without window-level queries)."""
    if window_seconds is None:
        return 1
    per_window = max(1, round(window_seconds * frames_per_second))
    return max(1, math.ceil(num_frames / per_window))
