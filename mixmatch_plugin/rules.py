"""Rule files: the data that decides roles, stages, ranges and structural constraints.

Two kinds of file live in ``mixmatch_plugin/rules/`` and can be replaced or extended by the user:

* ``roles.yaml`` (schema ``mixmatch.roles/1``): ordered matchers that give every weight tensor a role,
  and name patterns that give it a stage.
* presets such as ``swin.yaml`` (schema ``mixmatch.rules/1``): ordered range rules, structural
  constraints, and which model classes the preset is for.

Files are YAML (loaded with ``yaml.safe_load``: no tags that construct objects) or TOML. A user file
may ``extends: <preset or path>``; its rules are tried first and its constraints override by id.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import RulesError

RULES_SCHEMA = "mixmatch.rules/1"
ROLES_SCHEMA = "mixmatch.roles/1"
KINDS = ("conv", "linear", "norm", "embedding", "other")
_MATCH_KEYS = {"role", "name", "stage", "type", "kind", "min_params", "max_params"}
_RULE_KEYS = _MATCH_KEYS | {"range", "per_stage", "per_depth"}
_CONSTRAINT_KEYS = _MATCH_KEYS | {"clamp"}
_RULESET_KEYS = {"schema", "name", "description", "match", "extends", "source", "empirical", "constraints",
                 "max_layer_sparsity", "rules"}


# --------------------------------------------------------------------------------------------- files
def builtin_dir() -> Path:
    """The folder holding the shipped rule files."""
    return Path(__file__).resolve().parent / "rules"


def builtin_presets() -> list[str]:
    """Names of the shipped presets (``generic``, ``swin``, ``resnet`` ...)."""
    return sorted(p.stem for p in builtin_dir().glob("*.yaml") if p.stem != "roles")


def _load_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RulesError(f"rules file {path} does not exist; pass a preset name ({', '.join(builtin_presets())}) or a path") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        raise RulesError(f"rules file {path}: YAML tags that construct objects are not allowed ({exc.problem}); use plain YAML") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise RulesError(f"rules file {path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise RulesError(f"rules file {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def _resolve(spec: str | Path) -> Path:
    p = Path(spec)
    if p.suffix in (".yaml", ".yml", ".toml") or p.exists():
        return p
    builtin = builtin_dir() / f"{spec}.yaml"
    if builtin.exists():
        return builtin
    raise RulesError(f"unknown preset {spec!r}; choose one of {', '.join(builtin_presets())} or pass a .yaml/.toml file")


# ------------------------------------------------------------------------------------------ matchers
@dataclass(frozen=True)
class Matcher:
    """Which layers a rule or constraint applies to. Every given key must match."""

    role: tuple[str, ...] | None = None
    name: re.Pattern[str] | None = None
    stage: tuple[int, int] | None = None
    type: tuple[str, ...] | None = None
    kind: tuple[str, ...] | None = None
    min_params: int | None = None
    max_params: int | None = None

    def matches(self, layer: Any) -> bool:
        """True if ``layer`` (a :class:`~mixmatch_plugin.layers.Layer`) satisfies every key."""
        return (
            (self.role is None or layer.role in self.role)
            and (self.name is None or self.name.search(layer.name) is not None)
            and (self.stage is None or self.stage[0] <= layer.stage <= self.stage[1])
            and (self.type is None or layer.type in self.type)
            and (self.kind is None or layer.kind in self.kind)
            and (self.min_params is None or layer.params >= self.min_params)
            and (self.max_params is None or layer.params <= self.max_params)
        )


def _as_tuple(value: Any, where: str, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise RulesError(f"{where}: '{key}' must be a string or a list of strings, got {value!r}")


def _matcher(d: Mapping[str, Any], where: str, roles: Mapping[str, str]) -> Matcher:
    kw: dict[str, Any] = {}
    if "role" in d:
        kw["role"] = _as_tuple(d["role"], where, "role")
        if unknown := [r for r in kw["role"] if r not in roles]:
            raise RulesError(f"{where}: unknown role {unknown[0]!r}; roles are {', '.join(roles)}")
    if "name" in d:
        try:
            kw["name"] = re.compile(str(d["name"]))
        except re.error as exc:
            raise RulesError(f"{where}: 'name' is not a valid regular expression ({exc})") from None
    if "stage" in d:
        st = d["stage"]
        if isinstance(st, int) and not isinstance(st, bool):
            kw["stage"] = (st, st)
        elif isinstance(st, list) and len(st) == 2 and all(isinstance(v, int) for v in st):
            kw["stage"] = (st[0], st[1])
        else:
            raise RulesError(f"{where}: 'stage' must be an integer or [first, last], got {st!r}")
    if "type" in d:
        kw["type"] = _as_tuple(d["type"], where, "type")
    if "kind" in d:
        kw["kind"] = _as_tuple(d["kind"], where, "kind")
        if bad := [k for k in kw["kind"] if k not in KINDS]:
            raise RulesError(f"{where}: unknown kind {bad[0]!r}; kinds are {', '.join(KINDS)}")
    for key in ("min_params", "max_params"):
        if key in d:
            if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 0:
                raise RulesError(f"{where}: '{key}' must be a non-negative integer, got {d[key]!r}")
            kw[key] = d[key]
    return Matcher(**kw)


def _number(value: Any, where: str, key: str) -> float:
    """A finite number (not a bool), or a :class:`RulesError` naming the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RulesError(f"{where}: '{key}' must be a finite number, got {value!r}")
    return float(value)


