"""Tables and plots of benchmark results, and the README section generated from them."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixmatch_plugin.io import atomic_write_text

ORDER = ("uniform", "global_magnitude", "snip", "grasp", "lamp", "erk", "mm", "mm+search")
#: Mix-and-Match's rows: the pool's validation choice, and the search around the pool (judged separately).
OURS = ("mm", "mm+search")
LABEL = {
    "uniform": "uniform", "global_magnitude": "global mag.", "snip": "SNIP", "grasp": "GraSP", "lamp": "LAMP",
    "erk": "ERK", "mm": "**M&M**", "mm+search": "**M&M+search**", "best": "best rival",
}
FIGHT = ("uniform", "global_magnitude", "lamp", "snip", "grasp", "erk")
#: The allocators users get for free: M&M's "best rival" is the best of these, per model, sparsity and regime.
RIVALS = ("global_magnitude", "lamp", "snip", "erk")
#: A difference smaller than this many points is a tie whatever the seeds say (10 of 10,000 test images).
MIN_POINTS = 0.1


def _stats(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def drops(model_doc: Mapping[str, Any]) -> dict[tuple[str, float, str], list[float]]:
    """Test-accuracy drop in points, per (regime, sparsity, method), one value per seed."""
    dense = model_doc["dense"]["test_accuracy_eval"]
    out: dict[tuple[str, float, str], list[float]] = defaultdict(list)
    for r in model_doc["runs"]:
        out[(r["regime"], r["sparsity"], r["method"])].append(100 * (dense - r["test_accuracy"]))
    return out


def reseed_spread(d: Mapping[tuple[str, float, str], list[float]], regime: str, sparsity: float) -> float:
    """Largest difference between one strategy fine-tuned twice with different data orders (0 without reseeded runs)."""
    return max([abs(a - b) for (rg, sp, m), v in d.items() if rg == regime and sp == sparsity and m.endswith("_reseeded")
                for a, b in zip(v, d.get((rg, sp, m.replace("_reseeded", "")), []), strict=False)] + [0.0])


def noise_floor(d: Mapping[tuple[str, float, str], list[float]], regime: str, sparsity: float, methods: tuple[str, ...]) -> float:
    """The noise floor of comparing ``methods``: the largest of their seed stds and the reseed spread.

    Pairwise on purpose: a collapsed method's large spread (GraSP near chance) must not turn every
    other comparison at that sparsity into a tie.
    """
    stds = [_stats(d[(regime, sparsity, m)])[1] for m in methods if len(d.get((regime, sparsity, m), [])) > 1]
    return max([*stds, reseed_spread(d, regime, sparsity), MIN_POINTS])


def model_table(name: str, model_doc: Mapping[str, Any]) -> str:
    d = drops(model_doc)
    regimes = sorted({k[0] for k in d}, key=lambda r: r != "one-shot")
    sparsities = sorted({k[1] for k in d})
    dense = model_doc["dense"]
    lines = [f"**{name}**: dense test accuracy {100 * dense['test_accuracy_eval']:.2f} % "
             f"(validation {100 * dense['val_accuracy_eval']:.2f} %). Cells: test-accuracy drop in points, mean ± std over seeds "
             f"(lower is better).{_when(model_doc)}"]
    for regime in regimes:
        methods = [m for m in ORDER if any(k == (regime, s, m) for s in sparsities for k in d)]
        lines += ["", f"*{regime}*", "", "| sparsity | " + " | ".join(LABEL.get(m, m) for m in methods) + " | reseed spread |",
                  "|---" * (len(methods) + 2) + "|"]
        for s in sparsities:
            cells = []
            for m in methods:
                v = d.get((regime, s, m))
                if not v:
                    cells.append("–")
                    continue
                mu, sd = _stats(v)
                cells.append(f"{mu:.2f} ± {sd:.2f}" if len(v) > 1 else f"{mu:.2f}")
            spread = reseed_spread(d, regime, s)
            lines.append(f"| {s:.0%} | " + " | ".join(cells) + f" | {f'{spread:.2f}' if spread else '–'} |")
    return "\n".join(lines)


def protocol_of(model_doc: Mapping[str, Any]) -> int:
    """The benchmark protocol a model's results were measured under (1: recorded before protocols were)."""
    return int((model_doc.get("config") or {}).get("protocol", 1))


