"""Linear-probe CLIP: lpclip's search (:mod:`.search`), its drop-in command (:mod:`.lpclip`,
``python -m dpt_fast.linear_probe``) and the ``linear_probe`` method's model (:mod:`.model`).

Importing the package imports neither torch nor scikit-learn.
"""
