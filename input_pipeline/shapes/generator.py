"""Deterministic generator of the "shapes" image-caption dataset (numpy + PIL only).

Every example is a pure function of ``(split_seed, index)``: a scene of one to three flat
shapes on a plain background, a caption, a class label and a question/answer pair.

* Object 0 is the *main* object. Its ``"{color} {shape}"`` is the class label (30 classes,
  :data:`CLASS_NAMES`) and it is always the first object a caption names. With distractors it
  is "large" (40-55% of the image side, 42-60% alone) and every distractor is "small"
  (16-22%). The main object sits near the centre (within 8% of the side); distractors go
  anywhere around it. A plain ViT has no translation invariance built in: with the main object
  anywhere, a 4-layer ViT learns shape several times more slowly (supervised shape accuracy
  after 300 steps of batch 128: 45% anywhere vs 69% centred), which the CPU quickstart
  cannot afford.
* Distractors have a colour different from every other object and a shape different from the
  main object, so "the {shape}" and "the {color} object" always refer to one object.
* The scene geometry is stored in fractions of the image side: the 32px and 64px renderings of
  one ``(split_seed, index)`` show the same scene.
* Localisation targets (:func:`scene_locations`, shapes 1.2.0): every object's box (the exact
  extent of the drawn shape), an unambiguous referring expression and a grounded caption. They
  are derived from the sampled scene plus a *separate* random stream, so the images, captions
  and questions are those of the versions before.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 215, 20),
    "purple": (140, 45, 185),
    "orange": (250, 130, 15),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: tuple[str, ...] = ("small", "large")
# (name, tone, RGB): the tone ("light"/"dark") is what captions and questions mostly mention.
BACKGROUNDS: tuple[tuple[str, str, tuple[int, int, int]], ...] = (
    ("white", "light", (242, 242, 242)),
    ("light grey", "light", (196, 196, 196)),
    ("cream", "light", (238, 228, 200)),
    ("dark grey", "dark", (72, 72, 72)),
    ("black", "dark", (18, 18, 18)),
    ("dark brown", "dark", (60, 40, 28)),
)
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")

# Zero-shot classes, label = COLOR_NAMES.index(color) * len(SHAPES) + SHAPES.index(shape).
CLASS_NAMES: list[str] = [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]
NUM_CLASSES: int = len(CLASS_NAMES)
# Prompts for zero-shot classification: template.format(class_name).
ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} shape.",
    "an image of a {}.",
    "a picture with a {}.",
    "a drawing of a {}.",
    "there is a {}.",
)

# Disjoint seeds: the streams np.random.default_rng([seed, index]) do not share examples.
SPLIT_SEEDS: dict[str, int] = {
    "train": 1_000,
    "validation": 2_000,
    "test": 3_000,
    # Same distribution as "test", other seed: must score like "test" (no memorised files).
    "test_heldout": 4_000,
}

_SUPERSAMPLE = 4  # Shapes are drawn at 4x the output size, then box-filtered (anti-aliasing).
_MAIN_LARGE = (0.40, 0.55)  # extent range (fraction of image side) of a large main object
_MAIN_LARGE_ALONE = (0.42, 0.60)
_MAIN_JITTER = 0.08  # the main object's centre is within this distance of the image centre
_DISTRACTOR = (0.16, 0.22)
_MARGIN = 0.03  # minimum gap between objects and to the border, fraction of the image side
_MAX_PLACEMENT_TRIES = 30
_MAX_ROTATION_DEG = 15.0
# Third seed word of the random stream that picks referring expressions: a stream independent of
# the scene's np.random.default_rng([split_seed, index]), whose draws stay exactly as before.
_REFEXP_STREAM = 1


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object of a scene; geometry in fractions of the image side."""

    shape: str
    color: str
    size: str  # "small" or "large"
    cx: float
    cy: float
    extent: float  # diameter of the circle the shape is inscribed in
    angle: float  # rotation in degrees (ignored for circles)

    def describe(self, with_size: bool) -> str:
        """Noun phrase without article, e.g. "large red circle"."""
        words = (self.size,) if with_size else ()
        return " ".join(words + (self.color, self.shape))

    def box(self) -> tuple[float, float, float, float]:
        """``(ymin, xmin, ymax, xmax)`` of the drawn shape in fractions of the image side (the
        TFDS ``BBoxFeature`` convention): the extremes of the circle or of the rotated polygon
        :func:`draw_scene` fills."""
        r = self.extent / 2
        if self.shape == "circle":
            lo, hi = (-r, -r), (r, r)
        else:
            pts = _rotated_polygon(self.shape, self.angle) * r
            lo, hi = pts.min(axis=0).tolist(), pts.max(axis=0).tolist()
        box = (self.cy + lo[1], self.cx + lo[0], self.cy + hi[1], self.cx + hi[0])
        return tuple(min(max(v, 0.0), 1.0) for v in box)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A sampled scene and its texts; :func:`draw_scene` renders it at any resolution."""

    objects: tuple[ShapeObject, ...]
    background: tuple[str, str, tuple[int, int, int]]
    caption: str
    question: str
    answer: str

    @property
    def label(self) -> int:
        """Class index of the main object (index into :data:`CLASS_NAMES`)."""
        main = self.objects[0]
        return COLOR_NAMES.index(main.color) * len(SHAPES) + SHAPES.index(main.shape)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _relation(main: ShapeObject, other: ShapeObject) -> str:
    """Where ``main`` is relative to ``other`` (image y axis points down)."""
    dx, dy = other.cx - main.cx, other.cy - main.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _region(obj: ShapeObject) -> str:
    row = ("top", "", "bottom")[min(int(obj.cy * 3), 2)]
    col = ("left", "", "right")[min(int(obj.cx * 3), 2)]
    return " ".join(w for w in (row, col) if w) or "centre"


_REGION_PHRASES = {"top left": "in the top left", "top right": "in the top right",
                   "bottom left": "in the bottom left", "bottom right": "in the bottom right",
                   "top": "at the top", "bottom": "at the bottom", "left": "on the left",
                   "right": "on the right", "centre": "in the centre"}


def _place(rng: np.random.Generator, extent: float, placed: list[ShapeObject]
           ) -> tuple[float, float] | None:
    """Centre for a new object not overlapping ``placed`` (bounding circles), or None."""
    r = extent / 2
    lo, hi = r + _MARGIN, 1 - r - _MARGIN
    for _ in range(_MAX_PLACEMENT_TRIES):
        cx, cy = rng.uniform(lo, hi, size=2)
        if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.extent / 2 + _MARGIN for o in placed):
            return float(cx), float(cy)
    return None


def _caption(rng: np.random.Generator, objects: list[ShapeObject], bg: tuple) -> str:
    main, others = objects[0], objects[1:]

    def phrase(obj: ShapeObject) -> str:
        return _article(obj.describe(with_size=bool(rng.random() < 0.5)))

    bg_word = bg[1] if rng.random() < 0.6 else bg[0]
    m = phrase(main)
    if not others:
        templates = (
            lambda: f"{m}.",
            lambda: f"{m} on a {bg_word} background.",
            lambda: f"a picture of {m}.",
            lambda: f"there is {m}.",
            lambda: f"{m} at the {_region(main)} of the image.",
            lambda: f"a single {main.describe(with_size=False)} on a {bg_word} background.",
        )
    else:
        ds = [phrase(o) for o in others]
        listing_all = " and ".join([m, *ds]) if len(ds) == 1 else f"{m}, {ds[0]} and {ds[1]}"
        n_small = len(others)
        templates = (
            lambda: f"{m} {_relation(main, others[0])} {ds[0]}.",
            lambda: f"there is {listing_all}.",
            lambda: f"{m} with {NUMBER_WORDS[n_small]} smaller shape{'s' * (n_small > 1)}.",
            lambda: f"{listing_all} on a {bg_word} background.",
            lambda: f"{NUMBER_WORDS[len(objects)]} shapes: {listing_all}.",
            lambda: f"a large {main.color} {main.shape} {_relation(main, others[-1])} "
            f"{_article(others[-1].describe(with_size=True))}.",
        )
    return templates[rng.integers(len(templates))]()


def _question(rng: np.random.Generator, objects: list[ShapeObject], bg: tuple) -> tuple[str, str]:
    main = objects[0]
    qas = (
        (f"what color is the {main.shape}?", main.color),
        (f"what shape is the {main.color} object?", main.shape),
        ("how many shapes are there?", NUMBER_WORDS[len(objects)]),
        ("what color is the largest shape?", main.color),
        ("is the background light or dark?", bg[1]),
    )
    return qas[rng.integers(len(qas))]


def sample_scene(split_seed: int, index: int) -> Scene:
    """Samples the scene and texts of example ``index`` of a split (cheap: no drawing).

    Args:
        split_seed: seed of the split, one of :data:`SPLIT_SEEDS`' values.
        index: example index within the split.

    Returns:
        The :class:`Scene`, fully determined by ``(split_seed, index)``.
    """
    rng = np.random.default_rng([split_seed, index])
    n_objects = int(rng.integers(1, 4))
    bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    main_shape = SHAPES[rng.integers(len(SHAPES))]
    main_color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    size, extent_range = "large", (_MAIN_LARGE if n_objects > 1 else _MAIN_LARGE_ALONE)
    extent = float(rng.uniform(*extent_range))
    objects: list[ShapeObject] = []
    cx, cy = (float(v) for v in 0.5 + rng.uniform(-_MAIN_JITTER, _MAIN_JITTER, size=2))
    angle = float(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    objects.append(ShapeObject(main_shape, main_color, size, cx, cy, extent, angle))

    free_colors = [c for c in COLOR_NAMES if c != main_color]
    other_shapes = [s for s in SHAPES if s != main_shape]
    for _ in range(n_objects - 1):
        color = free_colors.pop(int(rng.integers(len(free_colors))))
        shape = other_shapes[rng.integers(len(other_shapes))]
        extent = float(rng.uniform(*_DISTRACTOR))
        angle = float(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
        centre = _place(rng, extent, objects)
        if centre is not None:
            objects.append(ShapeObject(shape, color, "small", *centre, extent, angle))

    caption = _caption(rng, objects, bg)
    question, answer = _question(rng, objects, bg)
    return Scene(tuple(objects), bg, caption, question, answer)


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices [k, 2] of ``shape`` inscribed in the unit circle, pointing up."""
    if shape == "square":
        angles = np.deg2rad(45 + 90 * np.arange(4))
        return np.stack([np.cos(angles), np.sin(angles)], -1)
    if shape == "triangle":
        angles = np.deg2rad(-90 + 120 * np.arange(3))
        return np.stack([np.cos(angles), np.sin(angles)], -1)
    if shape == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1)
    if shape == "cross":
        w = 0.35  # half-width of an arm
        pts = np.array([(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1),
                        (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1)], float)
        return pts / math.hypot(1, w)
    raise ValueError(f"no polygon for shape {shape!r}")


