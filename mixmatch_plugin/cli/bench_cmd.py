"""``mixmatch bench``: the real-data comparison on Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("bench")
@click.option("--quick", is_flag=True, help="Reduced sizes (tiny models, 2 seeds, subsets): a few minutes, for CI.")
@click.option("--models", default=None, help="Comma-separated subset of the models (resnet18, vit, swin; quick: resnet, swin).")
@click.option("--seeds", default=None, help="Comma-separated seeds (default 0,1,2; quick 0,1).")
@click.option("--out", type=click.Path(file_okay=False), default="benchmarks/results", show_default=True,
              help="Folder for the results JSON and the plots.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None, help="Folder with Fashion-MNIST IDX files.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Checkpoint cache (default ~/.cache/mixmatch).")
@click.option("--update-readme", type=click.Path(dir_okay=False), default=None,
              help="Regenerate the table between <!-- bench:start --> and <!-- bench:end --> in this README.")
@click.option("--fresh", is_flag=True, help="Ignore earlier partial results instead of resuming them.")
@click.option("--no-structured", is_flag=True, help="Skip the structured (Torch-Pruning) rows.")
@click.option("--tiny", is_flag=True, hidden=True,
              help="Seconds-sized smoke configuration (OUT/tiny.json), for the interruption tests; not a benchmark.")
def command(quick: bool, models: str | None, seeds: str | None, out: str, data_dir: str | None, cache_dir: str | None,
            update_readme: str | None, fresh: bool, no_structured: bool, tiny: bool) -> None:
    """Compare Mix-and-Match with uniform, global magnitude, SNIP, GraSP, LAMP and ERK on real
    Fashion-MNIST, at exactly matched sparsity, one-shot and after the same fine-tune, over seeds.

    \b
    Example:
      mixmatch bench --quick                             # about 5 minutes, smoke-sized
      mixmatch bench --update-readme README.md           # the full run; trains dense models once (cached)
    Resumes an interrupted run from OUT/full.json (or quick.json) unless --fresh.
    """
    from ..bench import tables
    from ..bench.run import BenchConfig, run
    from ..errors import MixMatchError

    if update_readme:  # checked before hours of work, not after
        readme = Path(update_readme)
        if not readme.is_file() or "<!-- bench:start -->" not in readme.read_text(encoding="utf-8", errors="replace"):
            raise MixMatchError(f"--update-readme {update_readme}: no such file with <!-- bench:start --> / <!-- bench:end --> markers")
    cfg = BenchConfig.tiny() if tiny else BenchConfig.quick() if quick else BenchConfig.full()
    if models:
        wanted = [m.strip() for m in models.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in cfg.models]
        if unknown:
            raise MixMatchError(f"unknown benchmark model {unknown[0]!r}; choose from {', '.join(cfg.models)}")
        cfg.models = {m: cfg.models[m] for m in wanted}
    if seeds:
        try:
            cfg.seeds = tuple(int(s) for s in seeds.split(","))
        except ValueError:
            raise MixMatchError(f"--seeds {seeds!r} must be comma-separated integers") from None
    if no_structured:
        cfg.structured = False
    res = run(cfg, out, quick=quick, data_dir=data_dir, cache_dir=cache_dir, fresh=fresh, name="tiny" if tiny else None)
    files = tables.plots(res.doc, Path(out))
    cmd = "mixmatch bench" + (" --tiny" if tiny else " --quick" if quick else "") + (f" --models {models}" if models else "")
    md = tables.markdown(res.doc, command=cmd)
    res.doc["markdown"] = md
    res.doc["plots"] = files
    from ..io import atomic_write_json

    atomic_write_json(res.path, res.doc)
    click.echo(md)
    click.echo(f"\nresults: {res.path}; plots: {', '.join(files.values())}")
    if update_readme:
        section = md + "\n\n" + "\n".join(f"![{k}]({Path(v).as_posix()})" for k, v in files.items())
        if not tables.update_readme(update_readme, section):
            raise MixMatchError(f"{update_readme} has no <!-- bench:start --> / <!-- bench:end --> markers")
        click.echo(f"updated {update_readme}")
