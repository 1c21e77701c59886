"""`model.name=gpt`: a small decoder-only transformer (GPT-2's layout, as nanoGPT trains it) for token data.

Pre-norm blocks of causal self-attention and a 4x MLP, learned positions, the LM head tied to the token
embedding, GPT-2's initialisation. `forward(idx)` maps token ids [B, T] to logits [B, T, vocab] at every
position, which is what a next-token loss over every position of a window needs. The blocks are a ModuleList
of `Block`s: each is one unit a sharding strategy can wrap on its own.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.errors import ConfigError, DTrainError

KWARGS = ("n_layer", "n_head", "n_embd", "dropout", "bias", "block_size")
"""What model.kwargs may set for model.name=gpt (the vocabulary and the data's block size come from the data)."""

INIT_STD = 0.02
"""GPT-2's standard deviation for every weight matrix and embedding."""


class LayerNorm(nn.Module):
    """LayerNorm whose bias can be left out (torch's own has it or not only as of 2.1's `bias=`)."""

    def __init__(self, width: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # [B, T, 3C] -> three [B, heads, T, C/heads]
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = LayerNorm(n_embd, bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.vocab_size, self.block_size = vocab_size, block_size
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = LayerNorm(n_embd, bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        # Tied: one matrix both reads tokens in and scores them out (GPT-2's choice; fewer parameters).
        self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2: N(0, 0.02) everywhere, zero biases; the projections into the residual stream at
        # 0.02/sqrt(2 * n_layer), since 2 * n_layer of them add up along it.
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, 0.0, INIT_STD)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.Embedding):
                    nn.init.normal_(module.weight, 0.0, INIT_STD)
            for block in self.blocks:
                for proj in self.residual_projections(block):
                    nn.init.normal_(proj.weight, 0.0, INIT_STD / math.sqrt(2 * self.n_layer))

    @staticmethod
    def residual_projections(block: Block) -> tuple[nn.Linear, nn.Linear]:
        """The two layers of a block that write into the residual stream."""
        return block.attn.proj, block.mlp.proj

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] (T <= block_size) -> logits [B, T, vocab_size]."""
        if idx.is_floating_point() or idx.dim() != 2:
            raise DTrainError(f"model.name=gpt takes token ids, integers [batch, T]; it was given {idx.dtype} inputs "
                              f"{tuple(idx.shape)} (token data: data.name=tokens)")
        T = idx.shape[1]
        if T > self.block_size:
            raise DTrainError(f"the GPT was given {T} tokens per sequence; its block_size is {self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, each tied one once; without the position table by default (it does no multiply-adds)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per token at the full block_size (PaLM's estimate, as nanoGPT's estimate_mfu uses it):
        6 per parameter (forward 2, backward 4) plus the attention's 12 * layers * heads * head width * T."""
        head = self.n_embd // self.n_head
        return 6 * self.num_params() + 12 * self.n_layer * self.n_head * head * self.block_size


def _int_kwarg(kwargs: dict[str, Any], key: str, default: int) -> int:
    value = kwargs.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.kwargs.{key}", value, "a whole number >= 1")
    return value


def build_gpt(input_shape: Optional[Sequence[int]], num_classes: Optional[int], kwargs: dict[str, Any]) -> GPT:
    """model.name=gpt from the data's (block_size,) inputs and vocabulary, with model.kwargs checked."""
    unknown = sorted(set(kwargs) - set(KWARGS))
    if unknown:
        raise ConfigError("model.kwargs", dict(kwargs), f"{', '.join(KWARGS)} with model.name=gpt "
                                                        f"(not {', '.join(unknown)})")
    if input_shape is None or len(input_shape) != 1 or num_classes is None:
        got = "no input shape" if input_shape is None else f"inputs of shape {tuple(input_shape)}"
        raise DTrainError(f"config key 'model.name' has value 'gpt'; allowed: token data (inputs [batch, T] of "
                          f"token ids and a vocabulary size, e.g. data.name=tokens), got {got}"
                          + ("" if num_classes is not None else " and no vocabulary size"))
    n_layer = _int_kwarg(kwargs, "n_layer", 4)
    n_head = _int_kwarg(kwargs, "n_head", 4)
    n_embd = _int_kwarg(kwargs, "n_embd", 128)
    if n_embd % n_head:
        raise ConfigError("model.kwargs.n_embd", n_embd, f"a multiple of model.kwargs.n_head ({n_head})")
    dropout = kwargs.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError("model.kwargs.dropout", dropout, "a number in [0, 1)")
    bias = kwargs.get("bias", True)
    if not isinstance(bias, bool):
        raise ConfigError("model.kwargs.bias", bias, "true | false")
    data_block = int(input_shape[0])
    block_size = _int_kwarg(kwargs, "block_size", data_block)
    if block_size < data_block:
        raise ConfigError("model.kwargs.block_size", block_size,
                          f"at least the data's block size (data.block_size={data_block}): the model's position "
                          "table must cover every position of a window; unset, it is the data's")
    return GPT(int(num_classes), block_size, n_layer, n_head, n_embd, float(dropout), bias)
