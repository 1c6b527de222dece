"""The evaluation disk caches: crops identical to the uncached transforms, hits without decoding,
stale and damaged files rebuilt with one warning, unwritable folders and full disks falling back
to no cache, unreadable images, concurrent builders, and the frozen-feature cache."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from dpt_fast.data import cache_file, crop_cache, disk_cache
from dpt_fast.data.crop_cache import CropDataset, cached_test_crops, crops_key_digest
from dpt_fast.data.device_batches import normalize_uint8
from dpt_fast.data.disk_cache import (
    CacheSettings,
    CacheWarning,
    cached_features,
    default_cache_dir,
    module_weights_digest,
)
from dpt_fast.data.loading import ImageReadError, build_transforms, load_rgb
from dpt_fast.data.records import Datum
from dpt_fast.files import orphan_temporaries

SIZE = 24


@pytest.fixture(autouse=True)
def _fresh_warning_state():
    disk_cache._WARNED.clear()  # "once per cause" is per process; each test starts afresh
    yield
    disk_cache._WARNED.clear()


def write_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> Path:
    """Random pixels (so that resampling differences would show) in ``mode``, saved by suffix."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    # A palette image from RGB: from RGBA it would carry transparency, which PIL warns about.
    (image.convert("RGB").convert("P") if mode == "P" else image.convert(mode)).save(path)
    return path


def make_items(folder: Path, n: int = 4) -> list[Datum]:
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(113, 203, "RGB", "jpg"), (203, 113, "RGB", "png"), (64, 64, "L", "png"),
              (50, 77, "RGBA", "png"), (90, 60, "P", "png"), (31, 40, "RGB", "jpg")]
    items = []
    for i in range(n):
        w, h, mode, ext = shapes[i % len(shapes)]
        path = write_image(folder / f"img{i}.{ext}", w, h, mode, seed=i)
        items.append(Datum(str(path), i % 3, f"class{i % 3}"))
    return items


def spatial(image: Image.Image, image_size: int) -> Image.Image:
    """The uncached resize and centre crop."""
    for step in crop_cache.spatial_transforms(image_size):
        image = step(image)
    return image


def settings_for(root: Path, **kw) -> CacheSettings:
    return CacheSettings(enabled=True, directory=root, **kw)


