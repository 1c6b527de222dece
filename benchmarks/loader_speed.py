"""Images/s of the training and test data pipelines on CPU workers, without and with caches.

    python benchmarks/loader_speed.py                        # defaults (~2-3 min on 2 cores)
    python benchmarks/loader_speed.py --out results.json     # also write the JSON to a file
    python benchmarks/loader_speed.py --classes 2 --train-per-class 4 --test-per-class 2 \\
        --workers 0 1 --image-size 32 --batch-size 4         # a smoke run

It writes photo-sized JPEGs (``--width`` x ``--height``, quality ``--quality``; smooth random
colour fields, edges and noise, so the files are as large as photos: ~50-100 KB) in the plain
``root/{train,test}/<class>/<image>.jpg`` layout, reads them with the project's reader, and
times whole passes of a DataLoader for each worker count (``--workers``):

training (batches of ``--batch-size`` in GlobalBatchSampler order, per-sample seeds):
  * ``uncached``: today's path: a fresh DataLoader per epoch; workers decode, RandomResizedCrop,
    flip, ToTensor, Normalize (float32 out);
  * ``uncached_uint8``: persistent workers, decoding every time, uint8 out (normalised on the
    device later): the saving of the uint8 output and of the per-epoch worker start-up;
  * ``cached``: persistent workers, each with its own decoded-image cache filled as it goes
    (DecodedImages, default bound), uint8 out; epoch 1 onward is reported (epoch 0 fills the
    caches). A worker only hits images it was given before, so with W workers epoch e hits
    about 1 - (1 - 1/W)^e of them: the exact simulated rates are reported with the times;
  * ``prefilled``: the main process decodes the set first (DecodedImages.prefill with one
    thread per core, timed on its own), forked workers share it: every access a hit.

test (batches of ``--batch-size``, a fresh DataLoader per pass, as evaluation builds one):
  * ``uncached``: decode, Resize, CenterCrop, ToTensor, Normalize in the workers;
  * ``cached``: reading uint8 crops from the crop cache file (``dpt_fast.data.crop_cache`` when
    it is importable, else a numpy memmap of the crops built here); the one-off build is timed
    on its own. The file was just written, so it is read from the page cache.

Each rate is images / wall seconds of whole passes. Today's path pays its worker start-up
every epoch, so its rate includes it; the persistent pipelines pay it once, in epoch 0, which is
reported on its own (``first_epoch_images_per_s``) while their rate is over the later epochs.
The main process runs one intra-op thread (as workers do): on a busy 2-core machine two threads
made a single ToTensor 40x slower. ``stage_ms_per_image`` splits one image's work into steps
(median ms in the main process, no DataLoader).

The verdict lines extrapolate linearly per core to a 16-core GPU machine (rate of one worker x
16; that machine's main process also needs CPU, so this is an upper estimate) against the
targets: >= 1,700 training images/s and >= 300 test images/s.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dpt_fast.data.datasets import image_folder_dataset
from dpt_fast.data.decoded import DecodedImages, default_cache_ram_bytes
from dpt_fast.data.loaders import EpochIndices, EpochSeededSamples, train_loader
from dpt_fast.data.loading import (
    ImageDataset,
    build_transforms,
    build_uint8_transforms,
    load_rgb,
)
from dpt_fast.data.records import Datum
from dpt_fast.engine.sampler import GlobalBatchSampler
from dpt_fast.seeding import SeededSamples


def _sibling(name: str):
    """``benchmarks/<name>.py`` as a module (the folder is not a package, and this script is
    also imported by tests, so it does not put its folder on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                  Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN_TARGET = 1700  # images/s on the 16-core GPU machine
TEST_TARGET = 300
TARGET_CORES = 16
SEED = 1
# Hit rates of per-worker caches on the target machine: 16 workers, a 16-shot 100-class set.
SIM_WORKERS, SIM_IMAGES, SIM_EPOCHS = 16, 1600, (1, 2, 5, 10, 20, 40, 59)


# ---------------------------------------------------------------------------- the images
def natural_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: a smooth random colour field, a few hard edges and sensor-like
    noise (JPEG sizes close to real photos' at the same quality)."""
    coarse = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC),
                       dtype=np.float32)
    y, x = _grid(width, height)
    for _ in range(3):  # straight edges: brighter or darker half-planes
        a, b = rng.normal(size=2)
        c = rng.uniform(-1, 1) * (width + height) / 2
        field += np.where(a * (x - width / 2) + b * (y - height / 2) > c, 1, -1)[..., None] \
            * rng.uniform(10, 40, 3)
    field += rng.normal(0, 10, field.shape)
    return Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))


@functools.cache
def _grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:height, 0:width]
    return y, x


