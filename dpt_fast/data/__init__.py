"""Datasets, few-shot splits and loaders for DPT, reading CoOp's on-disk layouts.

>>> from dpt_fast.data import build_dataset, build_transforms, ImageDataset
>>> data = build_dataset("oxford_pets", "/data", shots=16, seed=1)      # doctest: +SKIP
>>> train_set = ImageDataset(data.train, build_transforms(train=True))  # doctest: +SKIP

Modules: :mod:`.records` (the Datum record), :mod:`.pickling` (Dassl-compatible, restricted
pickle files), :mod:`.fewshot` (Dassl's few-shot draws, CoOp's cache and base/new split),
:mod:`.readers` (CoOp's layouts), :mod:`.datasets` (registry and builders), :mod:`.loading`
(transforms and the image Dataset; the training engine seeds and
batches it, see :mod:`dpt_fast.seeding`).
"""

from dpt_fast.data.datasets import (
    DATASETS,
    DatasetSpec,
    DatasetSplits,
    build_dataset,
    get_dataset_spec,
    image_folder_dataset,
)
from dpt_fast.data.fewshot import (
    MAX_VAL_SHOTS,
    fewshot_path,
    generate_fewshot,
    load_or_create_fewshot,
    sample_fewshot_splits,
    split_by_label,
    subsample_classes,
)
from dpt_fast.data.loading import (
    CLIP_MEAN,
    CLIP_STD,
    ImageDataset,
    ImageReadError,
    build_transforms,
)
from dpt_fast.data.pickling import (
    RestrictedUnpickler,
    dumps_dassl_compatible,
    loads_restricted,
    read_datum_splits,
    write_datum_splits,
)
from dpt_fast.data.records import Datum

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASETS",
    "MAX_VAL_SHOTS",
    "DatasetSpec",
    "DatasetSplits",
    "Datum",
    "ImageDataset",
    "ImageReadError",
    "RestrictedUnpickler",
    "build_dataset",
    "build_transforms",
    "dumps_dassl_compatible",
    "fewshot_path",
    "generate_fewshot",
    "get_dataset_spec",
    "image_folder_dataset",
    "load_or_create_fewshot",
    "loads_restricted",
    "read_datum_splits",
    "sample_fewshot_splits",
    "split_by_label",
    "subsample_classes",
    "write_datum_splits",
]
