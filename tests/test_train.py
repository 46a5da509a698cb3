"""Dense training: an interrupted training resumes from its last epoch to the weights of an uninterrupted one."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace

import pytest
import torch

from mixmatch_plugin.app.train import TrainConfig, checkpoint_path, resume_path, train, train_cached
from mixmatch_plugin.models import build_model

CFG = TrainConfig(model="mixmatch_plugin.models:tiny_resnet", model_kwargs={"width": 8}, epochs=3, batch_size=64, lr=3e-3, max_train=256,
                  warmup_steps=5)


class Stop(KeyboardInterrupt):
    """Stands for Ctrl-C after an epoch."""


def _stop_after(epochs: int):
    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        if epoch + 1 == epochs:
            raise Stop

    return on_epoch


def _fresh(cfg: TrainConfig = CFG) -> torch.nn.Module:
    return build_model(cfg.model, model_kwargs=cfg.model_kwargs)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def uninterrupted(digits):
    model = _fresh()
    info = train(model, digits, CFG, progress=False)
    return model, info


def test_an_interrupted_training_resumes_to_the_weights_of_an_uninterrupted_one(digits, tmp_path, uninterrupted):
    ref, ref_info = uninterrupted
    state = resume_path(CFG, tmp_path)
    with pytest.raises(Stop):
        train(_fresh(), digits, CFG, progress=False, resume=state, on_epoch=_stop_after(2))
    assert torch.load(state, weights_only=True)["epoch"] == 2
    epochs_run: list[int] = []
    resumed = _fresh()
    info = train(resumed, digits, CFG, progress=False, resume=state, on_epoch=lambda e, row: epochs_run.append(e))
    assert epochs_run == [2]  # only the third epoch ran again
    assert _same_weights(resumed, ref)  # optimizer, schedule, data order and augmentation all continued exactly
    assert [h["val_accuracy"] for h in info["history"]] == [h["val_accuracy"] for h in ref_info["history"]]
    assert info["best_epoch"] == ref_info["best_epoch"]


def test_the_cache_resumes_an_interrupted_training_and_then_removes_its_state(digits, tmp_path, uninterrupted):
    ref, _ = uninterrupted
    state = resume_path(CFG, tmp_path)
    with pytest.raises(Stop):
        train(_fresh(), digits, CFG, progress=False, resume=state, on_epoch=_stop_after(1))
    assert state.exists() and not checkpoint_path(CFG, tmp_path).exists()
    model, info = train_cached(CFG, digits, cache_dir=tmp_path, progress=False)
    assert _same_weights(model, ref)
    assert len(info["history"]) == CFG.epochs
    assert checkpoint_path(CFG, tmp_path).exists() and not state.exists()


def test_a_state_from_another_configuration_or_a_broken_file_trains_from_scratch(digits, tmp_path, caplog, uninterrupted):
    ref, _ = uninterrupted
    other = replace(CFG, lr=1e-3)
    state = tmp_path / "state.pt"
    with pytest.raises(Stop):
        train(_fresh(other), digits, other, progress=False, resume=state, on_epoch=_stop_after(1))
    epochs_run: list[int] = []
    model = _fresh()
    with caplog.at_level(logging.WARNING, logger="mixmatch_plugin.app.train"):
        train(model, digits, CFG, progress=False, resume=state, on_epoch=lambda e, row: epochs_run.append(e))
    assert "another configuration" in caplog.text
    assert epochs_run == [0, 1, 2] and _same_weights(model, ref)
    for broken, why in ((b"not a checkpoint", "refusing to load"), (None, "it lacks history, model")):
        if broken is None:
            torch.save({"config": asdict(CFG), "epoch": 1, "seconds": 1.0, "best": {}, "optimizer": {}, "scheduler": {},
                        "augment_rng": None, "order_rng": None, "torch_rng": None}, state)
        else:
            state.write_bytes(broken)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mixmatch_plugin.app.train"):
            train(_fresh(), digits, CFG, progress=False, resume=state)
        assert "unusable" in caplog.text and why in caplog.text
