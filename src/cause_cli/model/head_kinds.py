"""The segmentation heads a run may name (``--head``, config.HEADS), each in one registry
entry (:data:`HEAD_KINDS`): how it is built, and what the rest of the toolkit needs to know of
it. Both heads map backbone tokens ``[B, P, D]`` to features ``[B, P, r]`` (METHOD.md
section 2); a linear layer on the token axis is the reference's 1x1 convolution.

A new head is a module registered here with :class:`HeadKind`, its name added to config.HEADS
(which the configuration checks names against); what it saves is its state dict, in the run's
head.safetensors (cause_cli/trained.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..registry import Registry
from .ops import nearest_code, take_tokens


@dataclass(frozen=True)
class HeadKind:
    """A head the configuration may name: ``build(dim, reduced_dim, tokens_per_image, dropout)``
    makes it; ``per_token``, it maps each token on its own (so that sampling tokens commutes
    with it, and step two decodes only the sampled ones); ``reads_clusterbook``, it reads step
    one's clusterbook, which is kept in its own file (not with the head) and set on the head
    once loaded."""

    build: Callable[[int, int, int | None, float], nn.Module]
    per_token: bool
    reads_clusterbook: bool = False


HEAD_KINDS: Registry[HeadKind] = Registry("head")


class DualProjection(nn.Module):
    """``W1 x + W3 relu(W2 x)``: ``[..., D] -> [..., r]``, the last stage of both heads.

    With an input dropout, it is drawn separately for each branch, as the reference does.
    """

    def __init__(self, dim: int, reduced_dim: int) -> None:
        super().__init__()
        self.linear_branch = nn.Linear(dim, reduced_dim)
        self.mlp_branch = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, reduced_dim))

    def forward(self, tokens: torch.Tensor, dropout: nn.Module | None = None) -> torch.Tensor:
        drop = dropout if dropout is not None else nn.Identity()
        return self.linear_branch(drop(tokens)) + self.mlp_branch(drop(tokens))


class MLPHead(nn.Module):
    """CAUSE-MLP head ``h(x) = W1 x + W3 relu(W2 x)``: ``[B, P, D] -> [B, P, r]``.

    During training, dropout acts on the input features.
    """

    def __init__(self, dim: int, reduced_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = DualProjection(dim, reduced_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        tokens: torch.Tensor,
        use_dropout: bool = False,
        positions: torch.Tensor | None = None,
        token_codes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The features of every token, or of the tokens at ``positions [B, S]`` (each token
        on its own: the others are not read). ``token_codes`` is for the TR head's signature."""
        if positions is not None:
            tokens = take_tokens(tokens, positions)
        return self.projection(tokens, self.dropout if use_dropout else None)


def _mlp_head(dim: int, reduced_dim: int, num_queries: int | None, dropout: float) -> nn.Module:
    return MLPHead(dim, reduced_dim, dropout)


HEAD_KINDS.add("mlp", HeadKind(_mlp_head, per_token=True))


