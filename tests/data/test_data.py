"""Tests of dpt_fast.data: records, Dassl-identical few-shot draws, base/new splits, the CoOp
dataset readers, image folders, transforms and the image Dataset (the files it reads and
writes: test_data_files.py)."""

from __future__ import annotations

import math
import os
import pickle
import random
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from data_fixtures import (
    IMAGENET_CLASSES,
    SPLIT_LAYOUTS,
    make_dataset,
    make_imagenet,
    make_split_dataset,
    uneven_items,
    write_image,
)
from PIL import Image

from dpt_fast.data import (
    CLIP_MEAN,
    CLIP_STD,
    DATASETS,
    Datum,
    ImageDataset,
    ImageReadError,
    build_dataset,
    build_transforms,
    fewshot_path,
    generate_fewshot,
    image_folder_dataset,
    read_datum_splits,
    sample_fewshot_splits,
    split_by_label,
    subsample_classes,
)

TEMPLATES = {  # the authors' CUSTOM_TEMPLATES (trainers/DPT.py), by registry name
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}
SEEDS = (1, 2, 3)
SHOTS = (1, 2, 4)


def records(items: list[Datum]) -> list[tuple[str, int, str]]:
    return [(x.impath, x.label, x.classname) for x in items]


@pytest.fixture
def global_random_state():
    """Tests that seed the global ``random`` (as Dassl does) leave it as they found it."""
    state = random.getstate()
    yield
    random.setstate(state)


# --- a faithful re-implementation of Dassl/CoOp's few-shot draws (the oracle) ----------------

def dassl_generate_fewshot_dataset(data_source, num_shots=-1, repeat=False):
    """Dassl's DatasetBase.generate_fewshot_dataset for one data source, on the global random."""
    if num_shots < 1:
        return data_source
    tracker = defaultdict(list)  # Dassl's split_dataset_by_label
    for item in data_source:
        tracker[item.label].append(item)
    dataset = []
    for _label, items in tracker.items():
        if len(items) >= num_shots:
            sampled_items = random.sample(items, num_shots)
        elif repeat:
            sampled_items = random.choices(items, k=num_shots)
        else:
            sampled_items = items
        dataset.extend(sampled_items)
    return dataset


def coop_fewshot(train, val, num_shots, seed):
    """CoOp: train.py's random.seed(SEED), then the dataset samples train, then val."""
    random.seed(seed)
    train = dassl_generate_fewshot_dataset(train, num_shots=num_shots)
    val = dassl_generate_fewshot_dataset(val, num_shots=min(num_shots, 4))
    return train, val


# --- records ----------------------------------------------------------------------------------

def test_datum_attributes_match_dassl():
    d = Datum("/x/a.jpg", 3, "cat")
    assert (d.impath, d.label, d.classname, d.domain) == ("/x/a.jpg", 3, "cat", 0)
    assert d.to_dassl_state() == {"_impath": "/x/a.jpg", "_label": 3, "_domain": 0,
                                  "_classname": "cat"}
    with pytest.raises(TypeError, match="label"):
        Datum("/x/a.jpg", "3", "cat")
    with pytest.raises(TypeError, match="label"):
        Datum("/x/a.jpg", True, "cat")
    with pytest.raises(AttributeError):
        d.label = 4  # frozen


def test_datum_pickles_under_its_own_class_path():
    # DataLoader workers started with spawn pickle the records: no Dassl needed for that.
    d = Datum("/x/a.jpg", 3, "cat", domain=1)
    data = pickle.dumps(d, protocol=pickle.HIGHEST_PROTOCOL)
    assert b"dassl" not in data
    assert pickle.loads(data) == d


# --- few-shot sampling ------------------------------------------------------------------------

def test_split_by_label_keeps_first_appearance_order():
    groups = split_by_label(uneven_items())
    assert list(groups) == [2, 0, 3, 1]
    assert [len(v) for v in groups.values()] == [7, 3, 1, 5]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shots", SHOTS)
