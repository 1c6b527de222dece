"""The toy CLIP that ships with dpt_fast: the toy world it was pretrained on (``world.py``), its
architecture, weights and loader (``model.py``; see ``dpt_fast/toy/MODEL_CARD.md``).

A backbone like any other CLIP (``--backbone toy``), below the model layer and the engine; the
toy tasks, the demo and the pretraining that use it are :mod:`dpt_fast.toy`. This module holds
only names (no torch), so that the CLI's recipes can read them before any heavy import.
"""

# `dpt-fast train --backbone toy --pretrained toy`: the shipped toy CLIP through the engine.
BACKBONE_NAME = "toy"
PRETRAINED_TAG = "toy"
# The form of the toy CLIP's captions ("a photo of a red striped square."): the template of
# the toy recipe and of the toy tasks.
TOY_TEMPLATE = "a photo of a {}."
