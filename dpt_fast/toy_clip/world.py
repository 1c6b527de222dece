"""A procedural world of 64×64 RGB images of coloured, textured shapes, with captions.

Every scene is a shape (``SHAPES``) filled with a colour (``COLOURS``) in a texture
(``TEXTURES``) at one of five places (``POSITIONS``) on a noisy grey background. Size,
placement, colour and background are jittered, so that recognising a scene is not a lookup.
Everything is drawn from a ``numpy.random.Generator``: the same seed gives the same pixels and
captions on every machine.

>>> rng = np.random.default_rng(0)
>>> scene = sample_scene(rng)
>>> image = render(scene, rng)            # PIL RGB image, 64×64
>>> scene.caption()                        # e.g. "a red striped triangle at the top left"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 50, 190),
    "orange": (240, 140, 30),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
# Centre (x, y) of each position in pixels; captions read "at the <position>" / "in the centre".
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (19, 19),
    "top right": (45, 19),
    "bottom left": (19, 45),
    "bottom right": (45, 45),
    "centre": (32, 32),
}
RADIUS_RANGE = (11, 19)  # shape half-size in pixels, drawn uniformly (inclusive)
CENTRE_JITTER = 3  # ± pixels added to the position centre
COLOUR_JITTER = 25  # ± per RGB channel
BACKGROUND_RANGE = (60, 190)  # grey level of the background
NOISE_STD = 10.0  # std of the Gaussian pixel noise over the whole image
PATTERN_LIGHT = (235, 235, 235)  # second colour of the striped / dotted / checkered textures
STRIPE_PERIOD_RANGE = (4, 6)  # pixels
DOT_PERIOD_RANGE = (5, 7)  # pixels
CHECK_PERIOD_RANGE = (5, 8)  # pixels (size of one check)
STAR_INNER_RATIO = 0.45  # inner / outer radius of the five-pointed star
CROSS_ARM_RATIO = 0.38  # arm half-width / radius of the cross


@dataclass(frozen=True)
class Scene:
    """The content of one image: what captions describe and classes are made of."""

    shape: str
    colour: str
    texture: str
    position: str

    def caption(self, mention: tuple[bool, bool, bool] = (True, True, True)) -> str:
        """An English caption; ``mention`` switches colour, texture and position on or off.

        The shape is always named: "a red striped triangle at the top left",
        "a dotted star in the centre", "a blue square".
        """
        colour, texture, position = mention
        words = []
        if colour:
            words.append(self.colour)
        if texture:
            words.append(self.texture)
        words.append(self.shape)
        if position:
            words.append("in the centre" if self.position == "centre"
                         else f"at the {self.position}")
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article, *words])


def sample_scene(rng: np.random.Generator, *, shapes: tuple[str, ...] = SHAPES,
                 colours: tuple[str, ...] = tuple(COLOURS), textures: tuple[str, ...] = TEXTURES,
                 positions: tuple[str, ...] = tuple(POSITIONS)) -> Scene:
    """A scene with each attribute drawn uniformly from the given choices."""
    return Scene(shape=shapes[rng.integers(len(shapes))],
                 colour=colours[rng.integers(len(colours))],
                 texture=textures[rng.integers(len(textures))],
                 position=positions[rng.integers(len(positions))])


def _polygon(shape: str, cx: float, cy: float, r: float | np.integer[Any],
             angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape (all but the circle), rotated by ``angle`` radians."""
    if shape == "square":
        pts: list[tuple[float, float]] = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.85, y * 0.85) for x, y in pts]
    elif shape == "triangle":
        pts = [(np.cos(a), np.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else STAR_INNER_RATIO
            a = np.deg2rad(-90 + 36 * k)
            pts.append((rad * np.cos(a), rad * np.sin(a)))
    elif shape == "cross":
        w = CROSS_ARM_RATIO
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
               (-1, w), (-1, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")
    cos, sin = np.cos(angle), np.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in pts]


def shape_mask(shape: str, cx: float, cy: float, r: float | np.integer[Any],
               angle: float = 0.0) -> np.ndarray:
    """Boolean (64, 64) mask of a shape centred at (cx, cy) with half-size ``r``."""
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    return np.asarray(canvas) > 0


def texture_mask(texture: str, rng: np.random.Generator) -> np.ndarray:
    """Boolean (64, 64) mask of where the texture shows the shape's colour (else light)."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    if texture == "plain":
        return np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    if texture == "striped":
        period = rng.integers(STRIPE_PERIOD_RANGE[0], STRIPE_PERIOD_RANGE[1] + 1)
        coord = xx + yy if rng.random() < 0.5 else xx - yy  # diagonal stripes, either way
        return (coord + rng.integers(period)) % period < period / 2
    if texture == "dotted":
        period = rng.integers(DOT_PERIOD_RANGE[0], DOT_PERIOD_RANGE[1] + 1)
        dx = (xx + rng.integers(period)) % period - period / 2
        dy = (yy + rng.integers(period)) % period - period / 2
        return dx * dx + dy * dy > (period * 0.3) ** 2  # light dots on the colour
    if texture == "checkered":
        period = rng.integers(CHECK_PERIOD_RANGE[0], CHECK_PERIOD_RANGE[1] + 1)
        ox, oy = rng.integers(period, size=2)
        return ((xx + ox) // period + (yy + oy) // period) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}; valid: {TEXTURES}")


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` as a 64×64 RGB image, with jitter and noise from ``rng``."""
    background = rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1)
    pixels = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), background, dtype=np.float32)
    cx, cy = (c + rng.integers(-CENTRE_JITTER, CENTRE_JITTER + 1)
              for c in POSITIONS[scene.position])
    radius = rng.integers(RADIUS_RANGE[0], RADIUS_RANGE[1] + 1)
    angle = rng.uniform(-0.25, 0.25)
    mask = shape_mask(scene.shape, cx, cy, radius, angle)
    colour = np.clip(np.asarray(COLOURS[scene.colour], dtype=np.float32)
                     + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255)
    pattern = texture_mask(scene.texture, rng)
    pixels[mask & pattern] = colour
    pixels[mask & ~pattern] = PATTERN_LIGHT
    pixels += rng.normal(0.0, NOISE_STD, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), mode="RGB")


def vocabulary() -> list[str]:
    """Every word a caption, class name or toy prompt template can use."""
    words = {"a", "an", "the", "at", "in", "centre", "of", "photo", "shape", "texture", "toy"}
    words.update(SHAPES, COLOURS, TEXTURES)
    for name in POSITIONS:
        words.update(name.split())
    return sorted(words)