def _when(model_doc: Mapping[str, Any]) -> str:
    """`` Measured DATE in N min (...)``: when one model's results were made and what they cost."""
    env = model_doc.get("environment") or {}
    secs = model_doc.get("seconds") or {}
    seeds = [v for k, v in secs.items() if k != "structured"]
    text = ""
    if seeds:
        cost = f"{sum(seeds) / 60:.0f} min for {len(seeds)} seed(s)"
        if "structured" in secs:
            cost += f" + {secs['structured'] / 60:.0f} min of structured rows"
        when = f" on {env['date'][:16]}" if env.get("date") else ""
        build = f", torch {env['torch']}" if env.get("torch") else ""
        cpu = f" ({env['cpu']})" if env.get("cpu") else ""
        where = f"GPU {env['gpu']} ({env['device']})" if env.get("gpu") else f"{env.get('threads', '?')} CPU threads{cpu}"
        text = f" Measured{when}: {cost} on {where}{build} (dense training excluded, cached)."
    phases = model_doc.get("phase_seconds") or {}
    if phases:  # the mean per seed, largest first
        total: dict[str, float] = {}
        for per_seed in phases.values():
            for k, v in per_seed.items():
                total[k] = total.get(k, 0.0) + v / len(phases)
        split = ", ".join(f"{k} {v / 60:.1f}" for k, v in sorted(total.items(), key=lambda kv: -kv[1]))
        text += f" Minutes per seed by phase (mean of {len(phases)}): {split}."
    protocol = protocol_of(model_doc)
    if protocol < 2:
        text += (" *Protocol 1*: each method drew its own BatchNorm and fine-tuning batches from the seed's shuffled "
                 "loader (the same seed, other batches).")
    for redo in model_doc.get("redone") or []:
        text += (f" The {redo['rows']} rows were redone under protocol {protocol} on {redo['date'][:10]}; the one-shot rows "
                 f"were kept from protocol {redo['from_protocol']} (no BatchNorm: they do not depend on the batches, and the "
                 "rerun reproduced each fine-tuned M&M strategy's one-shot test accuracy).")
    per: dict[float, set[int]] = {s: set() for s in (model_doc.get("config") or {}).get("sparsities", [])}
    for r in model_doc.get("runs", []):
        per.setdefault(r["sparsity"], set()).add(r["seed"])
    short = {s: len(v) for s, v in sorted(per.items()) if len(v) < 3}
    if short:  # a sparsity added later (or an interrupted run) can have fewer seeds than the others
        where = (f"{next(iter(short.values()))} seed(s)" if len(short) == len(per) and len(set(short.values())) == 1
                 else ", ".join(f"{n} seed(s) at {s:.0%}" for s, n in short.items()))
        text += f" **Preliminary: {where} so far**; `mixmatch bench` resumes the run."
    return text


def reduction_table(name: str, model_doc: Mapping[str, Any]) -> str:
    """(drop_baseline - drop_mm) / drop_baseline per baseline; differences within the noise floor are ties.

    With a single seed of either method there is no noise floor, and the cell says so instead of judging.
    """
    d = drops(model_doc)
    rows = []
    for (regime, s, m), v in sorted(d.items()):
        if m not in OURS:
            continue
        mm_mu = _stats(v)[0]
        cells = []
        have = [b for b in RIVALS if d.get((regime, s, b))]
        best = min(have, key=lambda b: _stats(d[(regime, s, b)])[0]) if have else None
        for b in (*FIGHT, best or ""):
            bv = d.get((regime, s, b))
            if not bv:
                cells.append("–")
                continue
            b_mu = _stats(bv)[0]
            if min(len(v), len(bv)) < 2:  # one seed measures no noise floor: nothing can be called a win or a loss
                cells.append(f"not judged, 1 seed ({_red(b_mu, mm_mu)})")
            elif abs(b_mu - mm_mu) <= noise_floor(d, regime, s, (m, b)):
                cells.append(f"tie ({_red(b_mu, mm_mu)})")
            else:
                cells.append(("**win** " if mm_mu < b_mu else "loss ") + _red(b_mu, mm_mu))
        cells[-1] += f" vs {LABEL[best]}" if best else ""
        rows.append(f"| {LABEL[m]} | {regime} | {s:.0%} | " + " | ".join(cells) + " |")
    head = "| method | regime | sparsity | " + " | ".join(LABEL[b] for b in (*FIGHT, "best")) + " |\n" + "|---" * (len(FIGHT) + 4) + "|"
    return f"**{name}**: reduction of the drop by Mix-and-Match, (drop_baseline − drop_mm) / drop_baseline\n\n{head}\n" + "\n".join(rows)


