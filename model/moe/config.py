"""``model.moe``: settings of the mixture-of-experts MLPs (``model.mlp=moe`` or ``mh_moe``).

One router/dispatch/expert core serves both kinds (model/moe/layer.py): ``moe`` routes
tokens, ``mh_moe`` (multi-head MoE) first splits each token into ``heads`` sub-tokens of
width ``hidden_size / heads`` and routes those. Layers that are not MoE layers (see
``every``, ``offset`` and ``first_dense``) keep the dense ``swiglu`` MLP of ``model.ffn_hidden_size``.

``reference: released`` selects the released MH-MoE recipe (Wu et al. 2024, the authors'
torchscale decoder and run script) for every key in :data:`RELEASED`; docs/moe.md has the
"paper / released code / ours" table with the reason for each default of ours.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from polytron.model.configlib import ConfigError, bad, doc

MOE_KINDS = ("moe", "mh_moe")


@dataclass
class MoEConfig:
    """Mixture-of-experts settings (used when ``model.mlp`` is ``moe`` or ``mh_moe``)."""
    num_experts: int = field(default=8, metadata=doc(
        "Routed experts per MoE layer (fine-grained experts: many small ones, DeepSeekMoE)."))
    top_k: int = field(default=2, metadata=doc("Routed experts each token (sub-token for mh_moe) uses."))
    expert_ffn_hidden_size: int = field(default=0, metadata=doc(
        "Inner width of each routed (and each shared) expert's SwiGLU; 0 means model.ffn_hidden_size."))
    shared_experts: int = field(default=0, metadata=doc(
        "Always-on shared experts (DeepSeekMoE), each of expert_ffn_hidden_size, run as one SwiGLU "
        "of shared_experts x expert_ffn_hidden_size; their output is added to the routed output."))
    score: Literal["softmax", "sigmoid"] = field(default="softmax", metadata=doc(
        "Router score: softmax over experts (Switch, Mixtral) or per-expert sigmoid (DeepSeek-V3)."))
    normalize_top_k: bool = field(default=True, metadata=doc(
        "Divide the top-k scores of a token by their sum (Mixtral, DeepSeek-V3); false keeps the raw "
        "scores as combine weights."))
    route_scale: float = field(default=1.0, metadata=doc(
        "Factor on the combine weights of the routed experts (DeepSeek-V3's routed_scaling_factor)."))
    aux_loss_coeff: float = field(default=0.01, metadata=doc(
        "Load-balancing loss coefficient (Switch/GShard: num_experts x sum_i f_i P_i, f_i the "
        "fraction of assignments to expert i, P_i its mean normalized score); 0 turns it off."))
    balance_choices: Literal["all", "first"] = field(default="all", metadata=doc(
        "Which assignments f_i of the balancing loss counts: all k choices of every row "
        "(Megatron's top-k form), or first choices only (GShard; the released MH-MoE code)."))
    z_loss_coeff: float = field(default=0.0, metadata=doc(
        "Router z-loss coefficient (ST-MoE: mean of logsumexp(router logits)^2); 0 turns it off."))
    bias_update_rate: float = field(default=0.0, metadata=doc(
        "Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for the "
        "top-k choice only, moved by this rate times sign(mean load - load) after every optimizer "
        "step from the load observed over the step (all data-parallel ranks); 0 turns it off."))
    capacity_factor: float = field(default=0.0, metadata=doc(
        "Capacity-factor routing: each expert takes at most C assignments of a micro-batch in "
        "training (see capacity_rounding), first choices first, then by position; the rest are "
        "dropped (their routed output is zero). 0 means dropless."))
    capacity_rounding: Literal["assignments", "per_choice"] = field(default="assignments", metadata=doc(
        "C of N rows: assignments is ceil(capacity_factor x N x top_k / num_experts); per_choice "
        "is top_k x ceil(capacity_factor x N / num_experts) (the released MH-MoE gate)."))
    eval_capacity: Literal["dropless", "train", "fraction"] = field(default="dropless", metadata=doc(
        "Capacity of forwards outside training (evaluation, generation): dropless; train (the "
        "training capacity; the released run script); fraction (ceil(eval_capacity_fraction x N) "
        "per expert; the torchscale default)."))
    eval_capacity_fraction: float = field(default=0.25, metadata=doc(
        "With eval_capacity=fraction: each expert keeps at most this fraction of the N rows."))
    every: int = field(default=1, metadata=doc(
        "MoE in every N-th layer: layer i is an MoE layer when i >= first_dense, i >= offset and "
        "(i - offset) % every == 0 (DeepSeek-V3's moe_layer_freq); other layers keep the dense SwiGLU."))
    offset: int = field(default=0, metadata=doc(
        "The first MoE layer of the every-N pattern: offset, offset + every, ... (the released "
        "MH-MoE decoder's (i + 1) % freq == 0 is offset = every - 1)."))
    first_dense: int = field(default=0, metadata=doc(
        "The first K layers keep the dense SwiGLU (DeepSeek-V3's first_k_dense_replace)."))
    heads: int = field(default=1, metadata=doc(
        "mh_moe only: sub-tokens per token (MH-MoE heads h); hidden_size / h is the width of the "
        "router and the experts. h = 1 is the plain MoE (no split and merge projections)."))
    gemm: Literal["auto", "grouped", "batched", "looped"] = field(default="auto", metadata=doc(
        "Expert matmuls: grouped (torch grouped_mm over the expert-sorted tokens, no host sync), "
        "batched (bmm over tokens padded per expert; reads the largest expert load back to the "
        "host), looped (one matmul per expert; for benchmarks), auto (grouped where torch provides "
        "it for the device and dtype, else batched)."))
    log_expert_load: bool = field(default=True, metadata=doc(
        "Report each expert's load fraction per MoE layer (moe_load.l<i>.e<j> in metrics.jsonl and "
        "wandb; the log line shows only the per-layer moe/load_max_l<i>)."))
    reference: Literal["none", "released"] = field(default="none", metadata=doc(
        "released: the released MH-MoE recipe for every key of model.moe.RELEASED (raw-probability "
        "combine, first-choice balancing loss, capacity top_k x ceil(N / E) in training and "
        "evaluation, MoE layers at (i + 1) % every == 0, ...). A key left at its default takes the "
        "released value; a key set to a third value is refused (eval_capacity may also be fraction, "
        "torchscale's default). none: the keys as given."))

    def validate(self, model) -> None:
        """Reject settings that cannot work with the rest of ``model``."""
        if self.reference == "released":
            self._apply_released()
        for key in ("num_experts", "top_k", "every", "heads"):
            if getattr(self, key) < 1:
                raise bad(f"model.moe.{key}", getattr(self, key), "an integer >= 1")
        for key in ("expert_ffn_hidden_size", "shared_experts", "first_dense", "offset"):
            if getattr(self, key) < 0:
                raise bad(f"model.moe.{key}", getattr(self, key), "an integer >= 0")
        for key in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate", "capacity_factor"):
            if getattr(self, key) < 0:
                raise bad(f"model.moe.{key}", getattr(self, key), "a number >= 0")
        if not 0 < self.eval_capacity_fraction <= 1:
            raise bad("model.moe.eval_capacity_fraction", self.eval_capacity_fraction, "a number in (0, 1]")
        if self.route_scale <= 0:
            raise bad("model.moe.route_scale", self.route_scale, "a positive number")
        if self.top_k > self.num_experts:
            raise bad("model.moe.top_k", self.top_k, f"at most model.moe.num_experts={self.num_experts}")
        if model.mlp not in MOE_KINDS:
            return
        if self.heads > 1 and model.mlp != "mh_moe":
            raise ConfigError(f"config key 'model.moe.heads': got {self.heads}; sub-token heads need "
                              "model.mlp=mh_moe (model.mlp=moe routes whole tokens)")
        if model.hidden_size % self.heads:
            raise bad("model.moe.heads", self.heads, f"a divisor of model.hidden_size={model.hidden_size}")
        if not any(is_moe_layer(self, i) for i in range(model.num_layers)):
            raise bad("model.moe.first_dense", self.first_dense,
                      f"fewer than model.num_layers={model.num_layers} with model.moe.every={self.every} "
                      f"and offset={self.offset} (no layer would be an MoE layer)")

    def _apply_released(self) -> None:
        """``reference: released``: keys at their default take the released value; others must equal it."""
        defaults = {f.name: f.default for f in fields(self)}
        for key, value in released_values(self).items():
            got = getattr(self, key)
            if got == value or got in RELEASED_ALSO.get(key, ()):
                continue
            if got != defaults[key]:
                raise ConfigError(f"config key 'model.moe.{key}': got {_show(got)} with model.moe.reference="
                                  f"released (the released MH-MoE recipe has {_show(value)}); drop one of them")
            setattr(self, key, value)

    def eval_drops(self) -> bool:
        """Whether forwards outside training may drop assignments (eval_capacity)."""
        return self.eval_capacity == "fraction" or (self.eval_capacity == "train" and self.capacity_factor > 0)

    def ffn(self, model) -> int:
        """Inner width of one expert."""
        return self.expert_ffn_hidden_size or model.ffn_hidden_size


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


#: The released MH-MoE recipe (github.com/yushuiwx/MH-MoE: torchscale's TopkGate and
#: MOELayer, the decoder's placement, scripts/run.sh) for the keys it fixes; ``offset``
#: follows ``every`` (see :func:`released_values`). Shapes (num_experts, top_k, heads, widths,
#: every) stay the config's.
RELEASED: dict[str, Any] = {
    "score": "softmax", "normalize_top_k": False, "route_scale": 1.0, "shared_experts": 0,
    "aux_loss_coeff": 0.01, "balance_choices": "first", "z_loss_coeff": 0.0, "bias_update_rate": 0.0,
    "capacity_factor": 1.0, "capacity_rounding": "per_choice", "eval_capacity": "train",
    "first_dense": 0,
}


#: Other values the released code also has: torchscale's own default evaluation capacity
#: (a fraction of the rows; the run script passes -1, the training capacity).
RELEASED_ALSO: dict[str, tuple[Any, ...]] = {"eval_capacity": ("fraction",)}


def released_values(moe: MoEConfig) -> dict[str, Any]:
    """The released recipe's value of every key ``reference: released`` sets, for ``moe``'s every."""
    return {**RELEASED, "offset": moe.every - 1}


def is_moe_layer(moe: MoEConfig, layer_idx: int) -> bool:
    """Whether layer ``layer_idx`` is an MoE layer (the rest keep the dense SwiGLU)."""
    i = layer_idx
    return i >= moe.first_dense and i >= moe.offset and (i - moe.offset) % moe.every == 0