def write_dataset(root: Path, classes: int, train_per_class: int, test_per_class: int,
                  width: int, height: int, quality: int) -> dict[str, float]:
    """JPEGs in ``root/{train,test}/<class>/``; returns their count and mean size."""
    rng = np.random.default_rng(0)
    sizes = []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                path = folder / f"img_{i:04d}.jpg"
                natural_image(rng, width, height).save(path, quality=quality)
                sizes.append(path.stat().st_size)
    return {"files": len(sizes), "mean_jpeg_kib": float(np.mean(sizes)) / 1024}


# ---------------------------------------------------------------------------- timing
def timed_pass(batches: Iterable) -> tuple[int, float]:
    """(images, seconds) of one pass over ``batches`` of (images, labels)."""
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in batches)
    return count, time.perf_counter() - start


def rate(passes: list[tuple[int, float]]) -> float:
    """Images/s over several passes (total images / total seconds)."""
    return sum(n for n, _ in passes) / max(sum(s for _, s in passes), 1e-9)


def simulated_hit_rates(n: int, batch_size: int, workers: int, epochs: int,
                        seed: int = SEED) -> list[float]:
    """Per epoch, the share of accesses that hit per-worker caches with no bound.

    The DataLoader hands batch b of each epoch to worker b mod W (its round robin restarts
    each epoch), and a worker hits an image it was given in an earlier epoch.
    """
    sampler = GlobalBatchSampler(n, batch_size, 0, 1, seed)
    seen: list[set[int]] = [set() for _ in range(max(workers, 1))]
    rates = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        hits = total = 0
        for b, batch in enumerate(sampler):
            cache = seen[b % len(seen)]
            hits += sum(i in cache for i in batch)
            total += len(batch)
            cache.update(batch)
        rates.append(hits / max(total, 1))
    return rates


# ---------------------------------------------------------------------------- training
def train_uncached(items: list[Datum], args, workers: int) -> dict:
    """Today's trainer: a fresh non-persistent DataLoader each epoch, float32 batches."""
    data = SeededSamples(ImageDataset(items, build_transforms(True, args.image_size)), SEED)
    sampler = GlobalBatchSampler(len(items), args.batch_size, 0, 1, SEED)
    passes = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        data.epoch = epoch
        passes.append(timed_pass(DataLoader(data, batch_sampler=sampler, num_workers=workers)))
    return {"images_per_s": rate(passes), "epochs": len(passes)}


def _persistent(images: DecodedImages, items: list[Datum], args, workers: int
                ) -> tuple[DataLoader, EpochIndices]:
    sampler = EpochIndices(GlobalBatchSampler(len(items), args.batch_size, 0, 1, SEED))
    loader = train_loader(EpochSeededSamples(images, SEED), sampler, workers, pin_memory=False)
    return loader, sampler


def _epochs(loader: DataLoader, sampler: EpochIndices, epochs: Iterable[int]
            ) -> list[tuple[int, float]]:
    passes = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        passes.append(timed_pass(loader))
    return passes


def train_uint8_uncached(items: list[Datum], args, workers: int) -> dict:
    images = DecodedImages(items, build_uint8_transforms(True, args.image_size), max_bytes=0)
    loader, sampler = _persistent(images, items, args, workers)
    return _steady(_epochs(loader, sampler, range(args.epochs + 1)))


def _steady(passes: list[tuple[int, float]]) -> dict:
    """Persistent workers: epoch 0 (worker start-up, cache filling) reported on its own,
    the rate over the later epochs."""
    return {"images_per_s": rate(passes[1:]), "epochs": len(passes) - 1,
            "first_epoch_images_per_s": rate(passes[:1]),
            "per_epoch_images_per_s": [rate([p]) for p in passes]}


def train_cached(items: list[Datum], args, workers: int) -> dict:
    bound = default_cache_ram_bytes(workers)
    images = DecodedImages(items, build_uint8_transforms(True, args.image_size),
                           max_bytes=bound)
    loader, sampler = _persistent(images, items, args, workers)
    passes = _epochs(loader, sampler, range(args.epochs + 1))
    hits = simulated_hit_rates(len(items), args.batch_size, workers, args.epochs + 1)
    return {**_steady(passes), "simulated_hit_rate_per_epoch": hits,
            "max_bytes_per_process": bound}


def train_prefilled(items: list[Datum], args, workers: int) -> dict:
    images = DecodedImages(items, build_uint8_transforms(True, args.image_size),
                           max_bytes=default_cache_ram_bytes(0))
    start = time.perf_counter()
    cached = images.prefill(threads=os.cpu_count() or 1)
    prefill_s = time.perf_counter() - start
    loader, sampler = _persistent(images, items, args, workers)
    return {**_steady(_epochs(loader, sampler, range(args.epochs + 1))),
            "prefill_images_per_s": cached / max(prefill_s, 1e-9), "prefilled": cached,
            "prefill_threads": os.cpu_count() or 1}


