"""Runs of the methods that train no prompt: zero-shot CLIP and the linear probe.

Both classify the frozen CLIP's image features, so everything they read comes from the
prepared splits and the frozen-feature cache (the test crops and features a sweep keeps for
every method): zero-shot CLIP scores the test features with the hand-crafted classifier, the
linear probe fits lpclip's logistic regression on the features of the run's few-shot training
images (test transform) with C chosen on the few-shot validation images, then predicts the
test features. A run writes what a training run writes (config.json, results.json) into its
folder, so the sweep, resume and ``dpt-fast report`` treat it as any run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpt_fast.config import DPTConfig
from dpt_fast.data import DatasetSplits
from dpt_fast.data.records import Datum
from dpt_fast.engine.config import TrainConfig, cache_settings, config_to_dict
from dpt_fast.engine.device import autocast_dtype
from dpt_fast.engine.distributed import barrier
from dpt_fast.engine.eval_split import (
    TestSet,
    compute_frozen_features,
    frozen_features,
    prepare_test_set,
)
from dpt_fast.engine.metrics import classification_report, harmonic_mean
from dpt_fast.engine.run_folder import CONFIG_FILE, RESULTS_FILE, FolderLock, prepare_run_folder
from dpt_fast.engine.run_setup import check_writable, data_summary, model_config_for
from dpt_fast.engine.session import LoadedClip, Session
from dpt_fast.files import write_json
from dpt_fast.methods import create_method, get_method

log = logging.getLogger("dpt_fast")


def _features(model: Any, test_set: TestSet, config: TrainConfig, session: Session,
              clip: LoadedClip) -> torch.Tensor:
    """(N, E) frozen image features of ``test_set``: from the cache when it is on."""
    amp = autocast_dtype(config.precision, session.device)
    features = frozen_features(test_set, model, clip.cache_key(), session.device, amp,
                               cache_settings(config), batch_size=config.eval_batch_size)
    if features is None:
        features = compute_frozen_features(model, test_set.dataset, session.device, amp,
                                           config.eval_batch_size)
    return features.float()


def _prepared(items: Sequence[Datum], model: Any, config: TrainConfig) -> TestSet:
    """Training or validation images as the test transform gives them (lpclip's features)."""
    return prepare_test_set(items, model.geometry.image_size[0], cache_settings(config),
                            skip_unreadable=False, num_workers=config.num_workers)


def _report(predictions: torch.Tensor, test_set: TestSet, classnames: list[str]) -> dict:
    report = classification_report(predictions, torch.tensor(test_set.labels), classnames)
    if test_set.skipped:
        report["skipped_unreadable"] = list(test_set.skipped)
    return report


def _zero_shot_split(session: Session, config: TrainConfig, splits: DatasetSplits,
                     model_config: DPTConfig, clip: LoadedClip, subsample: str) -> dict:
    model = create_method(config.model.method, clip.module, splits.classnames, model_config)
    test_set = session.test_set(splits, subsample, model.geometry.image_size[0],
                                cache_settings(config), skip_unreadable=config.skip_unreadable,
                                num_workers=config.num_workers)
    with torch.no_grad():
        features = _features(model, test_set, config, session, clip).to(session.device)
        predictions = model.logits_from_features(features).argmax(-1).cpu()
    return _report(predictions, test_set, splits.classnames)


def check_val_shots(splits: DatasetSplits, shots: int) -> None:
    """Refuse a validation split with fewer images of a class than lpclip's rule asks."""
    from dpt_fast.linear_probe.search import val_shots

    if shots < 1:
        return  # all images: the whole validation split
    need = val_shots(shots)
    counts = Counter(item.label for item in splits.val)
    for label, name in enumerate(splits.classnames):
        if counts.get(label, 0) < need:
            raise ValueError(
                f"linear_probe on {splits.name}: class {name!r} has {counts.get(label, 0)} "
                f"validation image(s), fewer than the {need} that lpclip's rule takes for "
                f"{shots} shots; add validation images or use another method")


def _linear_probe(session: Session, config: TrainConfig, splits: DatasetSplits,
                  model_config: DPTConfig,
                  clip: LoadedClip) -> tuple[dict, dict]:
    """The test report and the search's record of a linear probe."""
    from dpt_fast.linear_probe.search import search_c

    if config.subsample != "all":
        raise ValueError("linear_probe learns one weight vector per training class: it has no "
                         "classifier for new classes; use --subsample all")
    if not splits.val:
        raise ValueError(f"linear_probe on {splits.name}: the dataset has no validation split "
                         "to choose C on; use another method")
    check_val_shots(splits, config.shots)
    model = create_method(config.model.method, clip.module, splits.classnames, model_config)
    parts = {}
    for name, items in (("train", splits.train), ("val", splits.val)):
        prepared = _prepared(items, model, config)
        # lpclip's features are float64 copies of the CLIP's output
        parts[name] = (_features(model, prepared, config, session, clip).double().numpy(),
                       np.asarray(prepared.labels))
    test_set = session.test_set(splits, config.subsample, model.geometry.image_size[0],
                                cache_settings(config), skip_unreadable=config.skip_unreadable,
                                num_workers=config.num_workers)
    test_features = _features(model, test_set, config, session, clip).double().numpy()
    result = search_c(parts["train"], parts["val"])
    model.set_classifier(result.classifier)
    predictions = torch.from_numpy(result.classifier.predict(test_features))
    search = {"C": float(result.c),
              "grid_val_accuracy": [float(a) for a in result.grid_accuracies],
              "steps": [{"c_left": float(s.c_left), "c_right": float(s.c_right),
                         "val_left": float(s.val_left), "val_right": float(s.val_right),
                         "C": float(s.c)} for s in result.steps],
              "train_images": len(parts["train"][1]), "val_images": len(parts["val"][1])}
    log.info("linear probe on %s: C = %g chosen on %d validation images", splits.name,
             result.c, len(parts["val"][1]))
    return _report(predictions, test_set, splits.classnames), search


def frozen_run_in_session(session: Session, config: TrainConfig, template_explicit: bool,
                          *, overwrite: bool = False, lock_held: bool = False) -> dict:
    """One run of a method whose ``training`` is ``"none"`` or ``"fit"`` (see
    :func:`dpt_fast.engine.run.run_in_session`, which hands such runs here); returns
    results.json's content."""
    method = get_method(config.model.method)
    output_dir = Path(config.output_dir)
    lock = FolderLock(output_dir)
    info = session.info
    try:
        if info.is_main:
            check_writable(output_dir)
            if not lock_held:
                lock.acquire()
            # Nothing to resume: a started run is done again from the start.
            prepare_run_folder(output_dir, resume=False,
                               overwrite=overwrite or config.resume)
        barrier(info)
        shots = config.shots if method.uses_shots else -1  # -1: the splits as they are
        splits = session.splits(config.dataset, config.root, shots, config.seed,
                                config.subsample)
        model_config = model_config_for(config, splits, template_explicit)
        run_config = dataclasses.replace(config, model=model_config)
        clip = session.clip(config.backbone, config.pretrained)
        data = data_summary(dataclasses.replace(config, shots=shots), splits)
        if not method.uses_shots:
            data.update(shots=0, train_images=0, effective_shots_min=0,
                        effective_shots_max=0)
        if info.is_main:
            write_json(output_dir / CONFIG_FILE, {**config_to_dict(run_config),
                                                  "clip": clip.record})
        results: dict[str, Any] = {"config": config_to_dict(run_config), "clip": clip.record,
                   "dataset": config.dataset, "classes": splits.classnames, "data": data,
                   "history": []}
        if method.training == "fit":
            if not splits.train:
                raise ValueError(f"{config.dataset} has no training images under "
                                 f"{config.root} to fit a linear probe on")
            results["test"], results["linear_probe"] = _linear_probe(
                session, run_config, splits, model_config, clip)
        else:
            results["test"] = _zero_shot_split(session, run_config, splits, model_config,
                                               clip, config.subsample)
            if config.subsample == "base":
                new = session.splits(config.dataset, config.root, -1, config.seed, "new")
                results["test_new"] = _zero_shot_split(
                    session, run_config, new, model_config_for(config, new, template_explicit),
                    clip, "new")
                results["harmonic_mean"] = harmonic_mean(results["test"]["accuracy"],
                                                         results["test_new"]["accuracy"])
        if info.is_main:
            write_json(output_dir / RESULTS_FILE, results)
            log.info("%s: test accuracy %.2f%%", method.name, results["test"]["accuracy"])
        return results
    finally:
        lock.release()


__all__ = ["check_val_shots", "frozen_run_in_session"]