_UNIT_POLYGONS = {s: _unit_polygon(s) for s in SHAPES if s != "circle"}


def _rotated_polygon(shape: str, angle_deg: float) -> np.ndarray:
    """Vertices [k, 2] (x, y) of ``shape`` in the unit circle, rotated as drawn."""
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return _UNIT_POLYGONS[shape] @ rot.T


def draw_scene(scene: Scene, image_size: int = 64) -> np.ndarray:
    """Renders ``scene`` as a uint8 array [image_size, image_size, 3] (anti-aliased)."""
    canvas = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (canvas, canvas), scene.background[2])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        rgb = COLORS[obj.color]
        cx, cy, r = obj.cx * canvas, obj.cy * canvas, obj.extent * canvas / 2
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
            continue
        pts = _rotated_polygon(obj.shape, obj.angle) * r + (cx, cy)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=rgb)
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def render_example(split_seed: int, index: int, image_size: int = 64) -> dict:
    """Renders example ``index`` of the split with seed ``split_seed``.

    Args:
        split_seed: seed of the split (see :data:`SPLIT_SEEDS`).
        index: example index within the split.
        image_size: side of the square output image in pixels.

    Returns:
        ``{'image': uint8 [S, S, 3], 'caption': str, 'label': int, 'question': str,
        'answer': str}``, fully determined by ``(split_seed, index, image_size)``.
    """
    return scene_example(sample_scene(split_seed, index), image_size)