# ---------------------------------------------------------------------------- test
class MemmapCrops(Dataset):
    """Stand-in for the crop cache: uint8 (N, S, S, 3) crops in a raw memmap file, served as
    (3, S, S) uint8 tensors."""

    def __init__(self, path: str, shape: tuple[int, ...], labels: list[int]) -> None:
        self.path, self.shape, self.labels = path, shape, labels
        self._crops: np.memmap | None = None  # opened in the process that reads

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._crops is None:
            self._crops = np.memmap(self.path, np.uint8, "r", shape=self.shape)
        crop = np.ascontiguousarray(self._crops[index].transpose(2, 0, 1))
        return torch.from_numpy(crop), self.labels[index]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_crops": None}


def build_memmap_crops(items: list[Datum], image_size: int, folder: Path,
                       workers: int) -> MemmapCrops:
    """Decode, resize and centre-crop every test image once, into a memmap file (HWC rows,
    as the crop cache stores them)."""
    shape = (len(items), image_size, image_size, 3)
    path = folder / "test_crops.u8"
    crops = np.memmap(path, np.uint8, "w+", shape=shape)
    steps = build_uint8_transforms(False, image_size)
    loader = DataLoader(ImageDataset(items, steps), batch_size=args_batch(len(items)),
                        num_workers=workers)
    row = 0
    for images, _ in loader:
        crops[row:row + len(images)] = images.permute(0, 2, 3, 1).numpy()
        row += len(images)
    crops.flush()
    del crops
    return MemmapCrops(str(path), shape, [item.label for item in items])


def args_batch(n: int) -> int:
    return max(1, min(64, n))


def build_test_cache(items: list[Datum], args, folder: Path) -> tuple[Dataset, dict]:
    """The cached test crops as a Dataset, and how they were built (implementation, seconds)."""
    workers = max(args.workers)
    start = time.perf_counter()
    info: dict = {}
    try:
        from dpt_fast.data.crop_cache import CropDataset, cached_test_crops
        from dpt_fast.data.disk_cache import CacheSettings

        settings = CacheSettings(enabled=True, directory=folder / "cache")
        crops = cached_test_crops(items, args.image_size, settings, num_workers=workers)
        if crops is None:
            raise RuntimeError("cached_test_crops returned None (cache unusable)")
        dataset: Dataset = CropDataset(crops)
        info["implementation"] = "dpt_fast.data.crop_cache.cached_test_crops + CropDataset"
    except (ImportError, AttributeError, TypeError, RuntimeError) as exc:
        dataset = build_memmap_crops(items, args.image_size, folder, workers)
        info["implementation"] = "benchmark memmap stand-in"
        info["crop_cache_unavailable"] = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    info.update(build_seconds=seconds, build_images_per_s=len(items) / max(seconds, 1e-9),
                build_workers=workers)
    return dataset, info


def measure_test_passes(make_dataset: Callable[[], Dataset], args, workers: int) -> dict:
    passes = []
    for _ in range(args.epochs):
        loader = DataLoader(make_dataset(), batch_size=args.batch_size, num_workers=workers)
        passes.append(timed_pass(loader))
    return {"images_per_s": rate(passes), "passes": len(passes)}


# ---------------------------------------------------------------------------- stages
def stage_ms(items: list[Datum], image_size: int, limit: int = 64) -> dict[str, float]:
    """Median milliseconds per image of each step, in this process (one thread), on up to
    ``limit`` images: where a worker's time goes, without DataLoader start-up or transfer."""
    items = items[:limit]
    train_spatial = build_uint8_transforms(True, image_size).transforms[:-1]
    test_spatial = build_uint8_transforms(False, image_size).transforms[:-1]
    to_float = build_transforms(True, image_size).transforms[-2:]  # ToTensor, Normalize
    to_uint8 = build_uint8_transforms(True, image_size).transforms[-1]
    times: dict[str, list[float]] = {}

    def clock(name: str, fn: Callable, value):
        start = time.perf_counter()
        out = fn(value)
        times.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        return out

    def chain(steps: list[Callable]) -> Callable:
        return torchvision.transforms.Compose(steps)

    for item in items:
        image = clock("decode_jpeg_to_rgb", load_rgb, item.impath)
        pixels = clock("rgb_to_numpy (cache fill)", lambda im: np.array(im, np.uint8), image)
        image = clock("numpy_to_pil (cache hit)", Image.fromarray, pixels)
        crop = clock("random_resized_crop_flip", chain(train_spatial), image)
        clock("to_uint8_tensor", to_uint8, crop)
        clock("totensor_normalize", chain(to_float), crop)
        clock("resize_centre_crop (test)", chain(test_spatial), image)
    return {name: float(np.median(values)) for name, values in times.items()}