def test_generate_fewshot_matches_dassl_sample_for_sample(seed, shots, global_random_state):
    items = uneven_items()
    random.seed(seed)
    expected = dassl_generate_fewshot_dataset(items, num_shots=shots)
    after_dassl = random.random()
    # A seed, a Random instance and the global module (after random.seed) all draw the same.
    assert generate_fewshot(items, shots, seed) == expected
    assert generate_fewshot(items, shots, random.Random(seed)) == expected
    random.seed(seed)
    assert generate_fewshot(items, shots, None) == expected
    assert random.random() == after_dassl  # the global stream advanced exactly as Dassl's
    # The class with one image keeps it; others get exactly `shots`.
    counts = {y: len(v) for y, v in split_by_label(expected).items()}
    assert counts == {y: min(n, shots) for y, n in {2: 7, 0: 3, 3: 1, 1: 5}.items()}


@pytest.mark.parametrize("seed", SEEDS)
def test_generate_fewshot_repeat_matches_dassl(seed, global_random_state):
    items = uneven_items()
    random.seed(seed)
    expected = dassl_generate_fewshot_dataset(items, num_shots=4, repeat=True)
    assert generate_fewshot(items, 4, seed, repeat=True) == expected
    assert len(expected) == 4 * 4


def test_generate_fewshot_without_shots_returns_everything():
    items = uneven_items()
    assert generate_fewshot(items, -1, 1) == items
    assert generate_fewshot(items, 0, 1) == items
    with pytest.raises(TypeError, match="rng"):
        generate_fewshot(items, 2, "1")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shots", SHOTS)
def test_train_then_val_draws_match_coop(seed, shots, global_random_state):
    train = uneven_items()
    val = [Datum(x.impath.replace("/d/", "/v/"), x.label, x.classname) for x in uneven_items()]
    expected_train, expected_val = coop_fewshot(train, val, shots, seed)
    got_train, got_val = sample_fewshot_splits(train, val, shots, seed)
    assert got_train == expected_train
    assert got_val == expected_val


@pytest.mark.parametrize("seed", SEEDS)
def test_build_dataset_fewshot_matches_coop_end_to_end(tmp_path, seed, global_random_state):
    make_split_dataset(tmp_path, "oxford_pets")
    full = build_dataset("oxford_pets", tmp_path)
    expected_train, expected_val = coop_fewshot(full.train, full.val, 4, seed)
    data = build_dataset("oxford_pets", tmp_path, shots=4, seed=seed)
    assert data.train == expected_train
    assert data.val == expected_val
    assert data.test == full.test  # the test split is never sampled
    assert fewshot_path(tmp_path / "oxford_pets", 4, seed).is_file()


# --- base/new class subsampling -----------------------------------------------------------------

def test_subsample_classes_as_coop():
    items = [Datum(f"/d/{y}_{i}.jpg", y, f"c{y}") for y in (4, 0, 3, 1, 2) for i in range(2)]
    test = [Datum(f"/t/{y}.jpg", y, f"c{y}") for y in range(5)]
    all_train, all_test = subsample_classes(items, test, subsample="all")
    assert all_train == items and all_test == test
    base_train, base_test = subsample_classes(items, test, subsample="base")
    assert math.ceil(5 / 2) == 3
    assert {(x.label, x.classname) for x in base_train} == {(0, "c0"), (1, "c1"), (2, "c2")}
    assert [(x.label, x.classname) for x in base_test] == [(0, "c0"), (1, "c1"), (2, "c2")]
    new_train, new_test = subsample_classes(items, test, subsample="new")
    assert [(x.label, x.classname) for x in new_test] == [(0, "c3"), (1, "c4")]
    assert [x.impath for x in new_train] == [x.impath for x in items if x.label >= 3]
    with pytest.raises(ValueError, match="subsample"):
        subsample_classes(items, subsample="half")


@pytest.mark.parametrize("subsample", ["base", "new"])
def test_build_dataset_subsample_relabels_and_renames(tmp_path, subsample):
    make_split_dataset(tmp_path, "dtd")
    data = build_dataset("dtd", tmp_path, shots=2, seed=1, subsample=subsample)
    names = ["banded", "blotchy"] if subsample == "base" else ["braided"]
    assert data.classnames == names
    for split in (data.train, data.val, data.test):
        assert split and {(x.label, x.classname) for x in split} <= set(enumerate(names))
    make_dataset(tmp_path, "imagenet_a")
    with pytest.raises(ValueError, match="test-only"):
        build_dataset("imagenet_a", tmp_path, subsample=subsample)


