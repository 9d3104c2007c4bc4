"""``model.dha``: settings of decoupled-head attention (``model.attention=dha``).

Every layer has its own number of key heads and of value heads, and its own maps
from query heads to key heads and to value heads (the two independent). The lists
have one entry per layer; ``tools/convert_mha_to_dha.py`` writes them. Left empty,
a layer has ``model.num_kv_heads`` key and value heads in contiguous GQA blocks, so
MHA and GQA are special cases.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from polytron.model.configlib import ConfigError, bad, doc


@dataclass(frozen=True)
class LayerHeads:
    """The resolved head layout of one DHA layer."""
    key_heads: int
    value_heads: int
    key_map: tuple[int, ...]      # query head -> key head, len num_heads
    value_map: tuple[int, ...]    # query head -> value head, len num_heads


@dataclass
class DHAConfig:
    """Decoupled-head attention settings (used when ``model.attention=dha``)."""
    key_heads: list[int] = field(default_factory=list, metadata=doc(
        "Key heads of each layer (one entry per layer); [] means model.num_kv_heads in every layer."))
    value_heads: list[int] = field(default_factory=list, metadata=doc(
        "Value heads of each layer (one entry per layer), independent of key_heads; [] means "
        "model.num_kv_heads in every layer."))
    key_map: list[list[int]] = field(default_factory=list, metadata=doc(
        "Per layer, the key head (0-based) each of the model.num_heads query heads reads; [] (for "
        "the model or for one layer) means contiguous blocks: query head h reads key head "
        "h * key_heads // num_heads, which needs key_heads to divide num_heads."))
    value_map: list[list[int]] = field(default_factory=list, metadata=doc(
        "Per layer, the value head each query head reads, independent of key_map; [] as for key_map."))

    def validate(self, model) -> None:
        """Reject settings that cannot work with the rest of ``model``."""
        used = any((self.key_heads, self.value_heads, self.key_map, self.value_map))
        if model.attention != "dha":
            if used:
                raise ConfigError(f"config key 'model.dha' is set but model.attention={model.attention!r}; "
                                  "set model.attention=dha (and model.arch=dha) to use it")
            return
        for key in ("key_heads", "value_heads", "key_map", "value_map"):
            value = getattr(self, key)
            if value and len(value) != model.num_layers:
                raise bad(f"model.dha.{key}", value, f"one entry per layer (model.num_layers={model.num_layers}) or []")
        for i in range(model.num_layers):
            layer_heads(model, i)          # raises ConfigError naming the entry


def _count(model, key: str, i: int) -> int:
    values = getattr(model.dha, key)
    n = values[i] if values else model.num_kv_heads
    if not 1 <= n <= model.num_heads:
        raise bad(f"model.dha.{key}[{i}]", n, f"an integer in [1, model.num_heads={model.num_heads}]")
    return n


def _map(model, kind: str, i: int, heads: int) -> tuple[int, ...]:
    maps = getattr(model.dha, f"{kind}_map")
    explicit: Optional[list[int]] = maps[i] if maps and maps[i] else None
    key = f"model.dha.{kind}_map[{i}]"
    if explicit is None:
        if model.num_heads % heads:
            raise bad(f"model.dha.{kind}_heads[{i}]", heads,
                      f"a divisor of model.num_heads={model.num_heads}, unless {key} lists the "
                      f"{kind} head of every query head")
        return tuple(h * heads // model.num_heads for h in range(model.num_heads))
    if len(explicit) != model.num_heads:
        raise bad(key, explicit, f"{model.num_heads} entries (one per query head) or []")
    if any(not 0 <= g < heads for g in explicit):
        raise bad(key, explicit, f"{kind} heads in [0, {heads}) (model.dha.{kind}_heads[{i}]={heads})")
    unread = sorted(set(range(heads)) - set(explicit))
    if unread:
        raise bad(key, explicit, f"a map that every {kind} head is read through ({kind} head "
                                 f"{unread[0]} is read by no query head and would be cached for nothing)")
    return tuple(explicit)


def layer_heads(model, i: int) -> LayerHeads:
    """Key/value head counts and query maps of layer ``i`` of ``model`` (a ModelConfig);
    a ConfigError names the bad entry."""
    k, v = _count(model, "key_heads", i), _count(model, "value_heads", i)
    return LayerHeads(k, v, _map(model, "key", i, k), _map(model, "value", i, v))