def scene_example(scene: Scene, image_size: int = 64) -> dict:
    """:func:`render_example`'s dict of an already sampled ``scene``."""
    return {
        "image": draw_scene(scene, image_size),
        "caption": scene.caption,
        "label": scene.label,
        "question": scene.question,
        "answer": scene.answer,
    }


# Attributes a referring expression may add to the shape noun, in the order they are written.
_REFEXP_ATTRIBUTES = ("size", "color", "region")


def _attribute(obj: ShapeObject, name: str) -> str:
    return _region(obj) if name == "region" else getattr(obj, name)


def referring_expressions(objects: Sequence[ShapeObject], k: int) -> list[str]:
    """The minimal unambiguous referring expressions of ``objects[k]``.

    An expression is the shape noun with a subset of {size, colour, region} ("the small red
    circle in the top left" names all three). It is *unambiguous* when ``objects[k]`` is the
    only object of the scene with those attributes, and *minimal* when no proper subset of its
    attributes is unambiguous: words are added only as needed ("the circle" when the circle is
    the only one; "the red square" or "the square in the top left" when there are two squares).
    Never empty: the colours of a scene are distinct.
    """
    target = objects[k]
    unambiguous = []
    for n in range(len(_REFEXP_ATTRIBUTES) + 1):
        for subset in itertools.combinations(_REFEXP_ATTRIBUTES, n):
            if any(set(u) <= set(subset) for u in unambiguous):
                continue  # not minimal
            matches = [o for o in objects if o.shape == target.shape and all(
                _attribute(o, a) == _attribute(target, a) for a in subset)]
            if len(matches) == 1:
                unambiguous.append(subset)
    out = []
    for subset in unambiguous:
        words = [_attribute(target, a) for a in ("size", "color") if a in subset]
        phrase = " ".join(["the", *words, target.shape])
        if "region" in subset:
            phrase += " " + _REGION_PHRASES[_region(target)]
        out.append(phrase)
    return out


