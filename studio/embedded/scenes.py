"""Procedural training data for the embedded model family: coloured shapes on plain backgrounds, with captions.

Every image is drawn on the fly from a `Scene` (a background colour and one or more shapes), so the data is
infinite, seeded and needs no download. A fixed set of (shape, colour, background) triples never appears in
training: evaluating on them measures generalisation rather than memory.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "ring")
# Shapes the base model never saw: drawn and read like the others, but in none of the triples above, so the family's
# training data is unchanged. A LoRA teaches them (`python -m studio.embedded train-lora`, studio/embedded/lora.py).
LORA_SHAPES = ("hexagon",)
PALETTE = {
    "red": (220, 38, 38),
    "orange": (249, 125, 22),
    "yellow": (250, 214, 30),
    "green": (22, 163, 74),
    "blue": (37, 99, 235),
    "purple": (140, 55, 225),
    "pink": (240, 110, 185),
    "white": (248, 248, 248),
    "black": (24, 24, 24),
    "gray": (130, 130, 130),
}
SHAPE_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black")
BACKGROUNDS = ("white", "black", "gray", "blue", "green", "yellow")
# Centres as fractions of the image side. The oracle reads positions back on a 3x3 grid.
POSITIONS = {
    "center": (0.5, 0.5),
    "left": (0.26, 0.5),
    "right": (0.74, 0.5),
    "top": (0.5, 0.26),
    "bottom": (0.5, 0.74),
    "top left": (0.26, 0.26),
    "top right": (0.74, 0.26),
    "bottom left": (0.26, 0.74),
    "bottom right": (0.74, 0.74),
}
SIZES = {"small": 0.15, "large": 0.23}  # radius as a fraction of the image side
POSITION_JITTER = 0.03
COLOUR_JITTER = 8
HELD_OUT_FRACTION = 0.1
SPLIT_SEED = 1234

_POSITION_PHRASES = {
    "center": ("in the center", "in the middle", "at the center"),
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "at the top center", "near the top"),
    "bottom": ("at the bottom", "at the bottom center", "near the bottom"),
}
for _corner in ("top left", "top right", "bottom left", "bottom right"):
    _vertical, _horizontal = _corner.split()
    _POSITION_PHRASES[_corner] = (
        f"at the {_corner}",
        f"in the {_corner} corner",
        f"in the upper {_horizontal}" if _vertical == "top" else f"in the lower {_horizontal}",
    )
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
# Both spellings are in the captions, so the model learns both (people write "grey" as often as "gray").
_COLOUR_WORDS = {"gray": ("gray", "grey")}


def colour_word(colour: str, rng: random.Random | None = None) -> str:
    """The word for a colour in a caption: the canonical one without `rng`, otherwise any accepted spelling."""
    spellings = _COLOUR_WORDS.get(colour, (colour,))
    return spellings[0] if rng is None else rng.choice(spellings)


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    position: str
    size: str
    # Offsets from the named position (fractions of the side) so the data isn't nine points.
    dx: float = 0.0
    dy: float = 0.0

    def centre(self, side: int) -> tuple[float, float]:
        fx, fy = POSITIONS[self.position]
        radius = self.radius(side)
        cx = min(max((fx + self.dx) * side, radius + 1), side - radius - 1)
        cy = min(max((fy + self.dy) * side, radius + 1), side - radius - 1)
        return cx, cy

    def radius(self, side: int) -> float:
        return SIZES[self.size] * side


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...] = field(default_factory=tuple)
    # Small colour jitter (one offset per scene) so colours are regions of RGB space, not single points.
    tint: tuple[int, int, int] = (0, 0, 0)

    @property
    def main(self) -> Shape:
        return self.shapes[0]

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.main.shape, self.main.colour, self.background)


def all_triples() -> list[tuple[str, str, str]]:
    return [
        (shape, colour, background)
        for shape, colour, background in itertools.product(SHAPES, SHAPE_COLOURS, BACKGROUNDS)
        if colour != background
    ]


def held_out_triples() -> frozenset[tuple[str, str, str]]:
    """A fixed 10% of (shape, colour, background) triples that no training stage ever sees."""
    triples = all_triples()
    rng = random.Random(SPLIT_SEED)
    rng.shuffle(triples)
    count = round(len(triples) * HELD_OUT_FRACTION)
    return frozenset(triples[:count])


def seen_triples() -> list[tuple[str, str, str]]:
    held_out = held_out_triples()
    return [triple for triple in all_triples() if triple not in held_out]


def lora_triples(shapes: tuple[str, ...] = LORA_SHAPES) -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) of shapes the base model never saw, for a LoRA to learn them from."""
    return [
        (shape, colour, background)
        for shape, colour, background in itertools.product(shapes, SHAPE_COLOURS, BACKGROUNDS)
        if colour != background
    ]