def record(fn):
    """``fn()`` and the CacheWarnings it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, CacheWarning)]


@pytest.fixture
def decodes(monkeypatch):
    """Counts load_rgb calls made by the crop builder."""
    calls: list[str] = []

    def counting(path: str) -> Image.Image:
        calls.append(path)
        return load_rgb(path)

    monkeypatch.setattr(crop_cache, "load_rgb", counting)
    return calls


def cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.bin"))


def temporaries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.tmp"))


# --- the crops are today's transforms -----------------------------------------------------------

@pytest.mark.parametrize(("image_size", "num_workers"), [(SIZE, 0), (23, 0), (SIZE, 2)])
def test_crops_equal_uncached_transforms(tmp_path, image_size, num_workers):
    items = make_items(tmp_path / "images", 6)
    crops = cached_test_crops(items, image_size, settings_for(tmp_path / "cache"),
                              num_workers=num_workers)
    assert crops.crops.shape == (6, image_size, image_size, 3) and crops.crops.dtype == np.uint8
    assert not crops.crops.flags.writeable
    transform = build_transforms(train=False, image_size=image_size)
    dataset = CropDataset(crops)
    for i, item in enumerate(items):
        pil = spatial(load_rgb(item.impath), image_size)
        image, label = dataset[i]
        assert image.dtype == torch.uint8 and image.shape == (3, image_size, image_size)
        assert label == item.label
        # ToTensor of the cached crop is ToTensor of the transformed image, bit for bit ...
        assert torch.equal(image.float().div(255), T.ToTensor()(pil))
        # ... and the normalised batch is today's test transform, bit for bit.
        assert torch.equal(normalize_uint8(image[None])[0], transform(load_rgb(item.impath)))
    np.testing.assert_array_equal(crops.labels, [item.label for item in items])
    np.testing.assert_array_equal(crops.indices, np.arange(6))
    assert crops.key_digest == crops_key_digest(items, image_size)


def test_dataloader_gives_uint8_batches_and_pickles_as_a_file_reference(tmp_path):
    items = make_items(tmp_path / "images", 5)
    crops = cached_test_crops(items, SIZE, settings_for(tmp_path / "cache"))
    dataset = CropDataset(crops)
    payload = pickle.dumps(dataset)
    assert len(payload) < crops.crops.nbytes  # the pixels are not in the pickle
    clone = pickle.loads(payload)
    assert torch.equal(clone[3][0], dataset[3][0])
    images, labels = next(iter(DataLoader(dataset, batch_size=5)))
    assert images.dtype == torch.uint8 and images.shape == (5, 3, SIZE, SIZE)
    assert labels.tolist() == [item.label for item in items]


def test_a_worker_refuses_a_crop_file_rebuilt_since(tmp_path):
    """A spawned worker maps the file again by name: if another process rebuilt the entry in
    between (a new file under the same name), its rows may not be these labels' any more."""
    items = make_items(tmp_path / "images", 4)
    crops = cached_test_crops(items, SIZE, settings_for(tmp_path / "cache"))
    payload = pickle.dumps(CropDataset(crops))
    replacement = crops.path.with_name("replacement.bin")
    replacement.write_bytes(crops.path.read_bytes())
    os.replace(replacement, crops.path)  # what a rebuild does: a new file, the same name
    with pytest.raises(RuntimeError, match="was replaced"):
        pickle.loads(payload)


def test_hit_does_not_decode_again(tmp_path, decodes):
    items = make_items(tmp_path / "images", 4)
    settings = settings_for(tmp_path / "cache")
    first, warned = record(lambda: cached_test_crops(items, SIZE, settings))
    assert len(decodes) == 4 and not warned
    second, warned = record(lambda: cached_test_crops(items, SIZE, settings))
    assert len(decodes) == 4 and not warned
    np.testing.assert_array_equal(first.crops, second.crops)
    assert len(cache_files(tmp_path / "cache")) == 1 and not temporaries(tmp_path / "cache")


def test_empty_item_list(tmp_path):
    crops = cached_test_crops([], SIZE, settings_for(tmp_path / "cache"))
    assert crops.crops.shape == (0, SIZE, SIZE, 3)
    assert cached_test_crops([], SIZE, settings_for(tmp_path / "cache")).crops.shape[0] == 0


# --- stale and damaged files ----------------------------------------------------------------------