# --- dataset readers ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DATASETS))
def test_reader_matches_layout(tmp_path, name):
    expected = make_dataset(tmp_path, name)
    data = build_dataset(name, tmp_path)
    assert data.name == name
    assert data.template == TEMPLATES[name] == DATASETS[name].template
    assert data.classnames == expected.classnames
    for split in ("train", "val", "test"):
        got = records(getattr(data, split))
        assert got == expected.splits[split], split
        assert all(os.path.isfile(path) for path, _, _ in got)
    assert not (tmp_path / DATASETS[name].folder / "split_fewshot").exists()


@pytest.mark.parametrize("names", ["folders", "coop"])
def test_eurosat_keeps_the_class_names_of_its_split_file(tmp_path, caplog, names):
    """CoOp's EuroSAT reads split_zhou_EuroSAT.json's names as they are: folder names
    ("AnnualCrop") stay folder names, its own names ("Annual Crop Land") stay its own; only
    folder names draw a warning (they change the prompts)."""
    make_split_dataset(tmp_path, "eurosat")
    split_file = tmp_path / "eurosat" / SPLIT_LAYOUTS["eurosat"].split_file
    expected = ["AnnualCrop", "Forest", "SeaLake"]
    if names == "coop":
        text = split_file.read_text()
        for old, new in [("AnnualCrop", "Annual Crop Land"), ("SeaLake", "Sea or Lake")]:
            text = text.replace(f'"{old}"', f'"{new}"')  # class names only, not the paths
        split_file.write_text(text)
        expected = ["Annual Crop Land", "Forest", "Sea or Lake"]
    with caplog.at_level("WARNING", logger="dpt_fast"):
        data = build_dataset("eurosat", tmp_path)
    assert data.classnames == expected
    assert {item.classname for item in data.train} == set(expected)
    warned = [r.getMessage() for r in caplog.records if "names classes by their folders" in
              r.getMessage()]
    assert len(warned) == (1 if names == "folders" else 0)
    if warned:
        assert "AnnualCrop" in warned[0] and "'Annual Crop Land'" in warned[0]


def test_variants_ignore_shots_and_have_no_training_data(tmp_path):
    make_dataset(tmp_path, "imagenet_r")
    data = build_dataset("imagenet_r", tmp_path, shots=16, seed=1)
    assert data.train == [] and data.val == [] and len(data.test) == 6
    assert data.classnames == [IMAGENET_CLASSES[w] for w in ("n01440764", "n01484850",
                                                             "n01491361")]


def test_imagenet_fewshot_samples_train_only(tmp_path, global_random_state):
    make_imagenet(tmp_path)
    full = build_dataset("imagenet", tmp_path)
    data = build_dataset("imagenet", tmp_path, shots=2, seed=2)
    random.seed(2)
    assert data.train == dassl_generate_fewshot_dataset(full.train, num_shots=2)
    assert data.val == data.test == full.test
    cached = read_datum_splits(fewshot_path(tmp_path / "imagenet", 2, 2), ("train",))
    assert cached == {"train": data.train}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_missing_dataset_folder_describes_layout(tmp_path, name):
    spec = DATASETS[name]
    with pytest.raises(FileNotFoundError) as info:
        build_dataset(name, tmp_path)
    message = str(info.value)
    assert f"missing {tmp_path / spec.folder};" in message
    assert f"expected <root>/{spec.folder}/" in message and "DATASETS.md" in message
    assert f"<root> = {tmp_path}" in message


@pytest.mark.parametrize("name", sorted(SPLIT_LAYOUTS))
def test_missing_split_file_is_named(tmp_path, name):
    make_split_dataset(tmp_path, name)
    split_file = tmp_path / SPLIT_LAYOUTS[name].folder / SPLIT_LAYOUTS[name].split_file
    split_file.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing {split_file}"):
        build_dataset(name, tmp_path)


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(KeyError) as info:
        build_dataset("oxford_pet", tmp_path)
    assert all(name in str(info.value) for name in DATASETS)


