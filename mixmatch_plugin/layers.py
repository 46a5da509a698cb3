"""The layer inventory: every prunable weight tensor of a model, with its role, stage and size.

Plain data in, plain data out: :func:`inventory` walks ``model.named_modules()`` once and returns a
list of frozen :class:`Layer` records. Roles and stages come from the rules in ``rules/roles.yaml``
(see :mod:`mixmatch_plugin.rules`), so the logic is data a user can read and override.

A weight shared by several modules (tied embeddings, reused blocks) is listed once, under the first
name that owns it; the others are kept in :attr:`Layer.aliases` and never pruned twice.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import MixMatchError
from .rules import RoleRules, load_role_rules

logger = logging.getLogger(__name__)
_REPORTED: set[str] = set()

_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                                             *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
_CONV_TYPES = (nn.modules.conv._ConvNd,)


@dataclass(frozen=True)
class Layer:
    """One prunable weight tensor (``<name>.weight``).

    Attributes:
        name: qualified module name, as in ``model.get_submodule(name)``.
        type: the module's class name (``Conv2d``, ``Linear``, ``LayerNorm`` ...).
        kind: ``conv``, ``linear``, ``norm``, ``embedding`` or ``other``.
        role: one of the roles in ``rules/roles.yaml`` (``norm``, ``stem``, ``attn_qkv`` ...).
        stage: depth position: the stage index for staged models (ResNet ``layer1`` is 0), the block
            index for ViTs, 0 for stems and the last stage for heads.
        params: number of elements of the weight tensor.
        shape: the weight tensor's shape.
        position: order in the model, 0.0 for the first layer and 1.0 for the last.
        groups: the conv ``groups`` (1 for anything else).
        aliases: other module names that share this very weight tensor.
    """

    name: str
    type: str
    kind: str
    role: str
    stage: int
    params: int
    shape: tuple[int, ...]
    position: float
    groups: int = 1
    aliases: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape), "aliases": list(self.aliases)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layer:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**{**fields, "shape": tuple(fields.get("shape", ())), "aliases": tuple(fields.get("aliases", ()))})


def _kind(module: nn.Module) -> str:
    if isinstance(module, _NORM_TYPES):
        return "norm"
    if isinstance(module, _CONV_TYPES):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    return "other"


def _role(name: str, kind: str, module: nn.Module, rules: RoleRules) -> str:
    groups = getattr(module, "groups", 1)
    depthwise = kind == "conv" and groups > 1 and groups == getattr(module, "in_channels", -1)
    return next((r.role for r in rules.rules if (r.kind is None or kind in r.kind) and (r.depthwise is None or r.depthwise == depthwise)
                 and (r.name is None or r.name.search(name) is not None)), "other")


def _stages(names: list[str], roles: list[str], rules: RoleRules) -> list[int]:
    raw = [next((int(m.group(1)) + sp.offset for sp in rules.stages if (m := sp.pattern.search(n))), None) for n in names]
    if all(s is None for s in raw):
        # No staged structure known: the index of the top-level child is the depth position.
        tops: dict[str, int] = {}
        return [tops.setdefault(n.split(".")[0], len(tops)) for n in names]
    last = max(s for s in raw if s is not None)
    out, prev = [], 0
    for st, role in zip(raw, roles, strict=True):
        if st is None:
            st = 0 if role in ("stem", "embedding") else last if role == "head" else prev
        out.append(st)
        prev = st
    return out


def inventory(
    model: nn.Module,
    *,
    roles: Mapping[str, str] | None = None,
    role_rules: str | Path | RoleRules | None = None,
) -> list[Layer]:
    """List every prunable weight tensor of ``model``.

    Args:
        model: any ``torch.nn.Module``. It is only read.
        roles: overrides, ``{regex: role}``; a layer whose name matches a regex (``re.search``) gets
            that role before any rule is tried. A regex that matches no layer is an error.
        role_rules: a replacement for the shipped ``roles.yaml`` (path or parsed :class:`RoleRules`).

    Returns:
        The layers in module-registration order. Conv, Linear, Embedding and normalization modules
        with a ``weight`` parameter are included; other modules with a weight of two or more
        dimensions are included with kind ``other``; weights that are not a module's ``weight``
        (``nn.MultiheadAttention.in_proj_weight``, ``pos_embed``) are not prunable here and logged.
    """
    rr = role_rules if isinstance(role_rules, RoleRules) else load_role_rules(role_rules)
    overrides: list[tuple[re.Pattern[str], str, str]] = []
    for pattern, role in (roles or {}).items():
        if role not in rr.roles:
            raise MixMatchError(f"role override {pattern!r}={role!r}: unknown role; roles are {', '.join(rr.roles)}")
        try:
            overrides.append((re.compile(pattern), role, pattern))
        except re.error as exc:
            raise MixMatchError(f"role override {pattern!r} is not a valid regular expression ({exc})") from None

    seen: dict[int, int] = {}
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        w = getattr(module, "weight_orig", None)  # reparametrized by torch.nn.utils.prune
        w = w if w is not None else getattr(module, "weight", None)
        if not isinstance(w, nn.Parameter):
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() >= 2:
                    skipped.append(f"{name}.{pname}" if name else pname)
            continue
        if (kind := _kind(module)) == "other" and w.dim() < 2:
            continue
        if id(w) in seen:
            rows[seen[id(w)]]["aliases"].append(name)
            logger.info("%s shares its weight with %s: counted once", name, rows[seen[id(w)]]["name"])
            continue
        seen[id(w)] = len(rows)
        role = next((r for pat, r, _ in overrides if pat.search(name)), None) or _role(name, kind, module, rr)
        rows.append(dict(name=name, type=type(module).__name__, kind=kind, role=role, params=w.numel(),
                         shape=tuple(w.shape), groups=int(getattr(module, "groups", 1)), aliases=[]))
    if skipped:
        text = ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else "")
        # INFO once per distinct list (inventory runs for every plan, rank and prune of a model), DEBUG after
        logger.log(logging.DEBUG if text in _REPORTED else logging.INFO, "not prunable here (not a module's weight): %s", text)
        _REPORTED.add(text)
    for pat, _, text in overrides:
        if not any(pat.search(r["name"]) for r in rows):
            raise MixMatchError(f"role override {text!r} matches no layer; run `mixmatch inspect` to see the layer names")

    overridden = {r["name"] for r in rows if any(p.search(r["name"]) for p, _, _ in overrides)}
    _fallback_roles(rows, overridden)
    stages = _stages([r["name"] for r in rows], [r["role"] for r in rows], rr)
    n = len(rows)
    return [
        Layer(position=(i / (n - 1) if n > 1 else 0.0), stage=st, **{**r, "aliases": tuple(r["aliases"])})
        for i, (r, st) in enumerate(zip(rows, stages, strict=True))
    ]


def _fallback_roles(rows: list[dict[str, Any]], fixed: set[str]) -> None:
    """Unknown models: the first conv is the stem and the last Linear is the head."""
    free = [r for r in rows if r["name"] not in fixed]
    if not any(r["role"] == "stem" for r in rows):
        first = next((r for r in rows if r["kind"] != "norm"), None)
        if first is not None and first["kind"] == "conv" and first in free:
            first["role"] = "stem"
    if not any(r["role"] == "head" for r in rows):
        last = next((r for r in reversed(rows) if r["kind"] == "linear"), None)
        if last is not None and last in free:
            last["role"] = "head"


def prunable(layers: list[Layer]) -> list[Layer]:
    """The layers that are not normalization (the ones any method may prune)."""
    return [layer for layer in layers if layer.kind != "norm"]


def check_prunable(layers: list[Layer]) -> None:
    """Raise if the model has nothing to prune."""
    if not prunable(layers):
        raise MixMatchError("the model has no prunable layer (no Conv, Linear or Embedding weight); "
                            "Mix-and-Match prunes weights of those modules")


def check_untied(layers: Sequence[Layer], what: str) -> None:
    """Raise if a weight is shared by several modules: ``what`` (a structural or NNI pruner) would untie it.

    Plain masks (:func:`mixmatch_plugin.apply`) prune a shared weight once, for all its modules; pruners
    that wrap or resize modules one by one silently untie it or prune it inconsistently.
    """
    if (tied := next((layer for layer in layers if layer.aliases), None)) is not None:
        raise MixMatchError(
            f"layer {tied.name!r} shares its weight with {', '.join(repr(a) for a in tied.aliases)} (tied weights), "
            f"which {what} cannot prune without untying them; prune with plain masks (mm.apply, "
            "`mixmatch prune --backend torch`) or untie the weights first"
        )


def weight_of(model: nn.Module, name: str, *, leaf: bool = False) -> torch.Tensor:
    """The ``weight`` of submodule ``name``.

    With ``leaf=True``, the trainable leaf parameter: ``weight_orig`` for modules reparametrized by
    ``torch.nn.utils.prune`` (whose ``weight`` is recomputed as ``weight_orig * weight_mask``).
    """
    module = model.get_submodule(name)
    w = getattr(module, "weight_orig", None) if leaf else None
    w = w if w is not None else getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise MixMatchError(f"module {name!r} has no weight tensor; the plan does not fit this model")
    return w
