"""``python -m dpt_fast.linear_probe`` against lpclip's ``linear_probe.py``.

The oracle below is a transcription of the logic of KaiyangZhou/CoOp ``lpclip/linear_probe.py``
(its draws, its search, its prints and report lines), kept in this test only. Both run on the
same generated feature files; their printed lines, report files, chosen C and accuracies must
be identical.
"""

# ruff: noqa: NPY002 (lpclip's legacy global numpy generator is what the oracle must use)
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from dpt_fast.linear_probe import lpclip
from dpt_fast.linear_probe.search import search_c, val_shots

CLASSES, WIDTH = 4, 6
SIZES = {"train": 18, "val": 5, "test": 9}  # images per class


def _lpclip_oracle(feature_dir: str, dataset: str, num_step: int, num_run: int) -> None:
    """lpclip/linear_probe.py's logic, transcribed (run in the report's working folder)."""
    from sklearn.linear_model import LogisticRegression

    def load(split):
        f = np.load(os.path.join(feature_dir, dataset, f"{split}.npz"))
        return f["feature_list"], f["label_list"]

    train_feature, train_label = load("train")
    val_feature, val_label = load("val")
    test_feature, test_label = load("test")
    os.makedirs("report", exist_ok=True)
    val_shot_list = {1: 1, 2: 2, 4: 4, 8: 4, 16: 4}
    for num_shot in [1, 2, 4, 8, 16]:
        test_acc_step_list = np.zeros([num_run, num_step])
        for seed in range(1, num_run + 1):
            np.random.seed(seed)
            print(f"-- Seed: {seed} " + "-" * 62)
            all_label_list = np.unique(train_label)
            idx = []
            for label in all_label_list:
                members = np.where(train_label == label)[0]
                idx.extend(np.random.choice(members, size=num_shot, replace=False))
            tr_f, tr_l = train_feature[idx], train_label[idx]
            vidx = []
            for label in all_label_list:
                members = np.where(val_label == label)[0]
                vidx.extend(np.random.choice(members, size=val_shot_list[num_shot],
                                             replace=False))
            va_f, va_l = val_feature[vidx], val_label[vidx]

            def fit(c, tr_f=tr_f, tr_l=tr_l):
                return LogisticRegression(solver="lbfgs", max_iter=1000, penalty="l2",
                                          C=c).fit(tr_f, tr_l)

            search_list = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
            acc_list = []
            for c_weight in search_list:
                pred = fit(c_weight).predict(va_f)
                acc_list.append(sum(pred == va_l) / len(va_l))
            print(acc_list, flush=True)
            c_peak = search_list[np.argmax(acc_list)]
            c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak
            for step in range(num_step):
                print(f"{dataset}, {num_shot} Shot, Round {step}: {c_left}/{c_right}")
                clf_left, clf_right = fit(c_left), fit(c_right)
                acc_left = sum(clf_left.predict(va_f) == va_l) / len(va_l)
                print(f"Val accuracy (Left): {100 * acc_left:.2f}")
                acc_right = sum(clf_right.predict(va_f) == va_l) / len(va_l)
                print(f"Val accuracy (Right): {100 * acc_right:.2f}")
                if acc_left < acc_right:
                    c_final, clf_final = c_right, clf_right
                    c_left = 0.5 * (np.log10(c_right) + np.log10(c_left))
                    c_right = np.log10(c_right)
                else:
                    c_final, clf_final = c_left, clf_left
                    c_right = 0.5 * (np.log10(c_right) + np.log10(c_left))
                    c_left = np.log10(c_left)
                pred = clf_final.predict(test_feature)
                test_acc = 100 * sum(pred == test_label) / len(pred)
                print(f"Test Accuracy: {test_acc:.2f}")
                test_acc_step_list[seed - 1, step] = test_acc
                with open(f"./report/{feature_dir}_s{num_step}r{num_run}_details.txt",
                          "a+") as writer:
                    writer.write(f"{dataset}, seed {seed}, {num_shot} shot, weight {c_final}, "
                                  f"test_acc {test_acc:.2f}\n")
                c_left, c_right = np.power(10, c_left), np.power(10, c_right)
        last = test_acc_step_list[:, -1]
        save_line = (f"{dataset}, {num_shot} Shot, Test acc stat: {np.mean(last):.2f} "
                     f"({np.std(last):.2f})\n")
        print(save_line)
        with open(f"./report/{feature_dir}_s{num_step}r{num_run}.txt", "a+") as writer:
            writer.write(save_line)