def test_touched_image_is_rebuilt_with_one_warning(tmp_path, decodes):
    items = make_items(tmp_path / "images", 3)
    settings = settings_for(tmp_path / "cache")
    cached_test_crops(items, SIZE, settings)
    st = os.stat(items[1].impath)
    os.utime(items[1].impath, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    _, warned = record(lambda: cached_test_crops(items, SIZE, settings))
    assert len(warned) == 1 and "outdated" in str(warned[0].message)
    assert len(decodes) == 6
    _, warned = record(lambda: cached_test_crops(items, SIZE, settings))
    assert not warned and len(decodes) == 6
    assert len(cache_files(tmp_path / "cache")) == 1  # replaced, not kept beside


def test_rewritten_image_is_never_served_from_the_old_cache(tmp_path):
    items = make_items(tmp_path / "images", 3)
    settings = settings_for(tmp_path / "cache")
    cached_test_crops(items, SIZE, settings)
    st = os.stat(items[0].impath)
    write_image(Path(items[0].impath), 113, 203, seed=99)
    os.utime(items[0].impath, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # even 1 ns later
    crops, warned = record(lambda: cached_test_crops(items, SIZE, settings))
    assert len(warned) == 1
    expected = np.array(spatial(load_rgb(items[0].impath), SIZE))
    np.testing.assert_array_equal(crops.crops[0], expected)


def test_other_file_list_or_image_size_is_another_entry(tmp_path, decodes):
    """A different test set (base/new halves) or image size (another backbone) is a different
    entry, built into its own file: never a hit on the other one, and no warning."""
    items = make_items(tmp_path / "images", 4)
    settings = settings_for(tmp_path / "cache")
    full = cached_test_crops(items, SIZE, settings)
    part, warned = record(lambda: cached_test_crops(items[:3], SIZE, settings))
    assert not warned and len(decodes) == 7 and part.crops.shape[0] == 3
    reordered = cached_test_crops(items[::-1], SIZE, settings)
    np.testing.assert_array_equal(reordered.crops, full.crops[::-1])
    bigger, warned = record(lambda: cached_test_crops(items, SIZE + 8, settings))
    assert not warned and bigger.crops.shape == (4, SIZE + 8, SIZE + 8, 3)
    assert len(decodes) == 15 and len(cache_files(tmp_path / "cache")) == 4
    assert len({crops_key_digest(items, SIZE), crops_key_digest(items[:3], SIZE),
                crops_key_digest(items, SIZE + 8)}) == 3


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _flip(offset: int):
    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[offset if offset >= 0 else cache_file.ALIGNMENT + offset] ^= 0x20
        path.write_bytes(bytes(data))
    return flip


CORRUPTIONS = {
    "truncated": _truncate,
    "magic": _flip(0),
    "data offset": _flip(17),
    "json length": _flip(12),
    "json": _flip(70),
    "padding": _flip(-1),
    "garbage": lambda p: p.write_bytes(os.urandom(5000)),
    "empty": lambda p: p.write_bytes(b""),
    "appended": lambda p: p.write_bytes(p.read_bytes() + b"x"),
}


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_damaged_file_is_rebuilt_with_one_warning(tmp_path, decodes, damage):
    items = make_items(tmp_path / "images", 3)
    settings = settings_for(tmp_path / "cache")
    good = np.array(cached_test_crops(items, SIZE, settings).crops)
    (path,) = cache_files(tmp_path / "cache")
    CORRUPTIONS[damage](path)
    crops, warned = record(lambda: cached_test_crops(items, SIZE, settings))
    assert len(warned) == 1 and "rebuilding" in str(warned[0].message), damage
    assert len(decodes) == 6
    np.testing.assert_array_equal(crops.crops, good)
    _, warned = record(lambda: cached_test_crops(items, SIZE, settings))
    assert not warned and len(decodes) == 6


@pytest.mark.parametrize("bump", ["crops version", "format version"])
def test_version_change_is_rebuilt_with_one_warning(tmp_path, decodes, monkeypatch, bump):
    items = make_items(tmp_path / "images", 2)
    settings = settings_for(tmp_path / "cache")
    cached_test_crops(items, SIZE, settings)
    if bump == "crops version":
        monkeypatch.setattr(crop_cache, "CROPS_VERSION", crop_cache.CROPS_VERSION + 1)
    else:
        monkeypatch.setattr(cache_file, "FORMAT_VERSION", cache_file.FORMAT_VERSION + 1)
    _, warned = record(lambda: cached_test_crops(items, SIZE, settings))
    assert len(warned) == 1 and "outdated" in str(warned[0].message)
    assert len(decodes) == 4 and len(cache_files(tmp_path / "cache")) == 1


# --- caches that cannot be used -------------------------------------------------------------------

def test_disabled_never_touches_the_folder(tmp_path, decodes):
    items = make_items(tmp_path / "images", 2)
    settings = CacheSettings(enabled=False, directory=tmp_path / "never")
    assert cached_test_crops(items, SIZE, settings) is None
    values = cached_features({"a": 1}, 2, lambda: np.ones((2, 3), np.float32), settings)
    np.testing.assert_array_equal(values, np.ones((2, 3)))
    assert not (tmp_path / "never").exists() and not decodes


def _make_unwritable(root: Path, monkeypatch) -> None:
    """A read-only cache folder; root ignores permissions, so there the failures are made."""
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        root.chmod(0o555)
        return

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(disk_cache, "_open_lock_file", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def test_read_only_folder_goes_on_uncached_with_one_warning(tmp_path, monkeypatch):
    items = make_items(tmp_path / "images", 2)
    root = tmp_path / "cache"
    _make_unwritable(root, monkeypatch)
    try:
        crops, warned = record(lambda: cached_test_crops(items, SIZE, settings_for(root)))
        assert crops is None and len(warned) == 1 and "cannot write" in str(warned[0].message)
        calls = []
        values, warned = record(lambda: cached_features(
            {"a": 1}, 2, lambda: calls.append(1) or np.zeros((2, 3), np.float32),
            settings_for(root)))
        assert values.shape == (2, 3) and calls == [1]
        assert not warned  # same cause, same folder: already said
        assert not cache_files(root) and not temporaries(root)
    finally:
        root.chmod(0o755)


def test_lock_file_present_but_folder_read_only(tmp_path, monkeypatch):
    items = make_items(tmp_path / "images", 2)
    root = tmp_path / "cache"

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    crops, warned = record(lambda: cached_test_crops(items, SIZE, settings_for(root)))
    assert crops is None and len(warned) == 1
    assert not cache_files(root) and not temporaries(root)


def test_valid_cache_in_read_only_folder_is_still_read(tmp_path, monkeypatch, decodes):
    items = make_items(tmp_path / "images", 2)
    root = tmp_path / "cache"
    cached_test_crops(items, SIZE, settings_for(root))
    _make_unwritable(root, monkeypatch)
    try:
        crops, warned = record(lambda: cached_test_crops(items, SIZE, settings_for(root)))
        assert crops is not None and not warned and len(decodes) == 2
    finally:
        root.chmod(0o755)


@pytest.mark.parametrize("where", ["write", "reserve"])
def test_full_disk_goes_on_uncached_without_partial_file(tmp_path, monkeypatch, where):
    items = make_items(tmp_path / "images", 3)
    root = tmp_path / "cache"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_file, "_pwrite" if where == "write" else "_reserve", full)
    crops, warned = record(lambda: cached_test_crops(items, SIZE, settings_for(root)))
    assert crops is None and len(warned) == 1 and "No space" in str(warned[0].message)
    assert not cache_files(root) and not temporaries(root)
    values, warned = record(lambda: cached_features(
        {"b": 2}, 3, lambda: np.arange(6, dtype=np.float32).reshape(3, 2), settings_for(root)))
    np.testing.assert_array_equal(values, np.arange(6).reshape(3, 2))
    assert not warned and not cache_files(root) and not temporaries(root)


def test_lock_timeout_computes_without_the_cache(tmp_path, decodes):
    items = make_items(tmp_path / "images", 2)
    root = tmp_path / "cache"
    key = crop_cache.crops_key(items, SIZE)
    name = crop_cache._identity(key["paths"], SIZE)
    path = (root / "test_crops" /
            f"crops-{SIZE}px-2-{cache_file.key_digest(name)[:32]}.bin")
    path.parent.mkdir(parents=True)
    holder = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # "another process" is building it
        crops, warned = record(lambda: cached_test_crops(
            items, SIZE, settings_for(root, lock_timeout_s=0.2)))
    finally:
        os.close(holder)
    assert crops is None and len(warned) == 1 and "another process" in str(warned[0].message)
    assert not decodes


# --- unreadable images ----------------------------------------------------------------------------

def test_unreadable_image_raises_naming_it_and_leaves_no_file(tmp_path):
    items = make_items(tmp_path / "images", 3)
    broken = tmp_path / "images" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    items.insert(1, Datum(str(broken), 0, "class0"))
    with pytest.raises(ImageReadError, match=r"broken\.jpg"):
        cached_test_crops(items, SIZE, settings_for(tmp_path / "cache"))
    assert not cache_files(tmp_path / "cache") and not temporaries(tmp_path / "cache")


@pytest.mark.parametrize("slack", [None, 0])
def test_unreadable_images_skipped_and_reported(tmp_path, decodes, monkeypatch, slack):
    moves = []
    if slack is not None:  # meta larger than the reserved room: the data is moved once
        monkeypatch.setattr(cache_file, "META_SLACK", slack)
        monkeypatch.setattr(cache_file, "ALIGNMENT", 64)
        relocate = cache_file.CacheFileWriter._relocate

        def counted(self, offset):
            moves.append(offset)
            relocate(self, offset)

        monkeypatch.setattr(cache_file.CacheFileWriter, "_relocate", counted)
    items = make_items(tmp_path / "images", 4)
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    missing = tmp_path / "images" / "missing.jpg"
    items[1:1] = [Datum(str(broken), 2, "class2")]
    items.append(Datum(str(missing), 1, "class1"))
    settings = settings_for(tmp_path / "cache")
    crops = cached_test_crops(items, SIZE, settings, skip_unreadable=True)
    assert [(s.index, Path(s.path).name) for s in crops.skipped] == [(1, "broken.png"),
                                                                     (5, "missing.jpg")]
    assert "missing.jpg" in crops.skipped[1].error
    np.testing.assert_array_equal(crops.indices, [0, 2, 3, 4])
    np.testing.assert_array_equal(crops.labels, [items[i].label for i in (0, 2, 3, 4)])
    assert crops.crops.shape == (4, SIZE, SIZE, 3)
    assert len(moves) == (0 if slack is None else 1)
    expected = CropDataset(cached_test_crops(items[2:3], SIZE, settings))[0][0]
    assert torch.equal(CropDataset(crops)[1][0], expected)
    n = len(decodes)
    again = cached_test_crops(items, SIZE, settings, skip_unreadable=True)
    assert len(decodes) == n and len(again.skipped) == 2
    with pytest.raises(ImageReadError, match=r"broken\.png"):  # from the file, not decoded
        cached_test_crops(items, SIZE, settings)
    assert len(decodes) == n


# --- two processes at once ------------------------------------------------------------------------

def _build_concurrently(barrier, root: str, paths: list[str], out: str) -> None:
    """One of two processes building the same entry (runs in a child process)."""
    decoded = []

    def slow(path: str) -> Image.Image:
        decoded.append(path)
        time.sleep(0.05)  # keep the builder busy while the other process arrives
        return load_rgb(path)

    crop_cache.load_rgb = slow  # this child's own module
    disk_cache._WARNED.clear()
    items = [Datum(p, i, "c") for i, p in enumerate(paths)]
    settings = CacheSettings(enabled=True, directory=Path(root), lock_timeout_s=120)
    barrier.wait()  # start together
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        crops = cached_test_crops(items, SIZE, settings)
    digest = hashlib.sha256(np.ascontiguousarray(crops.crops).tobytes()).hexdigest()
    Path(out).write_text(json.dumps({"decodes": len(decoded), "sha": digest,
                                     "warnings": [str(w.message) for w in caught]}))


def test_two_processes_build_one_file(tmp_path):
    """Two processes at once: one decodes and writes, the other waits and reads its file.

    Forked where possible: a spawned child re-imports torch, which takes 5-20 s on a busy
    2-core machine; a forked one is a separate process all the same (own fds, own flock).
    """
    items = make_items(tmp_path / "images", 6)
    root = tmp_path / "cache"
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    procs = [ctx.Process(target=_build_concurrently,
                         args=(barrier, str(root), [item.impath for item in items], str(out)))
             for out in outs]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    results = [json.loads(out.read_text()) for out in outs]
    assert results[0]["sha"] == results[1]["sha"]
    assert sorted(r["decodes"] for r in results) == [0, 6]  # one built, the other waited
    assert results[0]["warnings"] == results[1]["warnings"] == []
    (path,) = cache_files(root)
    assert not orphan_temporaries(path.parent, path.name) and not temporaries(root)
    local = cached_test_crops(items, SIZE, settings_for(root))
    assert local.path == path
    np.testing.assert_array_equal(local.crops, cached_test_crops(items, SIZE, CacheSettings(
        enabled=True, directory=tmp_path / "fresh")).crops)


# --- frozen features ------------------------------------------------------------------------------

def test_features_cached_and_keyed(tmp_path):
    settings = settings_for(tmp_path / "cache")
    calls = []

    def compute(scale: float = 1.0):
        calls.append(scale)
        return torch.arange(12, dtype=torch.float32).reshape(4, 3) * scale

    key = {"backbone": "ViT-B/16", "weights": "abc", "image_size": 224, "crops": "d1"}
    first = cached_features(key, 4, compute, settings)
    second = cached_features(key, 4, compute, settings)
    assert calls == [1.0] and isinstance(second, np.memmap) and not second.flags.writeable
    np.testing.assert_array_equal(first, second)
    other = cached_features({**key, "weights": "xyz"}, 4, lambda: compute(2.0), settings)
    np.testing.assert_array_equal(other, 2 * first)
    assert len(cache_files(tmp_path / "cache")) == 2
    # Named by the backbone only: new weights replace the entry, with a warning.
    named = {"name_fields": ("backbone",)}
    cached_features(key, 4, compute, settings, **named)
    values, warned = record(lambda: cached_features({**key, "weights": "new"}, 4,
                                                    lambda: compute(3.0), settings, **named))
    assert len(warned) == 1 and "outdated" in str(warned[0].message)
    np.testing.assert_array_equal(values, 3 * first)
    with pytest.raises(ValueError, match="4 rows"):
        cached_features({"x": 1}, 4, lambda: np.zeros((3, 2), np.float32), settings)


def test_features_bfloat16_and_damaged_file(tmp_path):
    settings = settings_for(tmp_path / "cache")
    values = torch.randn(5, 8).to(torch.bfloat16)
    # A copy: the damage below is done in place, which the memmap would see (the cache itself
    # never writes in place).
    out = np.array(cached_features({"k": 1}, 5, lambda: values, settings))
    assert out.dtype == np.float32 and torch.equal(torch.from_numpy(np.array(out)),
                                                   values.float())
    (path,) = cache_files(tmp_path / "cache")
    _truncate(path)
    again, warned = record(lambda: cached_features({"k": 1}, 5, lambda: values, settings))
    assert len(warned) == 1
    np.testing.assert_array_equal(again, out)


def test_module_weights_digest():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    digest = module_weights_digest(model)
    assert len(digest) == 64 and digest == module_weights_digest(model)
    clone = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    clone.load_state_dict(model.state_dict())
    assert module_weights_digest(clone) == digest
    assert module_weights_digest(clone.to(torch.bfloat16)) != digest  # dtype and bytes differ
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-6
    assert module_weights_digest(model) != digest


def test_default_cache_dir_and_options(monkeypatch, tmp_path):
    monkeypatch.delenv(disk_cache.CACHE_DIR_ENV, raising=False)
    assert default_cache_dir() == Path("~/.cache/dpt_fast").expanduser()
    monkeypatch.setenv(disk_cache.CACHE_DIR_ENV, str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert CacheSettings().directory == tmp_path / "env"
    flag = CacheSettings.from_options(str(tmp_path / "flag"))
    assert flag.enabled and flag.directory == tmp_path / "flag"
    assert not CacheSettings.from_options(None, no_cache=True).enabled
    assert CacheSettings.from_options(None).directory == tmp_path / "env"
