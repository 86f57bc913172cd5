"""Structural folds: an input-side IA3 scale moved, exactly, onto the rows of the layer producing that input.

An input-scaled ("feed-forward") module ``C`` computes ``C(u * l)``. When ``u`` is a linear function of another
module ``P``'s output rows, scaling those rows of ``P`` by ``l`` gives the same ``u * l`` — and an output-side
scale folds exactly into quantization statistics, where an input-side one would need requantization:

- ``gated``: ``down(act(gate(x)) * up(x))``: scale ``up``'s rows (any sign);
- ``attention``: an attention output projection's input is, per head, probabilities times V: scale the V
  projection's rows, per KV head (under grouped-query attention only when the scale is identical across the
  query heads sharing a KV head); for a fused QKV projection, its V rows;
- ``activation``: ``fc2(act(fc1(x)))`` with ``act`` positively homogeneous (ReLU): scale ``fc1``'s rows and bias,
  only when every factor is >= 0. GELU/SiLU MLPs are not foldable.

``find_fold`` applies the registry to one module and returns a ``Fold`` or the reason there is none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Activations with act(c * z) == c * act(z) for every c >= 0.
POSITIVELY_HOMOGENEOUS = {"relu", "leaky_relu"}
ACTIVATION_KEYS = ("activation_function", "hidden_act", "dense_act_fn", "hidden_activation")


@dataclass(frozen=True)
class Rule:
    """One consumer -> producer relation of an architecture (suffixes matched at a dot boundary)."""

    consumer: str
    producer: str
    kind: str  # "gated" | "attention" | "activation"
    gate: str | None = None  # gated MLP: the gate projection (its activation multiplies the producer's output)
    part: str = "all"  # "all", "second-half" (fused gate_up: up is the second half), "last-v" (fused QKV, V
    # last) or "falcon-qkv" (Falcon's fused QKV in its three layouts)


_GATED_LLAMA = (Rule("mlp.down_proj", "mlp.up_proj", "gated", gate="mlp.gate_proj"),
                Rule("self_attn.o_proj", "self_attn.v_proj", "attention"))
_BERT = (Rule("attention.output.dense", "attention.self.value", "attention"),
         Rule("output.dense", "intermediate.dense", "activation"))
_T5 = (Rule("DenseReluDense.wo", "DenseReluDense.wi_1", "gated", gate="DenseReluDense.wi_0"),
       Rule("DenseReluDense.wo", "DenseReluDense.wi", "activation"),
       Rule("SelfAttention.o", "SelfAttention.v", "attention"),
       Rule("EncDecAttention.o", "EncDecAttention.v", "attention"))

RULES: dict[str, tuple[Rule, ...]] = {
    "llama": _GATED_LLAMA,
    "mistral": _GATED_LLAMA,
    "qwen2": _GATED_LLAMA,
    "qwen3": _GATED_LLAMA,
    "gemma": _GATED_LLAMA,
    "gemma2": _GATED_LLAMA,
    "gemma3_text": _GATED_LLAMA,
    "phi3": (Rule("mlp.down_proj", "mlp.gate_up_proj", "gated", part="second-half"),
             Rule("self_attn.o_proj", "self_attn.qkv_proj", "attention", part="last-v")),
    "opt": (Rule("fc2", "fc1", "activation"), Rule("self_attn.out_proj", "self_attn.v_proj", "attention")),
    "phi": (Rule("mlp.fc2", "mlp.fc1", "activation"), Rule("self_attn.dense", "self_attn.v_proj", "attention")),
    "falcon": (Rule("mlp.dense_4h_to_h", "mlp.dense_h_to_4h", "activation"),
               Rule("self_attention.dense", "self_attention.query_key_value", "attention", part="falcon-qkv")),
    "gpt2": (Rule("mlp.c_proj", "mlp.c_fc", "activation"), Rule("attn.c_proj", "attn.c_attn", "attention",
                                                                part="last-v")),
    "bert": _BERT,
    "roberta": _BERT,
    "t5": _T5,
    "mt5": _T5,
}


def fold_partners(model_type: str | None, consumer: str) -> list[str]:
    """Every module a fold of ``consumer`` could involve (producers and gates of the rules naming it)."""
    partners = []
    for rule in RULES.get(model_type or "", ()):
        if consumer == rule.consumer or consumer.endswith("." + rule.consumer):
            prefix = consumer[: len(consumer) - len(rule.consumer)]
            partners += [prefix + rule.producer] + ([prefix + rule.gate] if rule.gate else [])
    return partners


@dataclass
class Fold:
    """An accepted fold: ``vector[i]`` scales row ``index[i]`` of ``producer`` instead of ``consumer``'s input.
    For attention, ``index`` lists the V rows KV head by KV head (whatever the fused layout)."""

    consumer: str
    producer: str
    kind: str
    index: torch.Tensor
    vector: torch.Tensor
    gate: str | None = None
    part: str = "all"
    activation: str | None = None
    heads: tuple[int, int, int] | None = None  # (query heads, kv heads, head dim) for attention


def _activation(config: Any) -> str | None:
    for key in ACTIVATION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, str):
            return value
    return None


def _is_gated_t5(config: Any) -> bool:
    return str(getattr(config, "feed_forward_proj", "")).startswith("gated-")


def find_fold(model_type: str | None, config: Any, consumer: str, vector: torch.Tensor,
              out_features: dict[str, int]) -> Fold | str:
    """The fold for the input-scaled module ``consumer`` (``vector``: its flattened scale), or why there is none
    (an empty reason: the module is no consumer in this architecture).

    ``out_features`` maps each Linear of the base to its number of output rows (to locate fused parts and
    check that the producer exists).
    """
    rules = sorted(RULES.get(model_type or "", ()), key=lambda r: -len(r.consumer))
    matching = [r for r in rules if consumer == r.consumer or consumer.endswith("." + r.consumer)]
    if model_type in ("t5", "mt5"):
        wanted = "gated" if _is_gated_t5(config) else "activation"
        matching = [r for r in matching if not r.consumer.startswith("DenseReluDense") or r.kind == wanted]
    if not rules:
        return f"no fold rules for {model_type or 'unknown'} models yet"
    if not matching:
        return ""  # not the consumer of any known fold
    rule = matching[0]
    prefix = consumer[: len(consumer) - len(rule.consumer)]
    producer = prefix + rule.producer
    if producer not in out_features:
        return f"its producer {producer} is not a Linear of the base"
    total = out_features[producer]
    n = vector.numel()
    if rule.kind == "activation":
        act = _activation(config)
        if act not in POSITIVELY_HOMOGENEOUS:
            return f"activation {act} is not positively homogeneous, act(l*z) != l*act(z)"
        if (vector < 0).any():
            return f"{int((vector < 0).sum())} negative scale(s): ReLU does not commute with a sign flip"
        return Fold(consumer, producer, "activation", torch.arange(total), vector, activation=act)
    if rule.kind == "gated":
        start = total - n if rule.part == "second-half" else 0
        if (rule.part == "second-half" and total != 2 * n) or (rule.part == "all" and total != n):
            return f"producer {producer} has {total} rows, which do not match {n} scales"
        gate = prefix + rule.gate if rule.gate else None
        if gate is not None and gate not in out_features:
            return f"its gate {gate} is not a Linear of the base"
        return Fold(consumer, producer, "gated", torch.arange(start, start + n), vector, gate=gate, part=rule.part,
                    activation=_activation(config))
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None)
    if not heads or n % heads:
        return "the number of attention heads is unknown or does not divide the input"
    head_dim = n // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if rule.part == "falcon-qkv":
        layout = _falcon_v_rows(config, heads, head_dim, total)
        if isinstance(layout, str):
            return layout
        index, kv_heads = layout
    else:
        v_rows = kv_heads * head_dim
        if rule.part == "last-v":
            index = torch.arange(total - v_rows, total)
        elif total != v_rows:
            return f"producer {producer} has {total} rows, not {kv_heads} KV heads of {head_dim}"
        else:
            index = torch.arange(v_rows)
    group = heads // kv_heads
    grouped = vector.reshape(kv_heads, group, head_dim)
    if group > 1 and not torch.equal(grouped, grouped[:, :1, :].expand_as(grouped)):
        return (f"scales differ between the {group} query heads sharing a KV head (grouped-query attention): "
                "no single V row can carry them")
    return Fold(consumer, producer, "attention", index, grouped[:, 0, :].reshape(-1).clone(), part=rule.part,
                heads=(heads, kv_heads, head_dim))


def _falcon_v_rows(config: Any, heads: int, head_dim: int, total: int) -> tuple[torch.Tensor, int] | str:
    """Falcon's V rows in its fused query_key_value, KV head by KV head, and the number of KV heads:
    new architecture: per KV group [q..., k, v]; multi-query: [all q, k, v]; else per head [q, k, v]."""
    if getattr(config, "new_decoder_architecture", False):
        kv = getattr(config, "num_kv_heads", None) or heads
        width = (heads // kv + 2) * head_dim
        starts = torch.arange(kv) * width + width - head_dim
    elif getattr(config, "multi_query", False):
        kv, starts = 1, torch.tensor([total - head_dim])
    else:
        kv, starts = heads, torch.arange(heads) * 3 * head_dim + 2 * head_dim
    index = (starts[:, None] + torch.arange(head_dim)).reshape(-1)
    if int(index.max()) >= total:
        return f"the fused query_key_value has {total} rows, which does not fit Falcon's layout"
    return index, kv
