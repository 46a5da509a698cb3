"""What structured pruning planned and did: group plans, per-group results, the report and the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class GroupPlan:
    """One dependency group and the ratio planned for it.

    Attributes:
        key: name of the leaf Conv/Linear module that carries the group's entry in the ratio dict.
        producers: layers whose output channels the group removes.
        consumers: layers whose input channels the group removes.
        channels: channels per channel group (for attention: head_dim; else the group's width).
        channel_groups: 1, the number of heads, or the conv ``groups`` (each loses the same channels).
        targets: the strategy's target per producer.
        target: the folded ratio before clamping.
        keep: channels (per channel group) planned to remain; heads when ``heads`` is set.
        ratio: the ratio handed to Torch-Pruning, ``(channels - keep) / channels``.
        heads: for whole-head removal, the number of heads (``keep`` then counts heads).
        clamped: why the ratio differs from ``target`` beyond rounding (``min-keep``, ``max_ratio``), or "".
    """

    key: str
    producers: list[str]
    consumers: list[str]
    channels: int
    channel_groups: int
    targets: dict[str, float]
    target: float
    keep: int
    ratio: float
    heads: int = 0
    clamped: str = ""
    module: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("targets", "module")}


@dataclass
class GroupResult:
    """Planned against realized pruning of one group (realized = removed / original, per channel group).

    ``unit`` is ``ch`` (channels per channel group; head_dim for attention) or ``heads``.
    """

    key: str
    producers: list[str]
    channels: int
    planned: float
    realized: float
    kept: int
    target: float
    clamped: str = ""
    unit: str = "ch"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PruneReport:
    """What :func:`prune` did: sizes before/after, per-group ratios and the importance criterion; under a budget,
    ``cap`` is the per-group cap its allocation was chosen under (``TPOptions.caps``) and ``allocation`` which
    allocation the KL choice kept (``cap 0.8``, ``global threshold``, ``lamp threshold``)."""

    strategy: str
    signal: str
    importance: str
    fold: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    groups: list[GroupResult]
    seconds_groups: float = 0.0
    seconds_prune: float = 0.0
    consistency: float | None = None
    latency_ratio: float | None = None
    cap: float | None = None
    allocation: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "groups"}
        d["groups"] = [g.to_dict() for g in self.groups]
        d["params_ratio"], d["macs_ratio"] = self.params_ratio, self.macs_ratio
        return d

    def summary(self) -> str:
        """A short multi-line text: totals, then one line per group that was pruned."""
        lines = [
            f"strategy {self.strategy} (signal {self.signal}), importance {self.importance}, fold {self.fold}",
            f"params {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.1%} kept, {1 - self.params_ratio:.1%} removed); "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.1%} kept, {1 - self.macs_ratio:.1%} removed)",
        ]
        if self.allocation is not None:
            lines.append(f"allocation: {self.allocation} (the candidate whose whole allocation stayed closest to the dense outputs)")
        if self.latency_ratio is not None:
            lines.append(f"latency {self.latency_ratio:.1%} of the dense model's, measured on this machine")
        if self.consistency is not None:
            lines.append(f"consistency: max relative difference to the channel-zeroed original {self.consistency:.2e}")
        for g in self.groups:
            if g.planned > 0 or g.realized > 0:
                lines.append(
                    f"  {g.key:<40} {g.channels:>5} {g.unit:<5} removed: target {g.target:.3f}  planned {g.planned:.3f}  "
                    f"realized {g.realized:.3f}" + (f"  ({g.clamped})" if g.clamped else "")
                )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class TPResult:
    """The pruned model, its report, and what was removed.

    Attributes:
        model: the pruned model.
        report: sizes, per-group ratios, importance, consistency.
        removed: removed channels in the original numbering (for :func:`zeroed_reference`).
        history: Torch-Pruning's pruning history ``[module name, is_out, indices]`` (for :func:`rebuild`).
        num_heads: head count of every timm attention module after pruning.
    """

    model: nn.Module
    report: PruneReport
    removed: list[RemovedItem]
    history: list[list[Any]] = field(default_factory=list)
    num_heads: dict[str, int] = field(default_factory=dict)


@dataclass
class RemovedItem:
    """Channels one pruning operation removed, in the original model's numbering.

    ``target`` is a module name, or a parameter name when ``is_param``; ``side`` is ``out`` or ``in``;
    ``kind`` names the Torch-Pruning handler (``conv``, ``linear``, ``batchnorm``, ``layernorm``,
    ``parameter``, ``patchmerging`` ...); ``dim`` is the pruned dimension of a parameter.
    """

    target: str
    side: str
    kind: str
    idxs: list[int]
    is_param: bool = False
    dim: int = 0