def test_registry_names_are_the_authors_config_names():
    assert set(DATASETS) == set(TEMPLATES)
    assert len(DATASETS) == 15


def test_malformed_split_entry_is_reported(tmp_path):
    make_split_dataset(tmp_path, "food101")
    split_file = tmp_path / "food-101" / "split_zhou_Food101.json"
    split_file.write_text('{"train": [["a.jpg", 0]], "val": [], "test": []}')
    with pytest.raises(ValueError, match=r"train\[0\]"):
        build_dataset("food101", tmp_path)


# --- generic image folders --------------------------------------------------------------------

def make_folder_tree(root: Path, splits=("train",), per_class=4) -> None:
    for split in splits:
        for name in ("sea_lion", "cat", "dog"):
            for i in range(per_class):
                write_image(root / split / name / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"")


def test_image_folder_train_only(tmp_path):
    make_folder_tree(tmp_path, per_class=5)
    data = image_folder_dataset(tmp_path, val_fraction=0.4)
    assert data.classnames == ["cat", "dog", "sea_lion"]
    assert data.name == tmp_path.name and data.template == "a photo of a {}."
    assert len(data.train) == 9 and len(data.val) == 6 and data.test == data.val
    assert not {x.impath for x in data.train} & {x.impath for x in data.val}
    assert all(x.impath.endswith(".png") for x in data.train + data.val)
    assert image_folder_dataset(tmp_path, seed=2, val_fraction=0.4).val == data.val
    assert image_folder_dataset(tmp_path, val_fraction=0.0).val == []


def test_image_folder_with_val_test_and_shots(tmp_path):
    make_folder_tree(tmp_path, splits=("train", "val", "test"), per_class=6)
    full = image_folder_dataset(tmp_path)
    assert [len(full.train), len(full.val), len(full.test)] == [18, 18, 18]
    data = image_folder_dataset(tmp_path, shots=2, seed=3, template="{}.")
    assert (data.train, data.val) == sample_fewshot_splits(full.train, full.val, 2, 3)
    assert len(data.train) == 6 and len(data.val) == 6 and data.test == full.test
    write_image(tmp_path / "test" / "horse" / "0.png")
    with pytest.raises(ValueError, match="horse"):
        image_folder_dataset(tmp_path)


def test_image_folder_missing_train_describes_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"<root>/train/<class>/<image>"):
        image_folder_dataset(tmp_path)


# --- transforms, Dataset, loaders ---------------------------------------------------------------

def test_transforms_shapes_and_clip_normalisation():
    colour = (200, 100, 50)
    image = Image.new("RGB", (300, 200), colour)
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, CLIP_MEAN, CLIP_STD,
                                                                     strict=True)])
    for train in (False, True):
        out = build_transforms(train)(image)
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32
        torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=2e-2, rtol=0)
    assert build_transforms(False, image_size=32)(image).shape == (3, 32, 32)


def test_transforms_follow_dassls_pipeline():
    from torchvision import transforms as T

    train = build_transforms(True).transforms
    assert [type(t) for t in train] == [T.RandomResizedCrop, T.RandomHorizontalFlip,
                                        T.ToTensor, T.Normalize]
    assert train[0].scale == (0.08, 1.0) and train[0].size == (224, 224)
    assert train[0].interpolation == T.InterpolationMode.BICUBIC
    test = build_transforms(False).transforms
    assert [type(t) for t in test] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert test[0].size == 224 and test[0].interpolation == T.InterpolationMode.BICUBIC
    assert tuple(test[3].mean) == CLIP_MEAN and tuple(test[3].std) == CLIP_STD


def test_image_dataset_reads_rgb_and_names_bad_files(tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("L", (8, 8), 7).save(grey)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 definitely not a jpeg")
    items = [Datum(str(grey), 1, "g"), Datum(str(corrupt), 0, "c"),
             Datum(str(tmp_path / "gone.jpg"), 0, "c")]
    dataset = ImageDataset(items, build_transforms(False, image_size=8))
    image, label = dataset[0]
    assert image.shape == (3, 8, 8) and label == 1
    for index, name in ((1, "corrupt.jpg"), (2, "gone.jpg")):
        with pytest.raises(ImageReadError, match=name):
            dataset[index]