def ablation_table(name: str, model_doc: Mapping[str, Any]) -> str:
    """One-shot drop of each nested pool's validation choice, and the member it chose most often."""
    from benchmarks.run import POOLS

    d = drops(model_doc)
    sparsities = sorted({k[1] for k in d if k[2].startswith("mm[")})
    if not sparsities:
        return ""
    picks: dict[tuple[float, str], list[str]] = defaultdict(list)
    for c in model_doc.get("choices", []):
        for step, winner in (c.get("ablation") or {}).items():
            picks[(c["sparsity"], step)].append(winner)
        if "winner" in c:
            picks[(c["sparsity"], "mm")].append(c["winner"])
        if "search" in c:
            picks[(c["sparsity"], "mm+search")].append(c["search"]["winner"] if c["search"]["searched"] else "(the choice)")
    lines = [f"**{name}**: what each kind of pool member adds (one-shot test drop of the validation choice, mean ± std "
             "over seeds; the member chosen most often)", "", "| sparsity | " + " | ".join(
                 ("pool: " + p if p == "rules" else p) for p in (*POOLS, "remask (= M&M)", "+search")) + " |", "|---" * (len(POOLS) + 3) + "|"]
    for s in sparsities:
        cells = []
        for step in (*POOLS, *OURS):
            v = d.get(("one-shot", s, step if step in OURS else f"mm[{step}]"))
            won = picks.get((s, step))
            top = max(dict.fromkeys(won), key=won.count) if won else ""  # a tie: the earliest seed's
            cells.append(f"{_stats(v)[0]:.2f} ± {_stats(v)[1]:.2f} `{top}`" if v else "–")
        lines.append(f"| {s:.0%} | " + " | ".join(cells) + " |")
    cost = [c for c in model_doc.get("choices", []) if "evaluations" in c]
    if cost:
        lines += ["", f"Choosing M&M cost {statistics.fmean(c['evaluations'] for c in cost):.0f} masked evaluations "
                  f"({statistics.fmean(c['seconds'] for c in cost):.0f} s) per cell, over a pool of "
                  f"{statistics.fmean(c['pool'] for c in cost):.0f} strategies"
                  + (f" ({statistics.fmean(c['twins'] for c in cost):.0f} of them twins of others, evaluated once)." if all("twins" in c for c in cost) else ".")]
    searched = [c["search"] for c in cost if "search" in c]
    if searched:
        lines[-1] += (f" The search added {statistics.fmean(c['evaluations'] for c in searched):.0f} "
                      f"({statistics.fmean(c['seconds'] for c in searched):.0f} s) and beat the choice on validation in "
                      f"{sum(c['searched'] for c in searched)} of {len(searched)} cells.")
    return "\n".join(lines)


def _red(b: float, m: float) -> str:
    if b <= 1e-9:  # the baseline lost nothing (or gained): a relative reduction means nothing
        return "n/a, no baseline drop"
    return f"{100 * (b - m) / b:+.0f} %"


def plots(doc: Mapping[str, Any], folder: str | Path, prefix: str = "") -> dict[str, str]:
    """Accuracy-vs-sparsity plots per model and regime, ``folder/<prefix><model>-<regime>.png``."""
    folder = Path(folder)
    files = {}
    for name, md in doc["models"].items():
        dense = md["dense"]["test_accuracy_eval"]
        for regime in ("one-shot", "fine-tuned"):
            series: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
            for r in md["runs"]:
                if r["regime"] == regime and r["method"] in ORDER:
                    series[LABEL[r["method"]].strip("*")][r["sparsity"]].append(r["test_accuracy"])
            if not series:
                continue
            key = f"{prefix}{name}-{regime}"
            ordered = {("Mix-and-Match" if k == "M&M" else k): v for k, v in sorted(series.items(), key=lambda kv: kv[0] != "M&M")}
            files[key] = str(method_comparison(ordered, folder / f"{key}.png", reference=dense,
                                               title=f"{name} on Fashion-MNIST, {regime}: test accuracy (mean ± std over seeds)"))
    return files