def random_shape(rng: random.Random, shape: str, colour: str) -> Shape:
    return Shape(
        shape=shape,
        colour=colour,
        position=rng.choice(list(POSITIONS)),
        size=rng.choice(list(SIZES)),
        dx=rng.uniform(-POSITION_JITTER, POSITION_JITTER),
        dy=rng.uniform(-POSITION_JITTER, POSITION_JITTER),
    )


def random_scene(rng: random.Random, triples: list[tuple[str, str, str]] | None = None) -> Scene:
    shape, colour, background = rng.choice(triples or seen_triples())
    tint = tuple(rng.randint(-COLOUR_JITTER, COLOUR_JITTER) for _ in range(3))
    return Scene(background=background, shapes=(random_shape(rng, shape, colour),), tint=tint)


ATTRIBUTES = ("shape", "colour", "background", "position", "size")


def vary_one_attribute(
    rng: random.Random, scene: Scene, allowed: set | frozenset | None = None, weights: tuple[float, ...] | None = None
) -> Scene:
    """The same scene with one of shape, colour, background, position or size changed (a hard negative).
    `weights` (in ATTRIBUTES order) say how often each attribute is the one changed."""
    main = scene.main
    for _ in range(20):
        attribute = rng.choices(ATTRIBUTES, weights=weights)[0]
        if attribute == "background":
            candidate = replace(scene, background=rng.choice([b for b in BACKGROUNDS if b != scene.background]))
        else:
            choices = {
                "shape": SHAPES,
                "colour": SHAPE_COLOURS,
                "position": tuple(POSITIONS),
                "size": tuple(SIZES),
            }[attribute]
            value = rng.choice([c for c in choices if c != getattr(main, attribute)])
            candidate = replace(scene, shapes=(replace(main, **{attribute: value}),) + scene.shapes[1:])
        if candidate.main.colour != candidate.background and (allowed is None or candidate.triple in allowed):
            return candidate
    return scene


def caption(scene: Scene, rng: random.Random | None = None, position_probability: float = 0.75,
            size_probability: float = 0.75) -> str:
    """A plain-English caption of the scene's main shape. With `rng`, the wording varies (and size and
    position are sometimes left out); without, the canonical form."""
    main = scene.main
    if rng is None:
        return f"a {main.size} {main.colour} {main.shape} {_POSITION_PHRASES[main.position][0]} on a {scene.background} background"
    size = rng.choice(_SIZE_WORDS[main.size]) if rng.random() < size_probability else ""
    where = rng.choice(_POSITION_PHRASES[main.position]) if rng.random() < position_probability else ""
    thing = " ".join(word for word in (size, colour_word(main.colour, rng), main.shape) if word)
    templates = (
        "a {thing} {where} on a {bg} background",
        "a {thing} {where} on {bg}",
        "a {thing} {where}, {bg} background",
        "a {bg} background with a {thing} {where}",
        "{thing} {where} on a {bg} background",
    )
    text = rng.choice(templates).format(thing=thing, where=where, bg=colour_word(scene.background, rng))
    if rng.random() < 0.5:  # "an orange ring" as people write it, as well as "a orange ring"
        text = _AN_BEFORE_VOWEL.sub(r"\1an \2", text)
    return " ".join(text.replace(" ,", ",").split())


_AN_BEFORE_VOWEL = re.compile(r"(^|\s)a ([aeiou])")