def grounded_caption(obj: ShapeObject) -> str:
    """Caption of the region of one object: its size, colour, shape and place, e.g. "a small
    red circle in the top left" (LocCa's grounded captioning target for the object's box)."""
    return f"{_article(obj.describe(with_size=True))} {_REGION_PHRASES[_region(obj)]}"


def scene_locations(scene: Scene, split_seed: int, index: int) -> dict:
    """Localisation targets of example ``index`` of a split (LocCa's tasks).

    Reads the scene only: the choices are drawn from a random stream of their own
    (``np.random.default_rng([split_seed, index, 1])``), so images and texts of the example are
    unchanged.

    Returns:
        ``{'objects': {'bbox': float32 [N, 4], 'label': int64 [N], 'refexp': list[str],
        'caption': list[str]}, 'refexp': str, 'refexp_bbox': float32 [4],
        'refexp_object': int}``: per object (main object first) its box (ymin, xmin, ymax,
        xmax in fractions of the image side), class, one minimal unambiguous referring
        expression (:func:`referring_expressions`) and grounded caption
        (:func:`grounded_caption`); then the example's referring expression, of the object
        ``refexp_object`` (drawn uniformly), and that object's box.
    """
    rng = np.random.default_rng([split_seed, index, _REFEXP_STREAM])
    objects = scene.objects
    expressions = []
    for k in range(len(objects)):
        options = referring_expressions(objects, k)
        expressions.append(options[int(rng.integers(len(options)))])
    boxes = np.array([o.box() for o in objects], np.float32)
    labels = np.array([COLOR_NAMES.index(o.color) * len(SHAPES) + SHAPES.index(o.shape)
                       for o in objects], np.int64)
    chosen = int(rng.integers(len(objects)))
    return {
        "objects": {"bbox": boxes, "label": labels, "refexp": expressions,
                    "caption": [grounded_caption(o) for o in objects]},
        "refexp": expressions[chosen],
        "refexp_bbox": boxes[chosen],
        "refexp_object": chosen,
    }