def _write_features(folder: Path, seed: int = 0) -> None:
    """Overlapping Gaussian classes, so that C changes the predictions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLASSES, WIDTH))
    folder.mkdir(parents=True)
    for split, per_class in SIZES.items():
        labels = np.repeat(np.arange(CLASSES), per_class)
        rng.shuffle(labels)
        features = centres[labels] + 1.5 * rng.normal(size=(len(labels), WIDTH))
        np.savez(folder / split, feature_list=features.tolist(), label_list=labels.tolist())


@pytest.fixture(scope="module")
def feature_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lpclip")
    _write_features(root / "clip_feat" / "toyset")
    return root


def _in(folder: Path, call) -> str:
    folder.mkdir()
    here = os.getcwd()
    out = io.StringIO()
    try:
        os.chdir(folder)
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    finally:
        os.chdir(here)
    return out.getvalue()


def _reports(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((folder / "report").iterdir())}


def test_drop_in_prints_and_reports_what_lpclip_does(feature_root, tmp_path):
    # lpclip names its report files after --feature_dir: both run from a sibling folder.
    os.symlink(feature_root / "clip_feat", tmp_path / "clip_feat", target_is_directory=True)
    expected = _in(tmp_path / "oracle",
                   lambda: _lpclip_oracle("../clip_feat", "toyset", num_step=3, num_run=2))
    ours = _in(tmp_path / "ours", lambda: lpclip.main(
        ["--feature-dir", "../clip_feat", "--dataset", "toyset", "--num-step", "3",
         "--num-run", "2"]))
    assert ours == expected
    assert "Test acc stat" in ours and ours.count("-- Seed: ") == 2 * 5
    assert _reports(tmp_path / "oracle") == _reports(tmp_path / "ours")


def test_the_chosen_c_changes_with_the_data_and_matches_the_oracle(feature_root):
    """The search is not trivial on these features: the grid's best differs from the final C."""
    splits = lpclip.read_feature_dir(str(feature_root / "clip_feat"), "toyset")
    np.random.seed(1)
    (tf, tl), (vf, vl) = splits["train"], splits["val"]
    result = search_c((tf, tl), (vf, vl), 8, splits["test"])
    assert len(result.steps) == 8 and result.c not in (1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6)
    assert 0 <= result.steps[-1].test_accuracy <= 100


def test_val_shot_rule():
    assert [val_shots(k) for k in (1, 2, 4, 8, 16)] == [1, 2, 4, 4, 4]
    assert (val_shots(3), val_shots(32), val_shots(-1)) == (3, 4, 4)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "dpt_fast.linear_probe", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=120)


def test_missing_or_malformed_feature_file_is_one_line_naming_it(feature_root, tmp_path):
    bad = tmp_path / "feat" / "ds"
    bad.mkdir(parents=True)
    for split in ("train", "val"):
        (bad / f"{split}.npz").write_bytes((feature_root / "clip_feat" / "toyset" /
                                            f"{split}.npz").read_bytes())
    done = _cli("--feature-dir", "feat", "--dataset", "ds", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "test.npz: no such feature file" in done.stderr
    (bad / "test.npz").write_text("not a zip")
    done = _cli("--feature-dir", "feat", "--dataset", "ds", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "test.npz: not a readable .npz file" in done.stderr
    np.savez(bad / "test.npz", features=np.zeros((2, 3)))
    done = _cli("--feature-dir", "feat", "--dataset", "ds", cwd=tmp_path)
    assert "test.npz: no array feature_list, label_list" in done.stderr


def test_too_few_images_to_draw_is_one_line_naming_the_class(tmp_path):
    folder = tmp_path / "feat" / "ds"
    folder.mkdir(parents=True)
    for split, per_class in (("train", 16), ("val", 4), ("test", 2)):
        labels = np.repeat(np.arange(3), per_class)
        if split == "val":
            labels = labels[1:]  # class 0 keeps 3 validation images
        np.savez(folder / split, feature_list=np.random.default_rng(0).normal(
            size=(len(labels), 4)), label_list=labels)
    done = _cli("--feature-dir", "feat", "--dataset", "ds", "--num-step", "1", "--num-run",
                "1", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "ds val.npz (4 shots, seed 1): class 0 has 3 sample(s)" in done.stderr