def prompt_attributes(prompt: str) -> dict[str, str]:
    """What a prompt in the captions' words asks of the main shape: {"shape", "colour", "background", "position",
    "size"}, each only where the prompt names it. Empty when it names no shape, or more than one."""
    text = " ".join(re.sub(r"[^a-z ]", " ", prompt.lower()).split())
    shapes = [shape for shape in SHAPES + LORA_SHAPES if re.search(rf"\b{shape}s?\b", text)]
    if len(shapes) != 1:
        return {}
    shape = shapes[0]
    spellings = {word: colour for colour in PALETTE for word in _COLOUR_WORDS.get(colour, (colour,))}
    colour_words = "|".join(spellings)
    size_words = {word: size for size, words in _SIZE_WORDS.items() for word in words}
    found = {"shape": shape}
    thing = re.search(rf"(?:\b({'|'.join(size_words)}) )?(?:\b({colour_words}) )?{shape}", text)
    if thing and thing.group(1):
        found["size"] = size_words[thing.group(1)]
    if thing and thing.group(2):
        found["colour"] = spellings[thing.group(2)]
    background = (re.search(rf"\b({colour_words}) background\b", text)
                  or re.search(rf"\bon (?:an? )?({colour_words})$", text))
    if background:
        found["background"] = spellings[background.group(1)]
    phrases = sorted(((phrase, position) for position, options in _POSITION_PHRASES.items() for phrase in options),
                     key=lambda item: -len(item[0]))
    for phrase, position in phrases:
        if re.search(rf"\b{phrase}\b", text):
            found["position"] = position
            break
    return found


def known_words() -> dict[str, list[str]]:
    """What the captions teach the model, by kind: the words and phrases a prompt can use to steer it."""
    return {
        "shapes": list(SHAPES),
        "shape colours": [spelling for colour in SHAPE_COLOURS for spelling in _COLOUR_WORDS.get(colour, (colour,))],
        "backgrounds": [spelling for colour in BACKGROUNDS for spelling in _COLOUR_WORDS.get(colour, (colour,))],
        "positions": [phrase for phrases in _POSITION_PHRASES.values() for phrase in phrases],
        "sizes": [word for words in _SIZE_WORDS.values() for word in words],
        "other": ["a", "an", "background", "on", "with"],
    }


def vocabulary() -> list[str]:
    """Every word the captions use, for the tokenizer's merges (other text falls back to characters), and a few
    words common in prompts that the captions never use, so that they too are one token each."""
    words = {word for phrases in known_words().values() for phrase in phrases for word in phrase.split()}
    words |= {"and", "of", "shape", "image", "picture", "photo", "drawing"}
    return sorted(words)


# ----- drawing -----


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if kind == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if kind == "hexagon":  # flat top and bottom, its corners on the circle of radius r as the triangle's and star's are
        return [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]
    raise ValueError(kind)


def _colour(name: str, tint: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + t))) for c, t in zip(PALETTE[name], tint))


def render(scene: Scene, side: int = 64, supersample: int = 4) -> Image.Image:
    """Draw the scene at `side` px, antialiased by drawing larger and downsampling."""
    big = side * supersample
    background = _colour(scene.background, scene.tint)
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        cx, cy = (c * supersample for c in shape.centre(side))
        r = shape.radius(side) * supersample
        fill = _colour(shape.colour, scene.tint)
        if shape.shape in ("circle", "ring"):
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            if shape.shape == "ring":
                hole = r * 0.55
                draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=background)
        elif shape.shape == "square":
            half = r * 0.85
            draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
        else:
            draw.polygon(_shape_polygon(shape.shape, cx, cy, r), fill=fill)
    return image.resize((side, side), Image.Resampling.BOX) if supersample > 1 else image


def shape_box(shape: Shape, side: int, margin: float = 0.0) -> tuple[int, int, int, int]:
    """The pixel box (left, top, right, bottom) a shape occupies, grown by `margin` px."""
    cx, cy = shape.centre(side)
    r = shape.radius(side) + margin
    return (max(0, math.floor(cx - r)), max(0, math.floor(cy - r)), min(side, math.ceil(cx + r)), min(side, math.ceil(cy + r)))


def boxes_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def to_tensor_batch(images: list[Image.Image]) -> np.ndarray:
    """uint8 PIL images -> float32 NCHW in [-1, 1], the range the VAE works in."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return (array / 127.5 - 1.0).transpose(0, 3, 1, 2)