def markdown(doc: Mapping[str, Any], *, command: str) -> str:
    cfg = doc.get("config", {})
    # models kept from earlier runs carry the environment they were measured in; name every build used
    envs = [md.get("environment") or doc.get("environment") or {} for md in doc["models"].values()] or [doc.get("environment") or {}]
    torches = ", ".join(sorted({str(e.get("torch")) for e in envs}))
    timms = ", ".join(sorted({str(e.get("timm")) for e in envs}))
    older = ("; a model whose line says *protocol 1* was measured before that: each method drew its own batches from the "
             "seed's shuffled loader") if any(protocol_of(md) < 2 for md in doc["models"].values()) else ""
    parts = [
        f"Generated by `{command}` (measured under torch {torches}, timm {timms}; each model's line says which). Seeds {sorted({r['seed'] for m in doc['models'].values() for r in m['runs']})}; every method prunes exactly the same number of weights; "
        + (f"fine-tuning: {cfg.get('finetune_steps')} mask-keeping Adam steps at lr {cfg.get('finetune_lr')}, the same for "
           "every method, on the same batches in the same order, drawn from the seed, and " if cfg.get("finetune_methods")
           else "one-shot only (no fine-tuning), ")
        + f"BatchNorm re-estimated on the same batches for every method (benchmark protocol 2{older}). **M&M** is the strategy chosen on the validation split "
        "(`mixmatch_plugin.choose`: every pool member screened on 500 images, the best 5 on all 5,000, the winner's "
        "allocation tried with each signal's masks) from one pool: the rule strategies of both range variants (the "
        "model's preset and the paper's empirical ranges), the score family"
        + (f", the measured allocations and progressive SNIP ({cfg['progressive']} rounds). " if cfg.get("progressive")
           else " and the measured allocations. ")
        + (f"**M&M+search** adds an Optuna study around that pool ({cfg['search_trials']} TPE trials after the whole pool, "
           "each a pool member with per-group log-odds shifts at the same budget, on the screen's loss; its best 5 on all "
           "validation against the choice's finalists). " if cfg.get("search_trials") else "")
        + "A difference within the noise floor of a comparison (the larger of the two methods' seed stds, the reseed "
        "spread: one strategy fine-tuned with two data orders, and 0.1 point) is a tie; *best rival* is the best of "
        "global magnitude, LAMP, SNIP and ERK in that cell.",
    ]
    for name, md in doc["models"].items():
        parts += ["", model_table(name, md), "", reduction_table(name, md), "", ablation_table(name, md)]
    rows = [r for md in doc["models"].values() for r in md.get("structured") or []]
    if rows:
        from benchmarks.structured import markdown as structured_markdown

        parts += ["", structured_markdown(rows)]
    return "\n".join(parts)


def update_readme(readme: str | Path, section: str, marker: str = "bench") -> bool:
    """Replace the text between ``<!-- {marker}:start -->`` and ``<!-- {marker}:end -->``; False if no markers."""
    path = Path(readme)
    text = path.read_text()
    pat = re.compile(rf"(<!-- {marker}:start -->\n)(?:.*?\n)?(<!-- {marker}:end -->)", re.S)  # the section may be empty
    if not pat.search(text):
        return False
    atomic_write_text(path, pat.sub(lambda m: m.group(1) + section.rstrip("\n") + "\n" + m.group(2), text))
    return True


