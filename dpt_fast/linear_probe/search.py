"""lpclip's choice of the inverse regularisation strength C, and its few-shot draws.

The search of ``lpclip/linear_probe.py`` (KaiyangZhou/CoOp): fit scikit-learn's
``LogisticRegression(solver="lbfgs", max_iter=1000, penalty="l2")`` for each C of a coarse
grid (1e6, 1e4, …, 1e-6) and take the best on the validation draw (the first best); then
``num_step`` steps of a bisection in log10(C) between C/10 and 10·C: each step fits both ends,
keeps the better (the left one on a tie) and halves the interval towards it. The C of the last
step is the chosen one. Every number is computed with the same operations, in the same order,
as the script, so the same C and the same accuracies come out (tested against a
transcription of it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

COARSE_GRID: tuple[float, ...] = (1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6)  # lpclip's search_list
NUM_STEPS = 8  # lpclip's default --num_step
MAX_ITER = 1000  # lbfgs iterations of every fit
# The bisection starts between BRACKET_LOW·C and BRACKET_HIGH·C around the grid's best C.
BRACKET_LOW, BRACKET_HIGH = 1e-1, 1e1
# Validation images per class for each shot count (lpclip's val_shot_list); other shot counts
# take min(shots, VAL_SHOTS_CAP) (all images: the cap).
VAL_SHOTS: dict[int, int] = {1: 1, 2: 2, 4: 4, 8: 4, 16: 4}
VAL_SHOTS_CAP = 4


def val_shots(shots: int) -> int:
    """Validation images per class for ``shots`` training images per class (-1: all)."""
    if shots in VAL_SHOTS:
        return VAL_SHOTS[shots]
    return VAL_SHOTS_CAP if shots < 1 else min(shots, VAL_SHOTS_CAP)


def fit(features: np.ndarray, labels: np.ndarray, c: float) -> Any:
    """lpclip's classifier: L2-regularised multinomial logistic regression, lbfgs."""
    from sklearn.linear_model import LogisticRegression

    # penalty="l2" is scikit-learn's default (the keyword is deprecated from 1.8 on).
    return LogisticRegression(solver="lbfgs", max_iter=MAX_ITER, C=c).fit(features, labels)


def accuracy(classifier: Any, features: np.ndarray, labels: np.ndarray) -> np.float64:
    """Fraction of ``labels`` predicted (lpclip's validation accuracy, a numpy float)."""
    return np.sum(classifier.predict(features) == labels) / len(labels)


def percent_correct(predictions: np.ndarray, labels: np.ndarray) -> np.float64:
    """lpclip's test accuracy: 100 · correct / n, in that order."""
    return 100 * np.sum(predictions == labels) / len(predictions)


@dataclass
class SearchStep:
    """One step of the bisection."""

    c_left: float  # the interval's ends when the step starts
    c_right: float
    val_left: np.float64  # validation accuracy (fraction) of the fit at each end
    val_right: np.float64
    c: float  # the end kept: the step's C
    test_accuracy: np.float64 | None  # % on the test features of the step's fit, when given


@dataclass
class SearchResult:
    """What the search did: the coarse grid's accuracies, each bisection step, the choice."""

    grid_accuracies: list[np.float64]
    steps: list[SearchStep] = field(default_factory=list)
    classifier: Any = None  # the last step's fitted LogisticRegression

    @property
    def c(self) -> float:
        """The chosen C (the last step's)."""
        return self.steps[-1].c


def search_c(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
             num_steps: int = NUM_STEPS, test: tuple[np.ndarray, np.ndarray] | None = None,
             test_every_step: bool = True,
             fitter: Callable[[np.ndarray, np.ndarray, float], Any] = fit) -> SearchResult:
    """lpclip's search of C on ``train`` = (features (N, E), labels (N,)), validated on ``val``.

    With ``test``, each step's fit is scored on it (``test_every_step``, as lpclip reports) or
    the last step's only.
    """
    if num_steps < 1:
        raise ValueError(f"the search needs at least one bisection step, got {num_steps}")
    grid = [accuracy(fitter(*train, c), *val) for c in COARSE_GRID]
    result = SearchResult(grid)
    c_peak = COARSE_GRID[int(np.argmax(grid))]
    # lpclip's products (1e-1 * c is not always the float c / 10).
    c_left, c_right = BRACKET_LOW * c_peak, BRACKET_HIGH * c_peak
    for step in range(num_steps):
        left, right = fitter(*train, c_left), fitter(*train, c_right)
        acc_left, acc_right = accuracy(left, *val), accuracy(right, *val)
        start = (c_left, c_right)
        if acc_left < acc_right:
            chosen, kept = c_right, right
            log_left = 0.5 * (np.log10(c_right) + np.log10(c_left))
            log_right = np.log10(c_right)
        else:
            chosen, kept = c_left, left
            log_right = 0.5 * (np.log10(c_right) + np.log10(c_left))
            log_left = np.log10(c_left)
        test_acc = None
        if test is not None and (test_every_step or step == num_steps - 1):
            test_acc = percent_correct(kept.predict(test[0]), test[1])
        result.steps.append(SearchStep(start[0], start[1], acc_left, acc_right, chosen,
                                       test_acc))
        result.classifier = kept
        c_left, c_right = np.power(10, log_left), np.power(10, log_right)
    return result


def draw_per_class(labels: np.ndarray, classes: np.ndarray, per_class: int,
                   what: str) -> list[int]:
    """lpclip's draw: for each class in ``classes`` order, ``np.random.choice`` of
    ``per_class`` of its indices without replacement (from the global numpy state, which the
    caller seeds).

    Raises:
        ValueError: a class with fewer than ``per_class`` samples, naming ``what`` and it.
    """
    chosen: list[int] = []
    for label in classes:
        members = np.where(labels == label)[0]
        if len(members) < per_class:
            raise ValueError(f"{what}: class {label} has {len(members)} sample(s), fewer than "
                             f"the {per_class} per class to draw")
        chosen.extend(np.random.choice(members, size=per_class, replace=False))  # noqa: NPY002
    return chosen


__all__ = ["COARSE_GRID", "NUM_STEPS", "VAL_SHOTS", "SearchResult", "SearchStep", "accuracy",
           "draw_per_class", "fit", "percent_correct", "search_c", "val_shots"]
