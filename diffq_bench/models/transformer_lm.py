"""Pre-norm transformer language model with adaptive input and (tied) adaptive softmax.

The architecture of fairseq's ``transformer_lm_wiki103`` recipe (Baevski & Auli, "Adaptive Input
Representations for Neural Language Modeling"), the LM of the DiffQ paper, written from its
description. What exists, and is tied, is pinned by the paper's parameter count (246,933,504 with a
267,744-entry dictionary, see tests/test_transformer_lm.py):

- adaptive input: per band ``i`` of the vocabulary (cutoffs ``[20000, 60000]``), an embedding of
  dimension ``d_model / factor**i`` and a bias-free projection to ``d_model`` (band 0 included);
  output scaled by ``sqrt(d_model)`` plus sinusoidal positions (no parameters);
- 16 pre-norm decoder layers: q/k/v/out projections with biases, FFN with biases, two LayerNorms;
  no final LayerNorm (``no_decoder_final_norm``);
- adaptive softmax tied to the input: the head scores band-0 words with the band-0 embedding
  directly (no projection when its dimension is ``d_model``) plus one bias-free ``class_proj``
  row per tail cluster; a tail projects with the transposed input projection and scores with the
  band's embedding. Only ``class_proj`` (d_model x n_clusters) is owned by the softmax.

Weights of the tied softmax are read from the input modules *during the model's forward*, so
quantizer hooks (which substitute weights for the duration of the outermost forward) see one value
per tensor shared by both uses.
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F


@dataclasses.dataclass
class TransformerLMConfig:
    """Hyper-parameters; defaults are the paper's WikiText-103 model (dictionary size aside).

    Attributes:
        vocab_size: dictionary size (specials included).
        d_model: model width. ffn_dim: hidden width of the feed-forward blocks.
        n_heads: attention heads. n_layers: decoder layers.
        dropout: residual/embedding dropout. attention_dropout: on attention weights.
        activation_dropout: after the FFN non-linearity. adaptive_softmax_dropout: in the softmax.
        layerdrop: probability of skipping each layer in a training forward.
        cutoffs: adaptive band boundaries; those >= vocab_size are dropped.
        adaptive_factor: band ``i`` has dimension ``d_model // factor**i``.
        tie_adaptive_weights: softmax word weights are the input embeddings.
        tie_adaptive_proj: softmax tail projections are the (transposed) input projections.
        final_norm: LayerNorm after the last layer (absent in the paper's model).
        padding_idx: id whose embedding is kept at zero gradient.
    """
    vocab_size: int = 267_744
    d_model: int = 1024
    ffn_dim: int = 4096
    n_heads: int = 8
    n_layers: int = 16
    dropout: float = 0.2
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    adaptive_softmax_dropout: float = 0.2
    layerdrop: float = 0.1
    cutoffs: tp.Sequence[int] = (20000, 60000)
    adaptive_factor: float = 4.0
    tie_adaptive_weights: bool = True
    tie_adaptive_proj: bool = True
    final_norm: bool = False
    padding_idx: int = 0

    def __post_init__(self):
        for key in ("vocab_size", "d_model", "ffn_dim", "n_heads", "n_layers"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by "
                             f"model.n_heads ({self.n_heads})")
        for key in ("dropout", "attention_dropout", "activation_dropout",
                    "adaptive_softmax_dropout", "layerdrop"):
            value = getattr(self, key)
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"model.{key} must be in [0, 1), got {value!r}")
        if self.adaptive_factor < 1:
            raise ValueError(f"model.adaptive_factor must be >= 1, got {self.adaptive_factor}")
        cutoffs = [int(c) for c in self.cutoffs]
        if any(b <= a for a, b in zip(cutoffs, cutoffs[1:])) or any(c < 1 for c in cutoffs):
            raise ValueError(f"model.cutoffs must be positive and strictly increasing, got {cutoffs}")
        if not 0 <= self.padding_idx < self.vocab_size:
            raise ValueError(f"model.padding_idx must be in [0, {self.vocab_size}), "
                             f"got {self.padding_idx}")
        # Small dictionaries (embedded corpus): bands beyond the vocabulary do not exist.
        self.cutoffs = [c for c in cutoffs if c < self.vocab_size]

    @property
    def bands(self) -> tp.List[tp.Tuple[int, int, int]]:
        """(first id, end id, dimension) of each adaptive band."""
        edges = [0] + list(self.cutoffs) + [self.vocab_size]
        return [(edges[i], edges[i + 1], max(1, int(self.d_model // (self.adaptive_factor ** i))))
                for i in range(len(edges) - 1)]


class AdaptiveInput(nn.Module):
    """Per-band embeddings of decreasing dimension, each projected to ``d_model``."""

    def __init__(self, cfg: TransformerLMConfig):
        super().__init__()
        self.bands = cfg.bands
        self.d_model = cfg.d_model
        self.embeddings = nn.ModuleList()
        self.projections = nn.ModuleList()
        for start, end, dim in self.bands:
            pad = cfg.padding_idx - start if start <= cfg.padding_idx < end else None
            self.embeddings.append(nn.Embedding(end - start, dim, padding_idx=pad))
            self.projections.append(nn.Linear(dim, cfg.d_model, bias=False))

    def reset_parameters(self) -> None:
        for emb, proj in zip(self.embeddings, self.projections):
            nn.init.normal_(emb.weight, 0.0, emb.embedding_dim ** -0.5)
            if emb.padding_idx is not None:
                with torch.no_grad():
                    emb.weight[emb.padding_idx].zero_()
            nn.init.xavier_uniform_(proj.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = None
        for (start, end, _), emb, proj in zip(self.bands, self.embeddings, self.projections):
            mask = (tokens >= start) & (tokens < end)
            idx = mask.nonzero(as_tuple=True)
            value = proj(emb(tokens[idx] - start))
            if out is None:
                out = value.new_zeros(*tokens.shape, self.d_model)
            out = out.index_put(idx, value)
        return out


class AdaptiveSoftmax(nn.Module):
    """Adaptive softmax head + tail clusters; word weights/projections optionally tied.

    When tied, the band weights are passed at call time (``inputs``) instead of being owned, so
    each tensor is registered once, in :class:`AdaptiveInput`.
    """

    def __init__(self, cfg: TransformerLMConfig):
        super().__init__()
        self.bands = cfg.bands
        self.tie_weights = cfg.tie_adaptive_weights
        self.tie_proj = cfg.tie_adaptive_proj
        self.dropout = cfg.adaptive_softmax_dropout
        n_clusters = len(self.bands) - 1
        self.class_proj = nn.Linear(cfg.d_model, n_clusters, bias=False) if n_clusters else None
        # Projections the softmax owns: the head's when band 0 is narrower than d_model (never
        # tied, as in fairseq), the tails' when not tied to the input projections.
        self.projections = nn.ModuleDict()
        self.words = nn.ModuleDict()
        for i, (start, end, dim) in enumerate(self.bands):
            if dim != cfg.d_model and (i == 0 or not self.tie_proj):
                self.projections[str(i)] = nn.Linear(cfg.d_model, dim, bias=False)
            if not self.tie_weights:
                self.words[str(i)] = nn.Linear(dim, end - start, bias=False)

    def reset_parameters(self) -> None:
        for module in list(self.projections.values()) + list(self.words.values()):
            nn.init.xavier_uniform_(module.weight)
        if self.class_proj is not None:
            nn.init.xavier_uniform_(self.class_proj.weight)

    def _band_logits(self, i: int, hidden: torch.Tensor, inputs: AdaptiveInput) -> torch.Tensor:
        key = str(i)
        if key in self.projections:
            hidden = self.projections[key](hidden)
        elif self.bands[i][2] != hidden.shape[-1]:  # tied tail projection: d_model -> dim
            hidden = hidden @ inputs.projections[i].weight
        if i > 0:
            hidden = F.dropout(hidden, self.dropout, self.training)
        weight = self.words[key].weight if key in self.words else inputs.embeddings[i].weight
        return F.linear(hidden, weight)

    def _head_log_probs(self, hidden: torch.Tensor, inputs: AdaptiveInput) -> torch.Tensor:
        logits = self._band_logits(0, hidden, inputs)
        if self.class_proj is not None:
            logits = torch.cat([logits, self.class_proj(hidden)], dim=-1)
        return logits.float().log_softmax(dim=-1)  # float32 even under autocast

    def nll(self, hidden: torch.Tensor, target: torch.Tensor, inputs: AdaptiveInput) -> torch.Tensor:
        """Negative log-likelihood of ``target`` (N,) given ``hidden`` (N, d_model): (N,) float32."""
        hidden = F.dropout(hidden, self.dropout, self.training)
        head = self._head_log_probs(hidden, inputs)
        head_end = self.bands[0][1]
        band = torch.zeros_like(target)
        for i, (start, _, _) in enumerate(self.bands[1:], start=1):
            band = torch.where(target >= start, torch.full_like(target, i), band)
        head_target = torch.where(band == 0, target, head_end + band - 1)
        nll = -head.gather(1, head_target.unsqueeze(1)).squeeze(1)
        for i, (start, _, _) in enumerate(self.bands[1:], start=1):
            rows = (band == i).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            tail = self._band_logits(i, hidden[rows], inputs).float().log_softmax(dim=-1)
            tail_nll = -tail.gather(1, (target[rows] - start).unsqueeze(1)).squeeze(1)
            nll = nll.index_add(0, rows, tail_nll)
        return nll

    def log_probs(self, hidden: torch.Tensor, inputs: AdaptiveInput) -> torch.Tensor:
        """Full log-distribution over the vocabulary: (N, vocab_size) float32."""
        head = self._head_log_probs(hidden, inputs)
        head_end = self.bands[0][1]
        parts = [head[:, :head_end]]
        for i in range(1, len(self.bands)):
            tail = self._band_logits(i, hidden, inputs).float().log_softmax(dim=-1)
            parts.append(head[:, head_end + i - 1:head_end + i] + tail)
        return torch.cat(parts, dim=-1)


def sinusoidal_positions(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """(length, dim) fixed positional encodings: [sin | cos] halves, geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=device, dtype=torch.float32)
                      * -(math.log(10000.0) / max(half - 1, 1)))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freqs[None]
    pos = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(pos, (0, dim - 2 * half))


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v/out projections (with biases)."""

    def __init__(self, cfg: TransformerLMConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        heads = [proj(x).view(batch, length, self.n_heads, dim // self.n_heads).transpose(1, 2)
                 for proj in (self.q_proj, self.k_proj, self.v_proj)]
        out = F.scaled_dot_product_attention(*heads, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + drop(attn(ln(x))), then x + drop(ffn(ln(x)))."""

    def __init__(self, cfg: TransformerLMConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.dropout = cfg.dropout
        self.activation_dropout = cfg.activation_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + F.dropout(self.attn(self.attn_norm(x)), self.dropout, self.training)
        h = F.dropout(F.relu(self.fc1(self.ffn_norm(x))), self.activation_dropout, self.training)
        return x + F.dropout(self.fc2(h), self.dropout, self.training)


class TransformerLM(nn.Module):
    """Causal LM: ``model(tokens, targets)`` -> per-token NLL, ``model(tokens)`` -> log-probs.

    Args:
        cfg: the hyper-parameters (:class:`TransformerLMConfig`).
    """

    def __init__(self, cfg: TransformerLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = AdaptiveInput(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model) if cfg.final_norm else None
        self.softmax = AdaptiveSoftmax(cfg)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """fairseq-style init: N(0, dim^-1/2) embeddings, Xavier-uniform linears, zero biases."""
        self.embed.reset_parameters()
        self.softmax.reset_parameters()
        for layer in self.layers:
            for lin in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj,
                        layer.attn.out_proj, layer.fc1, layer.fc2):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Last-layer states (batch, length, d_model) for ``tokens`` (batch, length)."""
        x = self.embed(tokens) * math.sqrt(self.cfg.d_model)
        x = x + sinusoidal_positions(tokens.shape[1], self.cfg.d_model, tokens.device).to(x.dtype)
        x = F.dropout(x, self.cfg.dropout, self.training)
        for layer in self.layers:
            # LayerDrop: the skip decision uses the global RNG, so it follows the run's seed.
            if self.training and self.cfg.layerdrop > 0 and float(torch.rand(())) < self.cfg.layerdrop:
                continue
            x = layer(x)
        return self.final_norm(x) if self.final_norm is not None else x

    def forward(self, tokens: torch.Tensor,
                targets: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """NLL of ``targets`` (batch, length) -> (batch, length) float32; without targets the full
        log-probabilities (batch, length, vocab_size)."""
        h = self.hidden(tokens)
        flat = h.reshape(-1, h.shape[-1])
        if targets is None:
            return self.softmax.log_probs(flat, self.embed).view(*tokens.shape, -1)
        if targets.shape != tokens.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != tokens shape {tuple(tokens.shape)}")
        return self.softmax.nll(flat, targets.reshape(-1), self.embed).view(tokens.shape)