def method_comparison(
    series: Mapping[str, Mapping[float, Sequence[float]]], path: str | Path, *, title: str,
    ylabel: str = "test accuracy", reference: float | None = None,
) -> Path:
    """Mean ± std of each method's accuracy at each sparsity (``{method: {sparsity: [values over seeds]}}``)."""
    from mixmatch_plugin.app.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.2))
    n = max(1, len(series))
    sp_all = sorted({s for v in series.values() for s in v})
    width = (min(np.diff(sp_all)) if len(sp_all) > 1 else 0.1) * 0.6
    for i, (method, by_s) in enumerate(series.items()):
        xs = sorted(by_s)
        mean = [float(np.mean(by_s[x])) for x in xs]
        std = [float(np.std(by_s[x])) for x in xs]
        off = (i - (n - 1) / 2) * width / n
        style = dict(lw=2.2, marker="o") if method.lower().startswith("mix") else dict(lw=1.2, marker=".", alpha=0.9)
        ax.errorbar([x + off for x in xs], mean, yerr=std, capsize=3, label=method, **style)
    if reference is not None:
        ax.axhline(reference, color="grey", ls="--", lw=1, label=f"dense ({reference:.3f})")
    ax.set_xticks(sp_all)
    ax.set_xticklabels([f"{s:.0%}" for s in sp_all])
    ax.set_xlabel("global sparsity")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title)
    return save_figure(fig, path)


def verdict_table(doc: Mapping[str, Any]) -> str:
    """The README's table: per model and sparsity, Mix-and-Match against its best rival (the baseline with the
    smallest mean drop there), one-shot and fine-tuned: win, tie (within the pair's noise floor) or loss."""
    regimes = ("one-shot", "fine-tuned")
    lines = ["| model (dense test) | sparsity | " + " | ".join(regimes) + " |", "|---|---|---|---|"]
    for name, md in doc["models"].items():
        d = drops(md)
        for s, ours in sorted({(k[1], k[2]) for k in d if k[2] in OURS}):
            cells = []
            for regime in regimes:
                mm = d.get((regime, s, ours))
                rivals = {b: _stats(d[(regime, s, b)])[0] for b in FIGHT if d.get((regime, s, b))}
                if not mm or not rivals:
                    cells.append("–")
                    continue
                best = min(rivals, key=lambda b: rivals[b])
                m_mu, b_mu = _stats(mm)[0], rivals[best]
                verdict = ("not judged (1 seed)" if min(len(mm), len(d[(regime, s, best)])) < 2
                           else "tie" if abs(b_mu - m_mu) <= noise_floor(d, regime, s, (ours, best))
                           else "**win**" if m_mu < b_mu else "loss")
                cut = f" ({(b_mu - m_mu) / b_mu:.0%} smaller)" if verdict == "**win**" and b_mu > 0 else ""
                cells.append(f"{verdict} vs {LABEL[best]}: {m_mu:.2f} vs {b_mu:.2f}{cut}")
            label = f"{name} ({100 * md['dense']['test_accuracy_eval']:.2f} %)" if ours == "mm" else f"{name} + search"
            lines.append(f"| {label} | {s:.0%} | " + " | ".join(cells) + " |")
    for who, rows in (("", [c for c in lines[2:] if " + search |" not in c]), ("With the search", [c for c in lines[2:] if " + search |" in c])):
        if rows:
            tally = "; ".join(f"{regime} {sum(c.split('|')[3 + i].startswith(' **win**') for c in rows)} win(s), "
                              f"{sum(c.split('|')[3 + i].startswith(' tie') for c in rows)} tie(s), "
                              f"{sum(c.split('|')[3 + i].startswith(' loss') for c in rows)} loss(es)" for i, regime in enumerate(regimes))
            lines.append(f"\nAgainst the best rival of each cell: {tally}." if not who else f"{who}: {tally}.")
    return ("Cells: test-accuracy drop in points (lower is better; negative: above dense), Mix-and-Match's validation-chosen strategy vs the best "
            "of uniform, global magnitude, LAMP, SNIP, GraSP and ERK at that cell, mean over seeds; a tie is a difference "
            "within the larger seed std of the two, the reseed spread or 0.1 point; a win says how much smaller M&M's drop is" + (
                f"; a *+ search* line is M&M with the Optuna search around its pool ({doc.get('config', {}).get('search_trials')} trials, "
                "chosen on validation)" if any(
                    " + search |" in line for line in lines) else "") + ".\n\n" + "\n".join(lines))
