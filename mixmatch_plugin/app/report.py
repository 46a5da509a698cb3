"""Reports: Markdown or self-contained HTML from a plan, demo, search or benchmark JSON, with plots.

The input kind is read from its ``schema`` field: ``mixmatch.plan/1``, ``mixmatch.demo/1``,
``mixmatch.bench/1`` or ``mixmatch.search/1``. Plots are (re)drawn next to the report.
"""

from __future__ import annotations

import base64
import html
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mixmatch_plugin.errors import MixMatchError
from mixmatch_plugin.io import atomic_write_text, read_json

logger = logging.getLogger(__name__)


def _md_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def _plan_section(doc: Mapping[str, Any], folder: Path, stem: str, source: str = "") -> tuple[list[str], list[Path]]:
    from mixmatch_plugin.app import plots
    from mixmatch_plugin.planning import Plan

    p = Plan.from_dict(doc, source=source or "plan")
    imgs = [
        plots.strategy_heatmap(p, folder / f"{stem}-strategies.png",
                               strategies=[s.name for s in p.strategies if "method" not in s.meta]),
        plots.ranges_plot(p, folder / f"{stem}-ranges.png", highlight=[s.name for s in p.strategies[:1]]),
    ]
    if p.sensitivity:
        imgs.append(plots.sensitivity_bars(p, folder / f"{stem}-sensitivity.png"))
    t = p.meta.get("target")
    lines = [
        f"## Plan: {p.meta.get('model', 'model')}",
        f"{len(p.layers)} weight tensors ({sum(x.params for x in p.layers):,} weights), preset **{p.meta.get('preset')}**, "
        f"ranges from **{p.meta.get('ranges')}**, "
        + (f"budget-matched at **{t:.1%}** global sparsity." if t is not None else "native sparsity."),
        "",
        _md_table([(s.name, _pct(s.global_sparsity), len(s.meta.get("out_of_range", [])), s.meta.get("method", s.meta.get("shape", "")))
                   for s in p.strategies], ("strategy", "global sparsity %", "layers outside range", "shape / method")),
    ]
    return lines, imgs


def _demo_section(doc: Mapping[str, Any], folder: Path, stem: str, source: str = "") -> tuple[list[str], list[Path]]:
    rows = [(r["method"], _pct(r["sparsity"]), _pct(r["val_one_shot"]), _pct(r["test_one_shot"]), _pct(r["test_finetuned"]),
             r["finetune_steps"] or "–") for r in doc["rows"]]
    lines = [
        f"## Demo: {doc['model'].split(':')[-1]} on {doc['dataset']}",
        f"Dense test accuracy **{_pct(doc['dense_test'])} %**. Target sparsity **{doc['target']:.0%}**, exactly matched by "
        f"every method. Strategy chosen on the validation split: **{doc['chosen']}**. Run time {doc['seconds']:.0f} s.",
        "",
        _md_table(rows, ("method", "sparsity %", "val acc one-shot %", "test acc one-shot %", "test acc fine-tuned %", "fine-tune steps")),
        "",
        "One-shot: masks plus BatchNorm re-estimation on 4 training batches. Fine-tuned: the same mask-keeping "
        "budget for every method. The test split is used only for these columns.",
    ]
    if doc.get("dense_finetuned") is not None:
        lines += ["", f"The dense model after the same fine-tune: **{_pct(doc['dense_finetuned'])} %**. The demo trains it "
                  "briefly, so the fine-tune also continues its training: a pruned model can beat the dense row above; "
                  "compare it with this number instead."]
    imgs = [Path(v) for k, v in doc.get("files", {}).items() if k.endswith("_png") and Path(v).exists()]
    return lines, imgs


def _generic_section(doc: Mapping[str, Any], folder: Path, stem: str, source: str = "") -> tuple[list[str], list[Path]]:
    md = doc.get("markdown")
    lines = [str(md)] if md else ["```", str({k: v for k, v in doc.items() if k != "files"})[:4000], "```"]
    imgs = [Path(v) for v in doc.get("plots", {}).values() if Path(v).exists()]
    return lines, imgs


_SCHEMA_VERSION = 1  # every kind below is at version 1
_SECTIONS: dict[str, Callable[[Mapping[str, Any], Path, str, str], tuple[list[str], list[Path]]]] = {
    "mixmatch.plan": _plan_section,
    "mixmatch.demo": _demo_section,
    "mixmatch.bench": _generic_section,
    "mixmatch.search": _generic_section,
}


def write_report(source: str | Path, out: str | Path, *, fmt: str | None = None) -> Path:
    """Write a Markdown (``.md``) or self-contained HTML (``.html``) report about ``source``."""
    source, out = Path(source), Path(out)
    doc = read_json(source, "report input")
    schema = str(doc.get("schema", "")) if isinstance(doc, Mapping) else ""
    m = re.fullmatch(r"(.+)/(\d+)", schema)
    section = _SECTIONS.get(m.group(1)) if m else None
    if m is None or section is None:
        raise MixMatchError(
            f"{source} is not a plan, demo, search or bench output (schema {schema!r}); "
            "pass a file written by mixmatch plan/demo/search/bench"
        )
    if int(m.group(2)) > _SCHEMA_VERSION:
        raise MixMatchError(
            f"{source} has schema {schema}, newer than this version reads ({m.group(1)}/{_SCHEMA_VERSION}); "
            "upgrade mixmatch-plugin (pip install -U mixmatch-plugin)"
        )
    fmt = fmt or ("html" if out.suffix in (".html", ".htm") else "md")
    if fmt not in ("md", "html"):
        raise MixMatchError(f"report format must be md or html, got {fmt!r}")
    try:
        lines, imgs = section(doc, out.parent, out.stem, str(source))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        if isinstance(exc, MixMatchError):
            raise
        raise MixMatchError(f"{source} is a malformed {m.group(1)} file (missing or wrong field {exc}); regenerate it") from None
    imgs = [p for p in imgs if _is_png(p)]
    if fmt == "md":
        body = "\n".join(lines) + "\n\n" + "\n\n".join(f"![{p.stem}]({_rel(p, out.parent)})" for p in imgs) + "\n"
        return atomic_write_text(out, f"# Mix-and-Match report\n\nSource: `{source.name}`\n\n{body}")
    import markdown

    body = markdown.markdown(html.escape("\n".join(lines), quote=False), extensions=["tables"])  # the input's text is data, never HTML
    parts = [f"<h1>Mix-and-Match report</h1><p>Source: <code>{html.escape(source.name)}</code></p>", body]
    for p in imgs:
        b64 = base64.b64encode(p.read_bytes()).decode()
        parts.append(f'<figure><img alt="{html.escape(p.stem)}" style="max-width:100%" src="data:image/png;base64,{b64}"/>'
                     f"<figcaption>{html.escape(p.stem)}</figcaption></figure>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>Mix-and-Match report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
    return atomic_write_text(out, page)


def _is_png(p: Path) -> bool:
    """Only real PNG files are linked or embedded: a hostile input must not pull other files into a report."""
    try:
        with p.open("rb") as fh:
            ok = p.is_file() and fh.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        ok = False
    if not ok:
        logger.warning("not a PNG image, left out of the report: %s", p)
    return ok


def _rel(p: Path, base: Path) -> str:
    try:
        return str(p.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(p)

