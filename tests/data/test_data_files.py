"""Tests of the files dpt_fast.data reads and writes: few-shot cache files, pickle interop with
Dassl (both ways) and its safety, and clear errors for files that do not belong."""

from __future__ import annotations

import itertools
import os
import pickle
import pickletools
import random
import sys
import types

import pytest
from data_fixtures import (
    make_imagenet,
    uneven_items,
    write_image,
)

from dpt_fast.data import (
    Datum,
    build_dataset,
    dumps_dassl_compatible,
    fewshot_path,
    generate_fewshot,
    load_or_create_fewshot,
    loads_restricted,
    read_datum_splits,
    write_datum_splits,
)
from dpt_fast.data.records import DASSL_DATUM_MODULE, DASSL_DATUM_NAME

# --- few-shot cache files ---------------------------------------------------------------------

def test_fewshot_cache_round_trip_and_reuse(tmp_path):
    train, val = uneven_items(tmp_path), uneven_items(tmp_path)[:6]
    got = load_or_create_fewshot(tmp_path, train, val, 2, 1)
    path = tmp_path / "split_fewshot" / "shot_2-seed_1.pkl"
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    assert read_datum_splits(path, ("train", "val")) == {"train": got[0], "val": got[1]}
    # An existing file wins over a fresh draw: a planted selection is returned as is.
    planted = {"train": train[:1], "val": val[:1]}
    write_datum_splits(path, planted)
    assert load_or_create_fewshot(tmp_path, train, val, 2, 1) == (train[:1], val[:1])


def test_fewshot_cache_without_val_writes_train_only(tmp_path):
    # CoOp's ImageNet: the validation set is the test set, only train is sampled and cached.
    train_fs, val_fs = load_or_create_fewshot(tmp_path, uneven_items(tmp_path), None, 2, 3)
    assert val_fs is None
    data = loads_restricted(fewshot_path(tmp_path, 2, 3).read_bytes())
    assert list(data) == ["train"] and data["train"] == train_fs


def test_fewshot_cache_unwritable_warns_and_still_samples(tmp_path):
    (tmp_path / "split_fewshot").write_text("a file where the directory should be")
    with pytest.warns(UserWarning, match="could not cache"):
        train_fs, _ = load_or_create_fewshot(tmp_path, uneven_items(tmp_path), None, 1, 1)
    assert train_fs == generate_fewshot(uneven_items(tmp_path), 1, 1)


def test_fewshot_cache_with_wrong_shape_is_an_error(tmp_path):
    path = fewshot_path(tmp_path, 1, 1)
    write_datum_splits(path, {"train": uneven_items(tmp_path)})
    with pytest.raises(ValueError, match="missing split 'val'"):
        load_or_create_fewshot(tmp_path, uneven_items(tmp_path), uneven_items(tmp_path), 1, 1)
    path.write_bytes(pickle.dumps({"train": [1, 2]}))
    with pytest.raises(ValueError, match="not a list of Datum"):
        load_or_create_fewshot(tmp_path, uneven_items(tmp_path), None, 1, 1)


# --- pickle interop with Dassl ------------------------------------------------------------------

def check_isfile(path):
    """Dassl's dassl.utils.check_isfile, minus its warning."""
    return os.path.isfile(path)


class StandInDasslDatum:
    """Behaves as Dassl's Datum: asserting constructor, private slots behind properties."""

    def __init__(self, impath="", label=0, domain=0, classname=""):
        assert isinstance(impath, str)
        assert check_isfile(impath)
        self._impath = impath
        self._label = label
        self._domain = domain
        self._classname = classname

    @property
    def impath(self):
        return self._impath

    @property
    def label(self):
        return self._label

    @property
    def domain(self):
        return self._domain

    @property
    def classname(self):
        return self._classname


@pytest.fixture
def stand_in_dassl(monkeypatch):
    """Registers ``dassl.data.datasets.base_dataset`` with a Datum that mimics Dassl's."""
    names = ["dassl", "dassl.data", "dassl.data.datasets", DASSL_DATUM_MODULE]
    modules = {name: types.ModuleType(name) for name in names}
    datum_class = type(DASSL_DATUM_NAME, (StandInDasslDatum,), {
        "__module__": DASSL_DATUM_MODULE, "__qualname__": DASSL_DATUM_NAME})
    setattr(modules[DASSL_DATUM_MODULE], DASSL_DATUM_NAME, datum_class)
    for parent, child in itertools.pairwise(names):
        setattr(modules[parent], child.rsplit(".", 1)[1], modules[child])
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return datum_class


def test_our_fewshot_file_loads_as_dassl_datum(tmp_path, stand_in_dassl):
    train = uneven_items()
    # Dassl's Datum asserts the file exists; unpickling must not call __init__ (NEWOBJ).
    assert not any(os.path.exists(x.impath) for x in train)
    load_or_create_fewshot(tmp_path, train, train[:3], 2, 1)
    with fewshot_path(tmp_path, 2, 1).open("rb") as file:
        data = pickle.load(file)  # what Dassl/CoOp do
    assert set(data) == {"train", "val"}
    ours = generate_fewshot(train, 2, random.Random(1))
    for got, want in zip(data["train"], ours, strict=True):
        assert type(got) is stand_in_dassl
        assert vars(got) == {"_impath": want.impath, "_label": want.label, "_domain": 0,
                             "_classname": want.classname}
        assert (got.impath, got.label, got.classname, got.domain) == \
            (want.impath, want.label, want.classname, want.domain)


