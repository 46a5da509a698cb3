"""``mixmatch demo``: the main job on an embedded default."""

from __future__ import annotations

import click

from mixmatch_plugin.app.cli.common import table


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="mixmatch-demo", show_default=True,
              help="Output folder for plan.json, summary.json, report.md and the plots.")
@click.option("--dataset", type=click.Choice(["auto", "fashion-mnist", "digits"]), default="auto", show_default=True,
              help="auto: Fashion-MNIST when installed (apt-get install dataset-fashion-mnist), else digits.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None, help="Folder with Fashion-MNIST IDX files.")
@click.option("--target", type=float, default=0.9, show_default=True, help="Global sparsity every method is matched to.")
@click.option("--finetune-steps", type=click.IntRange(1), default=100, show_default=True,
              help="Mask-keeping fine-tune budget, the same for every fine-tuned method.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quick", is_flag=True, help="Smaller everything (about 30 s): for smoke tests.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where trained checkpoints are cached (default ~/.cache/mixmatch or $MIXMATCH_CACHE).")
def command(out: str, dataset: str, data_dir: str | None, target: float, finetune_steps: int, seed: int, quick: bool,
            cache_dir: str | None) -> None:
    """Train a small model (or load it from the cache), build the 30 strategies, rank them on
    validation, prune with the best, compare with the baselines at the same sparsity, and report.

    \b
    Example:
      mixmatch demo                          # about 2 minutes on 2 CPU cores, training included
      mixmatch demo --target 0.8 --out demo80
    Outputs: OUT/plan.json (feed it to `mixmatch prune`), OUT/summary.json, OUT/report.md, OUT/*.png
    """
    from mixmatch_plugin.app.demo import run_demo
    from mixmatch_plugin.ranges import validate_ratio

    target = validate_ratio(target, "--target")
    r = run_demo(out, dataset=dataset, data_dir=data_dir, target=target, seed=seed, finetune_steps=finetune_steps,
                 quick=quick, cache_dir=cache_dir, echo=click.echo)

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}"

    rows = [(x["method"], pct(x["sparsity"]), pct(x["val_one_shot"]), pct(x["test_one_shot"]), pct(x["test_finetuned"]))
            for x in r.rows]
    click.echo(f"\n{r.model.split(':')[-1]} on {r.dataset}: every method prunes exactly {r.target:.0%} of the weights")
    click.echo(table(rows, ("method", "sparsity %", "val one-shot %", "test one-shot %", "test fine-tuned %")))
    click.echo(f"dense model: test {pct(r.dense_test)} %, and {pct(r.dense_finetuned)} % after the same fine-tune (the fine-tune "
               "continues a short dense training, so compare pruned rows with that number)")
    click.echo(f"validation chose {r.chosen}; {r.seconds:.0f} s wall, {sum(v[1] for v in r.phases.values()):.0f} s CPU. Files:")
    for path in r.files.values():
        click.echo(f"  {path}")
