"""Linear-probe CLIP as a method: lpclip's logistic regression on frozen image features.

The frozen CLIP's features of the run's few-shot training images (test transform, as lpclip
extracts them), scikit-learn's ``LogisticRegression`` (lbfgs, L2, ``max_iter=1000``) with C
chosen by lpclip's search on a validation draw (:mod:`dpt_fast.linear_probe.search`), then the
test accuracy with that C. The authors' recipe *is* this search; no SGD option applies.
"""

from __future__ import annotations

from dpt_fast.methods.base import Method

LINEAR_PROBE = Method(
    name="linear_probe",
    description="linear-probe CLIP: logistic regression on frozen image features (lpclip)",
    training="fit", builder="dpt_fast.linear_probe.model:LinearProbeCLIP",
    model_fields=frozenset({"method"}))

__all__ = ["LINEAR_PROBE"]