def test_file_names_only_dassls_datum(tmp_path):
    data = dumps_dassl_compatible({"train": uneven_items(), "val": []})
    globals_named = [arg for op, arg, _ in pickletools.genops(data)
                     if op.name in ("GLOBAL", "STACK_GLOBAL", "INST")]
    assert globals_named == [f"{DASSL_DATUM_MODULE} {DASSL_DATUM_NAME}"]
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    assert {"NEWOBJ", "BUILD"} <= ops and "REDUCE" not in ops


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_dassl_written_file_reads_as_our_datum(tmp_path, stand_in_dassl, monkeypatch, protocol):
    paths = [write_image(tmp_path / f"{i}.jpg") for i in range(3)]
    dassl_items = [stand_in_dassl(impath=str(p), label=i % 2, classname=f"c{i % 2}")
                   for i, p in enumerate(paths)]
    path = tmp_path / "shot_1-seed_1.pkl"
    with path.open("wb") as file:  # exactly CoOp's write
        pickle.dump({"train": dassl_items, "val": dassl_items[:1]}, file, protocol=protocol)
    monkeypatch.delitem(sys.modules, DASSL_DATUM_MODULE)  # read without Dassl
    data = read_datum_splits(path, ("train", "val"))
    assert data["train"] == [Datum(str(p), i % 2, f"c{i % 2}") for i, p in enumerate(paths)]
    assert data["val"] == data["train"][:1]


def test_restricted_reader_round_trips_strings_and_large_files(tmp_path):
    # Enough distinct strings to need the 4-byte memo opcodes; non-ASCII names survive.
    items = [Datum(f"/d/ü/{i}.jpg", i % 300, f"klasse_{i % 300}_é") for i in range(700)]
    path = tmp_path / "x.pkl"
    write_datum_splits(path, {"train": items, "val": items[::-1]})
    assert read_datum_splits(path, ("train", "val")) == {"train": items, "val": items[::-1]}
    assert any(op.name == "LONG_BINPUT" for op, _, _ in pickletools.genops(path.read_bytes()))


class Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_malicious_pickle_is_refused_without_running(tmp_path, capfd, payload):
    marker = tmp_path / "pwned"
    command = f"echo pwned > {marker}"
    evil = Evil(command) if payload == "system" else _EvalPayload(f"open({str(marker)!r}, 'w')")
    path = fewshot_path(tmp_path, 1, 1)
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps({"train": [evil], "val": []}))
    with pytest.raises(pickle.UnpicklingError, match=payload) as info:
        load_or_create_fewshot(tmp_path, uneven_items(), uneven_items(), 1, 1)
    assert "refused" in str(info.value)
    assert not marker.exists()
    assert "pwned" not in capfd.readouterr().out


class _EvalPayload:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def test_imagenet_preprocessed_pkl_is_read_safely(tmp_path):
    expected = make_imagenet(tmp_path)
    dataset_dir = tmp_path / "imagenet"
    cached_train = [Datum(p, y, c) for p, y, c in expected.splits["train"][:3]]
    cached_test = [Datum(p, y, c) for p, y, c in expected.splits["test"][:2]]
    write_datum_splits(dataset_dir / "preprocessed.pkl",
                       {"train": cached_train, "test": cached_test})
    data = build_dataset("imagenet", tmp_path)
    assert data.train == cached_train and data.test == cached_test and data.val == cached_test
    marker = tmp_path / "pwned"
    (dataset_dir / "preprocessed.pkl").write_bytes(
        pickle.dumps({"train": [Evil(f"touch {marker}")], "test": []}))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        build_dataset("imagenet", tmp_path)
    assert not marker.exists()


# --- files that do not belong: clear errors naming the file -------------------------------------

@pytest.mark.parametrize(("content", "match"), [
    (b"", "the file is empty"),
    (b"\x80\x02}q\x00(X\x05\x00\x00", "corrupt"),
    (b"this is not a pickle at all", "corrupt"),
])
def test_unreadable_fewshot_cache_names_the_file_and_the_fix(tmp_path, content, match):
    path = fewshot_path(tmp_path, 2, 1)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        load_or_create_fewshot(tmp_path, uneven_items(tmp_path), None, 2, 1)
    assert str(path) in str(info.value) and "delete" in str(info.value)


def test_fewshot_cache_of_another_dataset_is_refused(tmp_path):
    items = uneven_items(tmp_path)
    names = ["c0", "c1", "c2", "c3"]
    path = fewshot_path(tmp_path, 1, 1)
    cases = [
        ([Datum(items[0].impath, 7, "c7")], "label 7, outside 0..3"),
        ([Datum(items[0].impath, 2, "dog")], "names class 2 'dog'"),
        ([Datum("/elsewhere/2/0.jpg", 2, "c2")], "not inside the dataset folder"),
    ]
    for records, match in cases:
        write_datum_splits(path, {"train": records})
        with pytest.raises(ValueError, match=match) as info:
            load_or_create_fewshot(tmp_path, items, None, 1, 1, names)
        assert str(path) in str(info.value) and "delete" in str(info.value)
    write_datum_splits(path, {"train": [items[0]]})  # a record of this dataset is accepted
    assert load_or_create_fewshot(tmp_path, items, None, 1, 1, names)[0] == [items[0]]


@pytest.mark.parametrize(("text", "match"), [
    ('{"train": [["a.jpg", 0, "a"]], "val": [], ', "not a valid JSON split file"),
    ('{"train": [["a.jpg", "zero", "a"]], "val": [], "test": []}', "label 'zero'"),
    ('{"train": [["a.jpg", 0.5, "a"]], "val": [], "test": []}', "label 0.5"),
])
def test_malformed_split_file_names_the_file(tmp_path, text, match):
    from dpt_fast.data.readers import read_coop_split

    (tmp_path / "images").mkdir()
    split = tmp_path / "split.json"
    split.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        read_coop_split(split, tmp_path / "images")
    assert str(split) in str(info.value)
