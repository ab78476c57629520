"""How each model family's Hugging Face tensors map onto Megatron-Core checkpoint tensors.

A leaf shared by the converters (``repo_megatron.convert``) and weight sync: it depends only on
the architecture description (:mod:`.architecture`) and torch.

A :class:`ParamMapping` ties one Megatron checkpoint key (the ``ShardedTensor`` key, which uses
Transformer Engine names for both layer specs, e.g.
``decoder.layers.self_attention.linear_qkv.weight``) to the Hugging Face tensors it is made of,
with the pure layout transforms both ways (below). Keys under ``decoder.layers.`` are stacked
over layers in the checkpoint (global shape ``[num_layers, ...]``); their HF names hold
``{layer}``, the global layer number. Each family file in ``families/`` registers its list with
:func:`register_weight_mapping`, composed from the shared builders here.

The transforms are shape-generic (weights ``[rows, hidden]`` and biases ``[rows]`` alike) and
work on ``meta`` tensors, which the converters use to plan shapes before reading any data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import ConfigError
from ..registry import Registry
from .architecture import Architecture

LAYER_PREFIX = "decoder.layers."


# ---- pure layout transforms ---------------------------------------------------------------

def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   num_query_groups: int) -> torch.Tensor:
    """Megatron's fused QKV rows: per query group ``g``, ``[q heads of g; k_g; v_g]``.

    q: [heads * head_dim, ...], k and v: [groups * head_dim, ...] -> [(heads + 2 * groups) *
    head_dim, ...]. Grouping by query group is what lets TP split the fused tensor by rows."""
    rest = q.shape[1:]
    q = q.reshape(num_query_groups, -1, *rest)  # [groups, heads/groups * head_dim, ...]
    k = k.reshape(num_query_groups, -1, *rest)  # [groups, head_dim, ...]
    v = v.reshape(num_query_groups, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_attention_heads: int, num_query_groups: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_qkv`: (q, k, v) in Hugging Face's row order."""
    rest = qkv.shape[1:]
    q_rows = num_attention_heads // num_query_groups * head_dim
    grouped = qkv.reshape(num_query_groups, q_rows + 2 * head_dim, *rest)
    q, k, v = grouped.split([q_rows, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) of a global Megatron ``linear_fc1`` weight ``cat(gate, up)``."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def merge_tp_gate_up(shards: list[torch.Tensor]) -> torch.Tensor:
    """The global ``cat(gate, up)`` from the ``linear_fc1`` shards of TP ranks ``i``, each of
    which holds ``[gate_i; up_i]`` (what a plain row concatenation would get wrong)."""
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def pad_vocab_rows(weight: torch.Tensor, padded_vocab_size: int) -> list[torch.Tensor]:
    """``weight`` [vocab, hidden] padded with zero rows to ``padded_vocab_size``, as row pieces
    ``[weight, zeros]`` (kept apart so that the original rows are never copied)."""
    extra = padded_vocab_size - weight.shape[0]
    if extra < 0:
        raise ValueError(f"vocabulary of {weight.shape[0]} rows exceeds the padded size "
                         f"{padded_vocab_size}")
    if extra == 0:
        return [weight]
    return [weight, weight.new_zeros(extra, *weight.shape[1:])]


def truncate_vocab_rows(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The first ``vocab_size`` rows of a padded embedding / output layer (a view)."""
    return weight[:vocab_size]


# ---- the mapping and its registry ---------------------------------------------------------

@dataclass(frozen=True)
class ModelDims:
    """What transforms need besides the tensors: the architecture and the padded vocabulary
    of the Megatron side (``padded_vocab_size(vocab, divisible_by, TP)``)."""
    arch: Architecture
    padded_vocab_size: int


Shape = tuple[int, ...]


def concatenate_shards(shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The default ``merge_tp``: the TP shards concatenated along their split dimension."""
    return torch.cat(shards, dim=dim)


@dataclass(frozen=True)
class ParamMapping:
    """One Megatron checkpoint tensor and the Hugging Face tensors it is made of.

    ``to_megatron(dims, hf_tensors)`` returns row pieces whose concatenation along dim 0 is the
    Megatron tensor (of one layer, for layer keys): pieces are written as separate checkpoint
    chunks, so nothing is concatenated in memory. ``to_hf(dims, tensor)`` is the inverse.
    ``merge_tp(shards, dim)`` rebuilds the global tensor from the TP shards of a parameter.
    ``moves_rows``: both transforms only select, reorder, zero-pad or truncate whole rows (dim
    0) and accept 1-D tensors, so the converters may run them on row ids to plan byte copies
    instead of loading tensors; leave it False for anything that computes values."""
    megatron: str
    hf: tuple[str, ...]
    hf_shapes: Callable[[Architecture], tuple[Shape, ...]]
    to_megatron: Callable[[ModelDims, list[torch.Tensor]], list[torch.Tensor]]
    to_hf: Callable[[ModelDims, torch.Tensor], tuple[torch.Tensor, ...]]
    merge_tp: Callable[[list[torch.Tensor], int], torch.Tensor] = field(default=concatenate_shards)
    moves_rows: bool = False

    @property
    def per_layer(self) -> bool:
        return self.megatron.startswith(LAYER_PREFIX)

    def hf_names(self, layer: Optional[int]) -> tuple[str, ...]:
        return tuple(name.format(layer=layer) for name in self.hf)


# family name -> function(arch) -> the family's mappings
WEIGHT_MAPPINGS: Registry[Callable[[Architecture], list[ParamMapping]]] = Registry(
    "weight mapping", "family")


def register_weight_mapping(family: str):
    """Decorator: register ``fn(arch) -> list[ParamMapping]`` for a family."""
    return WEIGHT_MAPPINGS.register(family)


def mappings_for(arch: Architecture) -> list[ParamMapping]:
    """The weight mappings of ``arch``'s family; a family without one is a ConfigError."""
    if arch.family not in WEIGHT_MAPPINGS:
        raise ConfigError(f"architecture {arch.hf_architecture} (family {arch.family}) has no "
                          f"weight mapping (supported: {', '.join(WEIGHT_MAPPINGS)})")
    return WEIGHT_MAPPINGS[arch.family](arch)


# ---- shared mapping builders (Llama-derived layouts) --------------------------------------

def direct(megatron: str, hf: str, shape: Callable[[Architecture], Shape]) -> ParamMapping:
    """Same tensor on both sides."""
    return ParamMapping(megatron, (hf,), lambda a: (shape(a),),
                        to_megatron=lambda d, ts: [ts[0]], to_hf=lambda d, t: (t,),
                        moves_rows=True)


def vocab_rows(megatron: str, hf: str) -> ParamMapping:
    """Embedding / output layer: rows padded to the Megatron vocabulary, truncated on export."""
    return ParamMapping(
        megatron, (hf,), lambda a: ((a.vocab_size, a.hidden_size),),
        to_megatron=lambda d, ts: pad_vocab_rows(ts[0], d.padded_vocab_size),
        to_hf=lambda d, t: (truncate_vocab_rows(t, d.arch.vocab_size),), moves_rows=True)


def fused_qkv(megatron: str, q: str, k: str, v: str, bias: bool = False) -> ParamMapping:
    """Separate q/k/v projections <-> Megatron's per-query-group interleaved ``linear_qkv``."""
    def shapes(a: Architecture) -> tuple[Shape, ...]:
        tail = () if bias else (a.hidden_size,)
        kv = (a.num_query_groups * a.head_dim, *tail)
        return (a.num_attention_heads * a.head_dim, *tail), kv, kv

    return ParamMapping(
        megatron, (q, k, v), shapes,
        to_megatron=lambda d, ts: [interleave_qkv(*ts, d.arch.num_query_groups)],
        to_hf=lambda d, t: split_qkv(t, d.arch.num_attention_heads,
                                     d.arch.num_query_groups, d.arch.head_dim),
        moves_rows=True)


def gate_up(megatron: str, gate: str, up: str) -> ParamMapping:
    """SwiGLU gate and up projections <-> ``linear_fc1 = cat(gate, up)`` (per TP rank
    ``[gate_i; up_i]``)."""
    shape = lambda a: (a.ffn_hidden_size, a.hidden_size)  # noqa: E731
    return ParamMapping(
        megatron, (gate, up), lambda a: (shape(a), shape(a)),
        to_megatron=lambda d, ts: [ts[0], ts[1]],
        to_hf=lambda d, t: split_gate_up(t),
        merge_tp=lambda shards, dim: merge_tp_gate_up(shards), moves_rows=True)


def _hidden(a: Architecture) -> Shape:
    return (a.hidden_size,)


def embedding_and_head(arch: Architecture) -> list[ParamMapping]:
    """Word embeddings, final norm and (untied models only) the output layer."""
    out = [vocab_rows("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
           direct("decoder.final_layernorm.weight", "model.norm.weight", _hidden)]
    if not arch.tie_word_embeddings:
        out.append(vocab_rows("output_layer.weight", "lm_head.weight"))
    return out


def llama_attention(qkv_bias: bool) -> list[ParamMapping]:
    """Pre-attention norm, fused QKV (and its bias) and the output projection."""
    layer = "model.layers.{layer}."
    qkv = "decoder.layers.self_attention.linear_qkv."
    names = [layer + f"self_attn.{p}_proj." for p in "qkv"]
    out = [direct(qkv + "layer_norm_weight", layer + "input_layernorm.weight", _hidden),
           fused_qkv(qkv + "weight", *(n + "weight" for n in names))]
    if qkv_bias:
        out.append(fused_qkv(qkv + "bias", *(n + "bias" for n in names), bias=True))
    out.append(direct("decoder.layers.self_attention.linear_proj.weight",
                      layer + "self_attn.o_proj.weight",
                      lambda a: (a.hidden_size, a.num_attention_heads * a.head_dim)))
    return out


def qk_layernorm() -> list[ParamMapping]:
    """Per-head RMSNorm of queries and keys (Qwen3)."""
    head = lambda a: (a.head_dim,)  # noqa: E731
    return [direct(f"decoder.layers.self_attention.{p}_layernorm.weight",
                   f"model.layers.{{layer}}.self_attn.{p}_norm.weight", head) for p in "qk"]


def llama_mlp() -> list[ParamMapping]:
    """Pre-MLP norm, SwiGLU fc1 (gate, up) and fc2 (down)."""
    layer = "model.layers.{layer}."
    return [direct("decoder.layers.mlp.linear_fc1.layer_norm_weight",
                   layer + "post_attention_layernorm.weight", _hidden),
            gate_up("decoder.layers.mlp.linear_fc1.weight", layer + "mlp.gate_proj.weight",
                    layer + "mlp.up_proj.weight"),
            direct("decoder.layers.mlp.linear_fc2.weight", layer + "mlp.down_proj.weight",
                   lambda a: (a.hidden_size, a.ffn_hidden_size))]


# Modules GPTModel builds from Megatron's own classes under either layer spec: the embedding
# (VocabParallelEmbedding) and the output ColumnParallelLinear, whose ``_extra_state`` GPTModel
# drops from its sharded state dict. They hold no ``_extra_state`` in a checkpoint.
MEGATRON_ONLY_MODULES = ("embedding.word_embeddings", "output_layer")


def extra_state_keys(mappings: list[ParamMapping]) -> list[str]:
    """The ``_extra_state`` objects (``ShardedObject`` keys) of a model built with the
    Transformer Engine layer spec: one for every module that holds mapped weights, except the
    embedding and output layer. Under that spec every such module is a TE module that
    checkpoints its FP8 metadata as ``_extra_state``: the linears, Qwen3's ``q_layernorm`` /
    ``k_layernorm`` (``TENorm``), and ``decoder.final_layernorm``, which megatron-core builds
    as ``TENorm`` whenever TE imports, whatever the layer spec (``transformer_block.py``).
    The local spec saves ``None`` for its linears and nothing for its norms."""
    modules = {m.megatron.rsplit(".", 1)[0] for m in mappings}
    return sorted(f"{mod}._extra_state" for mod in modules if mod not in MEGATRON_ONLY_MODULES)


def tensor_order(mappings: list[ParamMapping], num_layers: int
                 ) -> list[tuple[ParamMapping, Optional[int]]]:
    """(mapping, layer) pairs in Hugging Face's file order: embeddings, layers 0..L-1, then
    the final norm and output layer."""
    first = [(m, None) for m in mappings if m.megatron.startswith("embedding.")]
    layers = [(m, layer) for layer in range(num_layers) for m in mappings if m.per_layer]
    last = [(m, None) for m in mappings
            if not m.per_layer and not m.megatron.startswith("embedding.")]
    return first + layers + last


def megatron_piece_shapes(mapping: ParamMapping, dims: ModelDims, dtype: torch.dtype
                          ) -> list[Shape]:
    """Shapes of the row pieces ``mapping.to_megatron`` makes from the family's HF shapes (one
    layer's, for layer keys). A mapping that only moves rows runs on row ids (its transforms
    are shape-generic); others on meta tensors, whose Python kernels import ``torch._dynamo``
    (4 s from a cold page cache, so the converters avoid them where they can)."""
    shapes = mapping.hf_shapes(dims.arch)
    rests = {tuple(s[1:]) for s in shapes}
    if mapping.moves_rows and len(rests) == 1:
        (rest,) = rests
        pieces = mapping.to_megatron(dims, [torch.arange(s[0]) for s in shapes])
        return [(p.shape[0], *rest) for p in pieces]
    metas = [torch.empty(s, dtype=dtype, device="meta") for s in shapes]
    return [tuple(p.shape) for p in mapping.to_megatron(dims, metas)]


def megatron_shape(mapping: ParamMapping, dims: ModelDims, dtype: torch.dtype) -> Shape:
    """Shape of ``mapping``'s Megatron tensor (one layer's, for layer keys): its pieces
    (:func:`megatron_piece_shapes`) stacked by rows."""
    return stacked_shape(megatron_piece_shapes(mapping, dims, dtype))


def stacked_shape(pieces: list[Shape]) -> Shape:
    """The shape of row pieces concatenated along dim 0."""
    return (sum(p[0] for p in pieces), *pieces[0][1:])