class TRHead(nn.Module):
    """CAUSE-TR head (METHOD.md section 2): ``[B, P, D] -> [B, P, r]``.

    Queries are the backbone tokens vector-quantised by the clusterbook. One post-norm decoder
    layer: single-head self-attention on the queries plus learned positions, single-head
    cross-attention to the backbone tokens, a ReLU FFN of width ``hidden_dim``; then the
    backbone tokens are added back (``F + LayerNorm(tgt)``) and projected like the MLP head.
    Dropout inside the layer follows ``train()``; ``use_dropout`` adds the input dropout of
    the final projection.
    """

    def __init__(
        self, dim: int, reduced_dim: int, num_queries: int, hidden_dim: int = 2048, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.query_pos = nn.Parameter(torch.randn(num_queries, dim))
        self.self_attn = nn.MultiheadAttention(dim, 1, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, 1, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ffn_dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.projection = DualProjection(dim, reduced_dim)
        self.dropout = nn.Dropout(dropout)
        # The clusterbook is step one's result, not a parameter of this head: not saved with it.
        self.register_buffer("clusterbook", torch.zeros(0, dim), persistent=False)

    def set_clusterbook(self, clusterbook: torch.Tensor) -> None:
        self.clusterbook = clusterbook.detach().to(self.query_pos.device, self.query_pos.dtype)

    def decode(
        self,
        tokens: torch.Tensor,
        attention_weights: bool = True,
        positions: torch.Tensor | None = None,
        token_codes: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Every intermediate of the decoder layer, for inspection and tests. Without
        ``attention_weights`` the attention runs fused (``scaled_dot_product_attention``: flash
        or memory-efficient kernels on GPUs) and the weights come back as None.

        With ``positions [B, S]``, only the queries at those positions are decoded: every
        query still attends to all the queries and tokens, and everything after the
        attention acts on each query alone, so the result is those rows of the full decoding
        (at a fraction of its cost when S is a sixteenth of P, as in training).
        ``token_codes [B, P]``, the nearest clusterbook code of every token, saves finding
        them again when the caller has them."""
        if self.clusterbook.shape[0] == 0:
            raise RuntimeError("TRHead needs its clusterbook: call set_clusterbook first")
        if tokens.shape[1] != self.query_pos.shape[0]:
            raise ValueError(f"TRHead was built for {self.query_pos.shape[0]} tokens per image, got {tokens.shape[1]}")
        if token_codes is None:
            token_codes = nearest_code(tokens, self.clusterbook)
        queries = self.clusterbook[token_codes]
        with_pos = queries + self.query_pos
        asking_pos: torch.Tensor
        if positions is None:
            asking, asking_queries, asking_pos, own_tokens = with_pos, queries, self.query_pos, tokens
        else:
            asking, asking_queries = take_tokens(with_pos, positions), take_tokens(queries, positions)
            asking_pos, own_tokens = self.query_pos[positions.to(tokens.device)], take_tokens(tokens, positions)
        self_out, self_weights = self.self_attn(asking, with_pos, queries, need_weights=attention_weights)
        norm1_out = self.norm1(asking_queries + self.dropout1(self_out))
        cross_out, cross_weights = self.cross_attn(
            norm1_out + asking_pos, tokens, tokens, need_weights=attention_weights
        )
        norm2_out = self.norm2(norm1_out + self.dropout2(cross_out))
        linear2_out = self.linear2(self.ffn_dropout(torch.relu(self.linear1(norm2_out))))
        norm3_out = self.norm3(norm2_out + self.dropout3(linear2_out))
        return {
            "self_attn_out": self_out,
            "self_attn_weights": self_weights,
            "norm1_out": norm1_out,
            "cross_attn_out": cross_out,
            "cross_attn_weights": cross_weights,
            "norm2_out": norm2_out,
            "linear2_out": linear2_out,
            "norm3_out": norm3_out,
            "output": own_tokens + norm3_out,
        }

    def forward(
        self,
        tokens: torch.Tensor,
        use_dropout: bool = False,
        positions: torch.Tensor | None = None,
        token_codes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The features of every token, or of the tokens at ``positions [B, S]`` (see :meth:`decode`)."""
        decoded = self.decode(tokens, False, positions, token_codes)["output"]
        assert decoded is not None
        return self.projection(decoded, self.dropout if use_dropout else None)


def _tr_head(dim: int, reduced_dim: int, num_queries: int | None, dropout: float) -> nn.Module:
    if num_queries is None:
        raise ValueError("the TR head needs the number of tokens per image")
    return TRHead(dim, reduced_dim, num_queries, dropout=dropout)


HEAD_KINDS.add("tr", HeadKind(_tr_head, per_token=False, reads_clusterbook=True))


def build_head(kind: str, dim: int, reduced_dim: int, num_queries: int | None, dropout: float) -> nn.Module:
    """A segmentation head of a registered ``kind`` (the TR head needs the tokens per image)."""
    return HEAD_KINDS[kind].build(dim, reduced_dim, num_queries, dropout)