# ---------------------------------------------------------------------------- report
def machine_info() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu_model": model, "cores": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg()),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            "numpy": np.__version__}


def per_core(rates: dict[str, dict]) -> tuple[float, str] | None:
    """Images/s per worker process, from 1 worker if measured, else the most workers."""
    if "1" in rates:
        return rates["1"]["images_per_s"], "1 worker"
    counts = sorted(int(w) for w in rates)
    workers = counts[-1]
    return rates[str(workers)]["images_per_s"] / max(workers, 1), \
        f"{workers} workers / {max(workers, 1)}" if workers else "the main process"


def verdicts(results: dict) -> list[str]:
    lines = []
    for split, target in (("train", TRAIN_TARGET), ("test", TEST_TARGET)):
        for pipeline, rates in results[split].items():
            if not rates or pipeline == "cache_build":
                continue
            value, source = per_core(rates)
            estimate = value * TARGET_CORES
            verdict = "MET" if estimate >= target else "NOT met"
            lines.append(
                f"{split} {pipeline}: {value:,.0f} img/s per core here ({source}) -> "
                f"~{estimate:,.0f} img/s on {TARGET_CORES} cores (linear per-core "
                f"extrapolation, not measured) vs target >= {target:,}: {verdict}")
    return lines


def speedups(results: dict) -> dict:
    """Cached over uncached images/s, per worker count."""
    pairs = {"train_uint8_output": ("train", "uncached_uint8", "uncached"),
             "train_decoded_cache": ("train", "cached", "uncached"),
             "train_prefilled_cache": ("train", "prefilled", "uncached"),
             "test_crop_cache": ("test", "cached", "uncached")}
    out: dict = {}
    for name, (split, new, old) in pairs.items():
        new_rates, old_rates = results[split].get(new, {}), results[split].get(old, {})
        out[name] = {w: new_rates[w]["images_per_s"] / old_rates[w]["images_per_s"]
                     for w in new_rates if w in old_rates}
    return out


def run(args) -> dict:
    torch.set_num_threads(1)
    report: dict = {"benchmark": "loader_speed", "date": datetime.date.today().isoformat(),
                    "command": "python benchmarks/loader_speed.py " + " ".join(args.argv),
                    "machine": machine_info()}
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        files = write_dataset(root, args.classes, args.train_per_class, args.test_per_class,
                              args.width, args.height, args.quality)
        splits = image_folder_dataset(root, val_fraction=0.0)  # every train image trains
        train_items, test_items = list(splits.train), list(splits.test)
        report["settings"] = {
            **{k: v for k, v in vars(args).items() if k not in ("out", "root", "argv")},
            **files, "train_images": len(train_items), "test_images": len(test_items),
            "generate_seconds": time.perf_counter() - start}
        report["stage_ms_per_image"] = stage_ms(train_items, args.image_size)
        results: dict = {"train": {}, "test": {}}
        train = {"uncached": train_uncached, "uncached_uint8": train_uint8_uncached,
                 "cached": train_cached, "prefilled": train_prefilled}
        for name, measure in train.items():
            results["train"][name] = {str(w): measure(train_items, args, w)
                                      for w in args.workers}
        test_transform = build_transforms(False, args.image_size)
        results["test"]["uncached"] = {
            str(w): measure_test_passes(lambda: ImageDataset(test_items, test_transform), args, w)
            for w in args.workers}
        cached_set, build = build_test_cache(test_items, args, root)
        results["test"]["cached"] = {str(w): measure_test_passes(lambda: cached_set, args, w)
                                     for w in args.workers}
        results["test"]["cache_build"] = build
    report["results"] = results
    report["speedups"] = speedups(results)
    report["simulated_hit_rates_16_workers"] = {
        "images": SIM_IMAGES, "batch_size": args.batch_size, "workers": SIM_WORKERS,
        "epoch_to_hit_rate": dict(zip(
            map(str, SIM_EPOCHS),
            (simulated_hit_rates(SIM_IMAGES, args.batch_size, SIM_WORKERS,
                                 max(SIM_EPOCHS) + 1)[e] for e in SIM_EPOCHS), strict=True))}
    report["verdicts"] = verdicts(results)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--train-per-class", type=int, default=16, help="images (shots)")
    parser.add_argument("--test-per-class", type=int, default=16)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--image-size", type=int, default=224, help="crop side")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3,
                        help="timed passes per pipeline and worker count")
    parser.add_argument("--root", default=None, help="where the temporary images go")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        report = run(args)
    finally:
        torch.set_num_threads(threads)
    for line in report["verdicts"]:
        print(line, file=sys.stderr)
    _sibling("json_report").emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
