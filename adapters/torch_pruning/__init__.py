"""Mix-and-Match for Torch-Pruning 1.6.1: structured pruning by a strategy, one ratio per dependency group.

A Mix-and-Match strategy says how sparse each *layer* should be (unstructured, per weight tensor).
Structured pruning removes whole channels, and Torch-Pruning's ``DependencyGraph`` couples layers
that must lose the same channels (a residual stream, a conv and its BatchNorm, ``qkv`` and ``proj``
of one attention block). This adapter translates the strategy **per dependency group**:

* **Members.** A group removes channels from the *outputs* of its producers (the Conv/Linear
  layers whose output channels it removes) and from the inputs of its consumers. Each layer's outputs
  belong to exactly one group, so the producers partition the strategy's layers.
* **Fold rule** (``fold="mean"``, the default): the group's channel ratio is the parameter-weighted
  mean of its producers' targets, ``r_G = Σ n_l ρ_l / Σ n_l`` (``n_l`` = weights of layer ``l``).
  ``fold="min"`` and ``fold="max"`` take the most protective or the most aggressive producer instead.
  Producers that the strategy does not cover (or that are ignored) count with target 0.
* **Clamp.** The kept channel count is ``round(C·(1 - r_G))``, rounded to the nearest multiple of
  ``round_to``, and never below one channel (or ``round_to`` channels, or one channel per head);
  ``max_ratio`` caps it too. Torch-Pruning would otherwise skip a group that would vanish, silently.
* **Exact hand-over.** The ratio written to the dict is ``(C - keep) / C`` nudged down by one ulp
  where needed, so Torch-Pruning's ``keep = floor(C·(1 - r))`` gives exactly ``keep``.

Public API:

* :func:`pruning_ratio_dict` -- ``{module: ratio}``, one leaf Conv/Linear key per group, for your own
  ``tp.pruner.MetaPruner``; :func:`pruner_kwargs` gives every keyword that dict needs
  (``num_heads``, ``ignored_layers``, ``customized_pruners``, ``unwrapped_parameters`` ...);
  :func:`attention_head_dims` and :func:`fix_attention` repair timm attention after your ``step()``;
  :func:`plan_groups` shows the groups and their planned ratios.
* :func:`prune` -- prunes a copy (or the model, ``inplace=True``) by :class:`TPOptions` and returns a :class:`TPResult` with the
  pruned model and a :class:`PruneReport` (parameters and MACs before/after, planned and realized
  ratio per group, importance used, consistency error).
* :func:`zeroed_reference` -- the original model with the removed channels zeroed: the pruned model's
  output must equal it (``prune(verify=True)`` checks it on ``example_inputs``).

Architecture handling for timm 1.0.31 (all found on real models; see REFERENCE section 4):

* ViT/DeiT ``Attention`` and Swin ``WindowAttention``: ``num_heads={attn.qkv: attn.num_heads}``; after
  pruning ``num_heads``, ``head_dim``, ``attn_dim`` (and ``dim``) are set from the new ``qkv``.
  timm's fused attention uses ``1/sqrt(head_dim)`` of the *current* tensor, so pruning head_dim
  would silently change the softmax temperature: the query rows of ``qkv`` are rescaled by
  ``sqrt(d'/d)`` and ``scale`` set to ``d'^-0.5``, which keeps the original logits on both paths.
* Whole-head removal (``prune_heads=True``) for ViT/DeiT; for Swin it raises (the relative-position
  bias tables are per head); head_dim pruning works for both.
* Swin ``PatchMerging``: a custom pruner (its input channels repeat 4× into ``norm`` and ``reduction``;
  ``dim``/``out_dim`` are updated); every ``relative_position_bias_table`` is ignored.
* Classifier heads are ignored, tuple heads included (DeiT-distilled ``head`` and ``head_dist``).
* Free parameters (``pos_embed``, ``cls_token``, ``dist_token``, ``reg_token``, layer-scale ``gamma``)
  are passed as ``unwrapped_parameters`` with their channel dimension, as a list of ``(param, dim)``.
* Any other module that holds heads (``num_heads``) is refused with an error naming it, unless you
  ignore it; a model whose pruned output does not match the zeroed reference is refused with an error
  naming the modules Torch-Pruning had to guess about. A silently broken model is never returned.

Modules: :mod:`.options` (:class:`TPOptions`), :mod:`.planning` (groups and ratios), :mod:`.importance`
(group importances), :mod:`.prune` (pruning and rebuilding), :mod:`.verify` (MACs, zeroed reference),
:mod:`.timm_layers` (timm support), :mod:`.report` (result types). What users need is importable from
this package; the rest from its module.
"""

from __future__ import annotations

from .options import TPOptions
from .planning import plan_groups, pruner_kwargs, pruning_ratio_dict
from .prune import from_metapruner, prune, rebuild
from .report import PruneReport, TPResult
from .timm_layers import attention_head_dims, fix_attention
from .verify import count_macs, zeroed_reference

__all__ = [
    "PruneReport", "TPOptions", "TPResult", "attention_head_dims", "count_macs", "fix_attention", "from_metapruner",
    "plan_groups", "prune",
    "pruner_kwargs", "pruning_ratio_dict", "rebuild", "zeroed_reference",
]