def _interval(value: Any, where: str, key: str) -> tuple[float, float]:
    pair = isinstance(value, (list, tuple)) and len(value) == 2
    if not pair or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise RulesError(f"{where}: '{key}' must be [low, high] with two numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (0.0 <= lo <= hi < 1.0):
        raise RulesError(f"{where}: '{key}' {[lo, hi]} must satisfy 0 <= low <= high < 1")
    return lo, hi


# --------------------------------------------------------------------------------------------- roles
@dataclass(frozen=True)
class RoleRule:
    """One entry of ``roles.yaml``: a matcher on kind/name (and depthwise-ness) that yields a role."""

    role: str
    kind: tuple[str, ...] | None = None
    name: re.Pattern[str] | None = None
    depthwise: bool | None = None


@dataclass(frozen=True)
class StagePattern:
    """A name pattern whose first group, plus ``offset``, is the stage index."""

    pattern: re.Pattern[str]
    offset: int = 0


@dataclass(frozen=True)
class RoleRules:
    """Parsed ``roles.yaml``: role names with descriptions, role rules and stage patterns."""

    roles: Mapping[str, str]
    rules: tuple[RoleRule, ...]
    stages: tuple[StagePattern, ...]


def load_role_rules(spec: str | Path | None = None) -> RoleRules:
    """Load ``roles.yaml`` (the shipped one when ``spec`` is None) and validate it."""
    path = builtin_dir() / "roles.yaml" if spec is None else Path(spec)
    data = _load_mapping(path)
    where = str(path)
    if data.get("schema") != ROLES_SCHEMA:
        raise RulesError(f"{where}: 'schema' must be {ROLES_SCHEMA!r}, got {data.get('schema')!r}")
    roles = data.get("roles")
    if not isinstance(roles, dict) or not roles:
        raise RulesError(f"{where}: 'roles' must map role names to descriptions")
    rules = []
    for i, r in enumerate(data.get("rules") or []):
        w = f"{where} rule {i + 1}"
        if not isinstance(r, dict) or "role" not in r:
            raise RulesError(f"{w}: each rule needs a 'role'")
        if extra := set(r) - {"role", "kind", "name", "depthwise"}:
            raise RulesError(f"{w}: unknown key {sorted(extra)[0]!r}; allowed: role, kind, name, depthwise")
        m = _matcher({k: v for k, v in r.items() if k in ("role", "name", "kind")}, w, roles)
        assert m.role is not None  # checked above: 'role' is present
        if len(m.role) != 1:
            raise RulesError(f"{w}: 'role' must name one role")
        rules.append(RoleRule(role=m.role[0], kind=m.kind, name=m.name, depthwise=r.get("depthwise")))
    if not rules:
        raise RulesError(f"{where}: 'rules' is empty; give at least a catch-all {{role: other}}")
    stages = []
    for i, s in enumerate(data.get("stages") or []):
        w = f"{where} stage pattern {i + 1}"
        try:
            pat = re.compile(s["name"])
        except (KeyError, TypeError, re.error) as exc:
            raise RulesError(f"{w}: needs 'name', a regular expression with one group ({exc})") from None
        if pat.groups < 1:
            raise RulesError(f"{w}: the pattern needs a group that captures the stage number")
        offset = s.get("offset", 0)
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise RulesError(f"{w}: 'offset' must be an integer, got {offset!r}")
        stages.append(StagePattern(pat, offset))
    return RoleRules(roles=dict(roles), rules=tuple(rules), stages=tuple(stages))


# ------------------------------------------------------------------------------------ range rule sets
@dataclass(frozen=True)
class RangeRule:
    """``range`` for the layers ``match`` selects; ``per_stage``/``per_depth`` shift it with depth."""

    match: Matcher
    range: tuple[float, float]
    per_stage: float = 0.0
    per_depth: float = 0.0


@dataclass(frozen=True)
class Constraint:
    """A structural constraint: layers ``match`` selects are clamped into ``clamp`` (a hard bound)."""

    id: str
    match: Matcher
    clamp: tuple[float, float]


@dataclass(frozen=True)
class RuleSet:
    """A parsed preset: range rules (first match wins), constraints, and what the preset is for."""

    name: str
    description: str = ""
    class_names: tuple[str, ...] = ()
    source: str = "rules"  # "rules" or "empirical"
    empirical_methods: tuple[str, ...] = ("global_magnitude", "snip", "grasp")
    empirical_sparsities: tuple[float, ...] = (0.7, 0.8, 0.9)
    rules: tuple[RangeRule, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    max_layer_sparsity: float = 0.99
    origin: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def without(self, *constraint_ids: str) -> RuleSet:
        """A copy with the named constraints switched off (unknown ids raise)."""
        known = {c.id for c in self.constraints}
        if unknown := [c for c in constraint_ids if c not in known]:
            raise RulesError(f"unknown constraint {unknown[0]!r} in preset {self.name!r}; constraints are {', '.join(sorted(known)) or 'none'}")
        return replace(self, constraints=tuple(c for c in self.constraints if c.id not in constraint_ids))


def load_rules(spec: str | Path | Mapping[str, Any] = "generic", *, role_rules: RoleRules | None = None) -> RuleSet:
    """Load a preset by name (``"swin"``), path (``rules.yaml``/``.toml``) or an already-parsed mapping.

    Raises :class:`~mixmatch_plugin.errors.RulesError` naming the file, the rule and the problem.
    """
    roles = (role_rules or load_role_rules()).roles
    return _load_ruleset(spec, roles, seen=())


def _load_ruleset(spec: str | Path | Mapping[str, Any], roles: Mapping[str, str], seen: tuple[str, ...]) -> RuleSet:
    if isinstance(spec, Mapping):
        data, where = dict(spec), "<rules mapping>"
    else:
        path = _resolve(spec)
        data, where = _load_mapping(path), str(path)
    if where in seen:
        raise RulesError(f"{where}: 'extends' forms a cycle ({' -> '.join((*seen, where))})")
    if data.get("schema", RULES_SCHEMA) != RULES_SCHEMA:
        raise RulesError(
            f"{where}: 'schema' is {data.get('schema')!r}; this version reads {RULES_SCHEMA!r}: upgrade mixmatch-plugin or fix the file"
        )
    if unknown := set(data) - _RULESET_KEYS:
        raise RulesError(f"{where}: unknown key {sorted(unknown)[0]!r}; allowed keys: {', '.join(sorted(_RULESET_KEYS))}")
    base = _load_ruleset(data["extends"], roles, (*seen, where)) if data.get("extends") else None

    rules = []
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        raise RulesError(f"{where}: 'rules' must be a list")
    for i, r in enumerate(raw_rules):
        w = f"{where} rule {i + 1}"
        if not isinstance(r, dict):
            raise RulesError(f"{w}: each rule must be a mapping like {{role: conv, range: [0.3, 0.6]}}")
        if bad := set(r) - _RULE_KEYS:
            raise RulesError(f"{w}: unknown key {sorted(bad)[0]!r}; allowed: {', '.join(sorted(_RULE_KEYS))}")
        if "range" not in r:
            raise RulesError(f"{w}: missing 'range: [low, high]'")
        per = {k: _number(r.get(k, 0.0), w, k) for k in ("per_stage", "per_depth")}
        rules.append(RangeRule(_matcher(r, w, roles), _interval(r["range"], w, "range"), **per))

    constraints: dict[str, Constraint | None] = {c.id: c for c in base.constraints} if base else {}
    raw_c = data.get("constraints") or {}
    if not isinstance(raw_c, dict):
        raise RulesError(f"{where}: 'constraints' must map ids to {{<match keys>, clamp: [lo, hi]}} (or null to switch one off)")
    for cid, c in raw_c.items():
        w = f"{where} constraint {cid!r}"
        if c is None:
            constraints[cid] = None
            continue
        if not isinstance(c, dict) or "clamp" not in c:
            raise RulesError(f"{w}: needs 'clamp: [low, high]' and match keys, or null to switch it off")
        if bad := set(c) - _CONSTRAINT_KEYS:
            raise RulesError(f"{w}: unknown key {sorted(bad)[0]!r}; allowed: {', '.join(sorted(_CONSTRAINT_KEYS))}")
        constraints[cid] = Constraint(cid, _matcher(c, w, roles), _interval(c["clamp"], w, "clamp"))

    match = data.get("match") or {}
    if not isinstance(match, dict):
        raise RulesError(f"{where}: 'match' must be a mapping like {{class_names: [SwinTransformer]}}")
    source = data.get("source", base.source if base else "rules")
    if source not in ("rules", "empirical"):
        raise RulesError(f"{where}: 'source' must be 'rules' or 'empirical', got {source!r}")
    emp = data.get("empirical") or {}
    if not isinstance(emp, dict) or set(emp) - {"methods", "sparsities"}:
        raise RulesError(f"{where}: 'empirical' must be a mapping with 'methods' and 'sparsities'")
    sparsities = emp.get("sparsities", (0.7, 0.8, 0.9))
    if not isinstance(sparsities, (list, tuple)) or not sparsities:
        raise RulesError(f"{where}: 'empirical.sparsities' must be a non-empty list of numbers in (0, 1)")
    for v in sparsities:
        if not 0.0 < _number(v, where, "empirical.sparsities") < 1.0:
            raise RulesError(f"{where}: 'empirical.sparsities' must lie in (0, 1), got {v!r}")
    methods = emp.get("methods", ("global_magnitude", "snip", "grasp"))  # names of baselines: checked where they run
    if isinstance(methods, str) or not isinstance(methods, (list, tuple)) or not methods or not all(isinstance(m, str) for m in methods):
        raise RulesError(f"{where}: 'empirical.methods' must be a non-empty list of baseline names, got {methods!r}")
    mls = _number(data.get("max_layer_sparsity", base.max_layer_sparsity if base else 0.99), where, "max_layer_sparsity")
    if not 0.0 < mls < 1.0:
        raise RulesError(f"{where}: 'max_layer_sparsity' must lie in (0, 1), got {mls}")
    all_rules = tuple(rules) + (base.rules if base else ())
    if source == "rules" and not all_rules:
        raise RulesError(f"{where}: no range rules; add 'rules:' or 'extends: generic'")
    return RuleSet(
        name=str(data.get("name", Path(where).stem)), description=str(data.get("description", "")),
        class_names=_as_tuple(match.get("class_names", []), where, "class_names"), source=source,
        empirical_methods=tuple(methods), empirical_sparsities=tuple(float(s) for s in sparsities), rules=all_rules,
        constraints=tuple(c for c in constraints.values() if c is not None), max_layer_sparsity=mls, origin=where,
    )


def preset_for(model_or_class: Any) -> str:
    """The shipped preset whose ``match.class_names`` names the model's class (or a base class); else ``generic``."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    names = {c.__name__ for c in cls.__mro__}
    for preset in builtin_presets():
        data = _load_mapping(builtin_dir() / f"{preset}.yaml")
        wanted = (data.get("match") or {}).get("class_names") or []
        if names & set(wanted):
            return preset
    return "generic"
