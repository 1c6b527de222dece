"""The protocols of the CoOp family, end to end: train + evaluate, evaluate a checkpoint.

* few-shot on all classes: ``train_run`` with subsample="all";
* base-to-new: ``train_run`` with subsample="base" also evaluates the new classes and reports
  the harmonic mean;
* cross-dataset and domain generalisation: ``eval_run`` of a checkpoint on another dataset
  (its classes may differ: the class-independent prompts transfer, see
  :func:`dpt_fast.state_dict_transfer.load_for_classes`).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dpt_fast import checkpoint as ckpt
from dpt_fast.backbone import check_activation
from dpt_fast.base import DPTBase
from dpt_fast.config import DPTConfig
from dpt_fast.config_fields import PER_DATASET, config_diff, fields_with
from dpt_fast.data import DatasetSplits
from dpt_fast.data.decoded import DecodedImages, default_cache_ram_bytes
from dpt_fast.data.loading import build_uint8_transforms
from dpt_fast.engine.config import TrainConfig, cache_settings, config_to_dict, progress_settings
from dpt_fast.engine.device import autocast_dtype
from dpt_fast.engine.distributed import barrier
from dpt_fast.engine.eval_split import TestSet, frozen_features
from dpt_fast.engine.evaluation import evaluate
from dpt_fast.engine.frozen_run import frozen_run_in_session
from dpt_fast.engine.metrics import harmonic_mean
from dpt_fast.engine.official_backbone import official_backbone
from dpt_fast.engine.recipe import describe_recipe
from dpt_fast.engine.run_folder import (
    CONFIG_FILE,
    LAST_CHECKPOINT,
    RESULTS_FILE,
    FolderLock,
    check_folder_flags,
    prepare_run_folder,
)
from dpt_fast.engine.run_setup import check_writable, data_summary, model_config_for
from dpt_fast.engine.session import LoadedClip, Session
from dpt_fast.engine.tensorboard import (
    TENSORBOARD_DIR,
    RunSummaries,
    check_tensorboard_available,
)
from dpt_fast.engine.trainer import Trainer
from dpt_fast.files import write_json
from dpt_fast.methods import create_method, get_method
from dpt_fast.seeding import seed_all
from dpt_fast.state_dict_transfer import load_for_classes

log = logging.getLogger("dpt_fast")

def _eval_split(model: DPTBase, test_set: TestSet, config: TrainConfig, session: Session,
                clip: LoadedClip, desc: str) -> dict:
    """Accuracy on a prepared test split; the frozen features from the cache when it is on."""
    device, info = session.device, session.info
    amp = autocast_dtype(config.precision, device)
    frozen = None
    if model.uses_frozen_image:
        # In evaluation-sized batches: the same kernels as the uncached pass, the same values.
        frozen = frozen_features(test_set, model, clip.cache_key(), device, amp,
                                 cache_settings(config), batch_size=config.eval_batch_size)
    report = evaluate(model, test_set.dataset, test_set.labels, device=device, info=info,
                      batch_size=config.eval_batch_size, num_workers=config.num_workers,
                      amp_dtype=amp, desc=desc, progress=progress_settings(config),
                      frozen=frozen)
    if test_set.skipped:
        report["skipped_unreadable"] = list(test_set.skipped)
    return report


def _test_set(session: Session, splits: DatasetSplits, config: TrainConfig, subsample: str,
              image_size: int) -> TestSet:
    return session.test_set(splits, subsample, image_size, cache_settings(config),
                            skip_unreadable=config.skip_unreadable,
                            num_workers=config.num_workers)


def _training_images(splits: DatasetSplits, config: TrainConfig,
                     image_size: int) -> DecodedImages:
    """The training split as uint8 crops, each image decoded once.

    Where the loader's workers are forked (Linux's default) or there are none, the images are
    decoded here, before the workers start: forked workers share the pixels (one copy, every
    access a hit from the first epoch), and an unreadable training image stops the run now.
    Elsewhere each worker fills its own cache as it goes. ``--cache-ram-gb`` bounds the pixels
    kept (per process when each worker keeps its own).
    """
    # allow_none: asking must not fix the start method; the first listed is the default.
    method = multiprocessing.get_start_method(allow_none=True) or \
        multiprocessing.get_all_start_methods()[0]
    shared = config.num_workers == 0 or method == "fork"
    if config.cache_ram_gb > 0:
        max_bytes = int(config.cache_ram_gb * 2**30)
    else:
        # Every training process of this machine (torchrun's local ranks) keeps its own copy.
        processes = (1 if shared else max(config.num_workers, 1)) * int(
            os.environ.get("LOCAL_WORLD_SIZE", "1"))
        max_bytes = default_cache_ram_bytes(processes)
    images = DecodedImages(splits.train, build_uint8_transforms(True, image_size),
                           max_bytes=max_bytes)
    if shared:
        images.prefill(threads=min(8, os.cpu_count() or 1))
    return images


def _log_start(config: TrainConfig, data: dict, device: torch.device) -> None:
    """One line that says what the run is about to do."""
    shots = "all" if config.shots < 1 else str(config.shots)
    if config.shots >= 1 and data["effective_shots_min"] < config.shots:
        shots += f" (effective {data['effective_shots_min']}-{data['effective_shots_max']})"
    precision = autocast_dtype(config.precision, device)
    log.info("%s: %d classes, %d train / %d val / %d test images, shots %s | %s (%s) | %s | %s",
             config.dataset, data["classes"], data["train_images"], data["val_images"],
             data["test_images"], shots, config.backbone, config.pretrained, device,
             "fp32" if precision is None else f"{str(precision).removeprefix('torch.')} autocast")
    log.info(describe_recipe(config))
    if config.shots >= 1 and data["effective_shots_min"] < config.shots:
        log.warning("some classes have fewer than %d training images: they keep all of theirs "
                    "(%d to %d per class)", config.shots, data["effective_shots_min"],
                    data["effective_shots_max"])


def train_run(config: TrainConfig, template_explicit: bool = False, *,
              overwrite: bool = False) -> dict:
    """Train on ``config.dataset`` and evaluate on its test split (base and new classes for
    subsample="base"); writes checkpoint-last.safetensors and results.json to output_dir.

    One run in a session of its own: :func:`run_in_session` (which a sweep calls for each of
    its runs) says what a run does.
    """
    check_folder_flags(config.resume, overwrite)
    if config.tensorboard:
        check_tensorboard_available()
    with Session(config.device) as session:
        return run_in_session(session, config, template_explicit, overwrite=overwrite)


def _load_run_data(session: Session, config: TrainConfig
                   ) -> tuple[DatasetSplits, DatasetSplits | None]:
    """The run's splits, and the new classes' for subsample="base"; refuses data a run cannot
    train on, before any work."""
    splits = session.splits(config.dataset, config.root, config.shots, config.seed,
                            config.subsample)
    if not splits.train:
        raise ValueError(f"{config.dataset} has no training images under {config.root} "
                         "(test-only datasets such as imagenet_r are for `dpt-fast eval` "
                         "of a checkpoint trained elsewhere)")
    new = None
    if config.subsample == "base":
        new = session.splits(config.dataset, config.root, config.shots, config.seed, "new")
        if not new.classnames or not new.test:
            raise ValueError(
                f"--subsample base: {config.dataset} under {config.root} has "
                f"{splits.num_classes} class(es), which leaves no new classes to evaluate; "
                "use --subsample all")
    return splits, new


def run_in_session(session: Session, config: TrainConfig, template_explicit: bool = False, *,
                   overwrite: bool = False, lock_held: bool = False) -> dict:
    """One training run in ``session`` (which holds the device, the CLIP and the datasets it
    shares with other runs): train, evaluate, write the run folder; returns results.json's
    content. The run owns its folder, few-shot split, model, optimizer and data loaders.

    An output folder that holds a run is refused unless ``config.resume`` (continue it) or
    ``overwrite`` (remove its files first); the folder is locked while the run writes it.
    Everything that can be checked before training (data, classes, the folder) is.
    ``lock_held``: the caller (a sweep, which claims runs) holds the folder's lock already.
    """
    check_folder_flags(config.resume, overwrite)
    if get_method(config.model.method).training != "sgd":  # zero-shot CLIP, linear probe
        return frozen_run_in_session(session, config, template_explicit, overwrite=overwrite,
                                     lock_held=lock_held)
    info, device = session.info, session.device
    output_dir = Path(config.output_dir)
    lock = FolderLock(output_dir)
    summaries = None
    try:
        if info.is_main:
            check_writable(output_dir)
            if not lock_held:
                lock.acquire()
            prepare_run_folder(output_dir, resume=config.resume, overwrite=overwrite)
        barrier(info)
        splits, new = _load_run_data(session, config)
        data = data_summary(config, splits)
        _log_start(config, data, device)
        model_config = model_config_for(config, splits, template_explicit)
        clip = session.clip(config.backbone, config.pretrained)
        seed_all(config.seed)  # same prompt initialisation on every process
        model = create_method(model_config.method, clip.module, splits.classnames, model_config)
        image_size = model.geometry.image_size[0]
        # Before training: every test image is read now (an unreadable one stops the run
        # here, not after the training), and the crops are cached for every later evaluation.
        test_set = _test_set(session, splits, config, config.subsample, image_size)
        new_test = _test_set(session, new, config, "new", image_size) if new else None
        data["test_images_skipped"] = len(test_set.skipped) + (
            len(new_test.skipped) if new_test else 0)
        train_set = _training_images(splits, config, image_size)
        run_config = dataclasses.replace(config, model=model_config)
        trainer = Trainer(model, run_config, train_set, device, info, output_dir,
                          clip_info=clip.record)
        if config.resume and trainer.checkpoint_path().is_file():
            trainer.resume()
        if info.is_main and not config.resume:  # a fresh start: no curves of an old run
            shutil.rmtree(output_dir / TENSORBOARD_DIR, ignore_errors=True)
        # Resumed: what a crashed attempt logged after the checkpoint's last step goes (the
        # checkpoint's own epoch, logged at that step, stays).
        summaries = RunSummaries(
            output_dir, config.tensorboard and info.is_main,
            purge_step=trainer.start_epoch * trainer.steps_per_epoch() + 1
            if config.resume else None)
        trainer.summaries = summaries
        if info.is_main:
            write_json(output_dir / CONFIG_FILE, {**config_to_dict(run_config),
                                                  "clip": clip.record})
            summaries.config({**config_to_dict(run_config), "clip": clip.record})
        history = trainer.fit(
            lambda: _eval_split(model, test_set, run_config, session, clip, "test"))
        trainer.close()  # the training loader's workers are done
        results: dict[str, Any] = {"config": config_to_dict(run_config), "clip": clip.record,
                                   "dataset": config.dataset, "classes": splits.classnames,
                                   "data": data, "history": history}
        final_step = config.epochs * trainer.steps_per_epoch()
        results["test"] = _eval_split(model, test_set, run_config, session, clip, "test")
        summaries.evaluation("test", results["test"], final_step)
        if new is not None and new_test is not None:
            new_model = create_method(model_config.method, clip.module, new.classnames,
                                      model_config)
            load_for_classes(new_model, model.state_dict())
            results["test_new"] = _eval_split(new_model, new_test, run_config, session, clip,
                                              "new")
            results["harmonic_mean"] = harmonic_mean(results["test"]["accuracy"],
                                                     results["test_new"]["accuracy"])
            summaries.evaluation("test_new", results["test_new"], final_step)
            summaries.scalars({"test/harmonic_mean": results["harmonic_mean"]}, final_step)
        if info.is_main:
            write_json(output_dir / RESULTS_FILE, results)
            log.info("test accuracy %.2f%%", results["test"]["accuracy"])
        return results
    finally:
        if summaries is not None:
            summaries.close()
        lock.release()


def _checkpoint_run_config(config: TrainConfig, saved: dict,
                           explicit: frozenset[str]) -> tuple[TrainConfig, bool]:
    """The config to evaluate a dpt_fast checkpoint with, and whether its template is fixed.

    The model config is the checkpoint's: a model field the user set to another value (other
    than the template) is refused rather than ignored. Backbone and weights default to the
    checkpoint's; set explicitly to something else, they are used with a warning. The template:
    the user's if given, else the training template on the same dataset, else the dataset's.
    """
    per_dataset = fields_with(DPTConfig, PER_DATASET)
    refused = sorted(change.name for change in config_diff(
        DPTConfig, saved["model"], dataclasses.asdict(config.model), skip=per_dataset)
        if change.name in explicit)
    if refused:
        raise ValueError(f"eval --checkpoint uses the checkpoint's model config; drop the "
                         f"model settings {refused}, which differ from it (only the template "
                         "may change)")
    model_config = DPTConfig(**saved["model"])
    model_config = dataclasses.replace(model_config, **{
        name: getattr(config.model, name) for name in per_dataset & explicit})
    changes: dict[str, Any] = {"model": model_config}
    for name in ("backbone", "pretrained"):
        if name not in explicit:
            changes[name] = saved[name]
        elif getattr(config, name) != saved[name]:
            log.warning("evaluating with %s %s; the checkpoint was trained with %s", name,
                        getattr(config, name), saved[name])
    template_fixed = "template" in explicit or saved["dataset"] == config.dataset
    return dataclasses.replace(config, **changes), template_fixed


def eval_run(config: TrainConfig, *, checkpoint: str | None = None,
             official_dir: str | None = None, official_epoch: int | None = None,
             explicit: frozenset[str] = frozenset()) -> dict:
    """Evaluate prompts on ``config.dataset``'s test split: a dpt_fast checkpoint (its saved
    config is used, see ``_checkpoint_run_config``) or the authors' checkpoint directory
    (``config.model`` describes it). ``explicit``: the config fields the user set."""
    with Session(config.device) as session:
        return eval_in_session(session, config, checkpoint=checkpoint,
                               official_dir=official_dir, official_epoch=official_epoch,
                               explicit=explicit)


def eval_in_session(session: Session, config: TrainConfig, *, checkpoint: str | None = None,
                    official_dir: str | None = None, official_epoch: int | None = None,
                    explicit: frozenset[str] = frozenset(), output_name: str | None = None
                    ) -> dict:
    """:func:`eval_run` in ``session``; writes ``output_name`` (default
    ``eval_<dataset>_<subsample>.json``) in ``config.output_dir``."""
    info = session.info
    method = get_method(config.model.method)
    if method.training != "sgd" and checkpoint is None:
        raise ValueError(f"eval --official-dir reads the authors' prompts; --method "
                         f"{method.name} has none: run `dpt-fast train --method {method.name}`")
    out = Path(config.output_dir)
    if info.is_main:
        check_writable(out)
    state = meta = None
    template_explicit = "template" in explicit
    if checkpoint is not None:
        tensors, meta = ckpt.read_checkpoint(checkpoint)
        state = ckpt.model_state(tensors)
        config, template_explicit = _checkpoint_run_config(config, meta["config"], explicit)
    elif official_dir is None:
        raise ValueError("eval needs --checkpoint or --official-dir")
    else:
        chosen = bool({"backbone", "recipe"} & explicit)
        config = dataclasses.replace(config, backbone=official_backbone(
            official_dir, config.backbone, chosen))
    splits = session.splits(config.dataset, config.root, -1, config.seed, config.subsample)
    model_config = config.model
    if not template_explicit:
        model_config = dataclasses.replace(model_config, template=splits.template)
    clip = session.clip(config.backbone, config.pretrained)
    if meta is not None and checkpoint is not None:
        check_activation(meta.get("clip"), clip.module, checkpoint)
    model = create_method(model_config.method, clip.module, splits.classnames, model_config)
    if state is not None:
        load_for_classes(model, state)
    else:
        assert official_dir is not None  # without a checkpoint (checked above)
        model.load_official_checkpoint(official_dir, official_epoch,
                                       load_layer_classifiers=False)
    test_set = _test_set(session, splits, config, config.subsample, model.geometry.image_size[0])
    report = _eval_split(model, test_set, config, session, clip, "test")
    results = {"dataset": config.dataset, "checkpoint": checkpoint or official_dir,
               "clip": clip.record, "test": report}
    if info.is_main:
        write_json(out / (output_name or f"eval_{config.dataset}_{config.subsample}.json"),
                   results)
    return results


__all__ = ["LAST_CHECKPOINT", "eval_in_session", "eval_run", "run_in_session", "train_run"]
