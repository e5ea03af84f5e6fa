"""A deterministic synthetic world of textured shapes, for training and measuring AnyStory where no GPU exists.

A subject's identity is ``shape x colour x texture`` ("a red striped star"). Subjects are drawn as binary
polygons (supersampled, then thresholded), so every pixel belongs to exactly one subject or the background and
the instance masks are exact by construction. Textures live in the subject's own rotated, scaled coordinates, so
an identity looks the same at any pose, size and position.

Why these colours: backgrounds are desaturated and subject colours (both tones of every texture) are strongly
saturated. That keeps colour a clean identity attribute (leakage of one subject's colour into another is
measurable pixel by pixel) and lets :mod:`anystory.data.object_finder` find objects in *generated* images by
chroma alone.

Everything is a pure function of ``(seed, index)``: ``SyntheticWorld(seed).scene(i)`` is the same on every
machine, so a held-out split is just another seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "moon", "heart", "diamond", "cross")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (240, 130, 15),
    "yellow": (232, 205, 25),
    "green": (30, 170, 45),
    "blue": (35, 85, 225),
    "purple": (150, 45, 210),
}
TEXTURES: Tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
#: Texture accents are the subject colour darkened by this factor (still saturated, so still "its" colour).
SHADE = 0.58
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "sand": (203, 192, 165),
    "snow": (236, 238, 243),
    "stone": (126, 126, 131),
    "night": (26, 28, 46),
    "fog": (186, 192, 199),
    "clay": (160, 140, 128),
}
COUNT_WORDS = {1: "an object", 2: "two objects", 3: "three objects", 4: "four objects"}
SUPERSAMPLE = 4
#: Random stream of background references (subject references use streams 1..4, one per slot).
BACKGROUND_STREAM = 16


@dataclass(frozen=True)
class Identity:
    shape: str
    colour: str
    texture: str

    def __post_init__(self):
        for value, allowed, what in ((self.shape, SHAPES, "shape"), (self.colour, tuple(COLOURS), "colour"),
                                     (self.texture, TEXTURES, "texture")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")

    @property
    def name(self) -> str:
        """"red striped star"; solid subjects omit the texture word ("yellow circle")."""
        words = [self.colour] + ([] if self.texture == "solid" else [self.texture]) + [self.shape]
        return " ".join(words)

    @property
    def labels(self) -> Tuple[int, int, int]:
        """(shape, colour, texture) class indices, the identity classifier's targets."""
        return SHAPES.index(self.shape), tuple(COLOURS).index(self.colour), TEXTURES.index(self.texture)

    @classmethod
    def from_labels(cls, shape: int, colour: int, texture: int) -> "Identity":
        return cls(SHAPES[shape], tuple(COLOURS)[colour], TEXTURES[texture])

    @classmethod
    def parse(cls, name: str) -> "Identity":
        words = name.lower().split()
        texture = next((w for w in words if w in TEXTURES), "solid")
        colour = next((w for w in words if w in COLOURS), None)
        shape = next((w for w in words if w in SHAPES), None)
        if colour is None or shape is None:
            raise ValueError(f"cannot read an identity from {name!r}: it needs a colour ({', '.join(COLOURS)}) "
                             f"and a shape ({', '.join(SHAPES)})")
        return cls(shape, colour, texture)


#: The named cast: every shape twice, every colour, every texture; pairwise distinct. The first three are the
#: example subjects shipped in ``assets/examples``.
IDENTITIES: Tuple[Identity, ...] = tuple(Identity.parse(n) for n in (
    "red striped star", "blue dotted moon", "green checkered square", "yellow circle",
    "purple striped triangle", "orange dotted heart", "red checkered diamond", "blue striped cross",
    "green dotted star", "yellow checkered moon", "purple square", "orange striped circle",
    "red dotted triangle", "blue checkered heart", "green striped diamond", "purple dotted cross",
))
ALL_IDENTITIES: Tuple[Identity, ...] = tuple(Identity(s, c, t) for s in SHAPES for c in COLOURS for t in TEXTURES)


# ---- drawing ---------------------------------------------------------------------------------------------------
def _circle(cx: float = 0.0, cy: float = 0.0, r: float = 1.0, n: int = 48) -> np.ndarray:
    a = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    a = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], 1) / 16.5


def _cross(w: float = 0.36) -> np.ndarray:
    return np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                     (-1, -w), (-w, -w)], dtype=float)


#: Each shape is a list of (polygon in unit coordinates, fill): later polygons paint over earlier ones.
_SHAPE_POLYGONS = {
    "circle": [(_circle(), 1)],
    "square": [(np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]), 1)],
    "triangle": [(np.array([(0.0, -1.05), (0.95, 0.6), (-0.95, 0.6)]), 1)],
    "star": [(_star(), 1)],
    "moon": [(_circle(), 1), (_circle(0.5, -0.28, 0.82), 0)],
    "heart": [(_heart(), 1)],
    "diamond": [(np.array([(0, -1), (0.68, 0), (0, 1), (-0.68, 0)]), 1)],
    "cross": [(_cross(), 1)],
}


def _rotation(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def shape_mask(shape: str, size: Tuple[int, int], center: Tuple[float, float], radius: float,
               rotation: float) -> np.ndarray:
    """Exact boolean mask ``[H, W]`` of ``shape`` (supersampled 4x, then majority vote per pixel)."""
    if shape not in _SHAPE_POLYGONS:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    h, w = size
    canvas = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    rot = _rotation(rotation)
    for poly, fill in _SHAPE_POLYGONS[shape]:
        pts = (poly @ rot.T * radius + np.asarray(center)) * SUPERSAMPLE
        draw.polygon([tuple(p) for p in pts], fill=255 * fill)
    coarse = np.asarray(canvas, dtype=np.float32).reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))
    return coarse >= 127.5


def texture_field(texture: str, size: Tuple[int, int], center: Tuple[float, float], radius: float,
                  rotation: float) -> np.ndarray:
    """Boolean ``[H, W]``: where the texture's darker tone goes, in the subject's own (rotated, scaled) frame."""
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    rot = _rotation(-rotation)
    u = (rot[0, 0] * (xs - center[0]) + rot[0, 1] * (ys - center[1])) / radius
    v = (rot[1, 0] * (xs - center[0]) + rot[1, 1] * (ys - center[1])) / radius
    if texture == "solid":
        return np.zeros((h, w), bool)
    if texture == "striped":
        return np.floor(u / 0.3) % 2 == 1
    if texture == "dotted":
        p = 0.62
        du, dv = (u / p) - np.round(u / p), (v / p) - np.round(v / p)
        return (du**2 + dv**2) * p * p < 0.19**2
    if texture == "checkered":
        p = 0.5
        return (np.floor(u / p) + np.floor(v / p)) % 2 == 1
    raise ValueError(f"unknown texture {texture!r}; expected one of {', '.join(TEXTURES)}")


def paint_subject(canvas: np.ndarray, identity: Identity, center: Tuple[float, float], radius: float,
                  rotation: float, rng: np.random.Generator) -> np.ndarray:
    """Paint ``identity`` onto ``canvas`` (``[H, W, 3]`` float, in place); return its exact mask."""
    size = canvas.shape[:2]
    mask = shape_mask(identity.shape, size, center, radius, rotation)
    base = np.asarray(COLOURS[identity.colour], dtype=np.float32)
    accent = texture_field(identity.texture, size, center, radius, rotation)
    colour = np.where(accent[..., None], base * SHADE, base)
    colour = colour + rng.normal(0, 3.0, colour.shape).astype(np.float32)
    canvas[mask] = colour[mask]
    return mask


def background(name: str, size: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A desaturated backdrop ``[H, W, 3]`` float: base colour, a soft gradient and a per-kind pattern."""
    if name not in BACKGROUNDS:
        raise ValueError(f"unknown background {name!r}; expected one of {', '.join(BACKGROUNDS)}")
    h, w = size
    base = np.asarray(BACKGROUNDS[name], dtype=np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    angle = rng.uniform(0, 2 * math.pi)
    light = (math.cos(angle) * xs + math.sin(angle) * ys - 0.5) * rng.uniform(10, 30)
    img = base + light[..., None]
    if name == "sand":
        img += (np.sin((ys * math.cos(angle) - xs * math.sin(angle)) * rng.uniform(40, 60)) * 6)[..., None]
    elif name == "night":
        stars = rng.random((h, w)) < 0.012
        img[stars] = 200.0
    elif name == "stone":
        blotch = np.kron(rng.normal(0, 9, (h // 8 + 1, w // 8 + 1)), np.ones((8, 8)))[:h, :w]
        img += blotch[..., None]
    img = img + rng.normal(0, 2.5, img.shape)
    return img.astype(np.float32)


# ---- scenes ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    identity: Identity
    center: Tuple[float, float]  # (x, y) pixels
    radius: float  # pixels
    rotation: float  # radians


@dataclass
class Scene:
    """An image with exact instance masks (``masks[i]`` is subject i; masks are disjoint)."""

    image: np.ndarray  # [H, W, 3] uint8
    masks: np.ndarray  # [N, H, W] bool
    placements: List[Placement]
    background: str
    caption: str  # names every subject: "a red striped star and a blue dotted moon on sand"
    generic_caption: str  # names none: "two objects on sand"

    @property
    def identities(self) -> List[Identity]:
        return [p.identity for p in self.placements]

    def routing_target(self) -> np.ndarray:
        """``[N+1, H, W]`` float one-hot: subjects in order, background last (the router's ground truth)."""
        bg = ~self.masks.any(axis=0)
        return np.concatenate([self.masks, bg[None]]).astype(np.float32)


@dataclass
class Reference:
    """A subject alone, as a user would hand it in: RGBA, alpha = exact mask."""

    identity: Identity
    image: Image.Image  # RGBA

    @property
    def mask(self) -> np.ndarray:
        return np.asarray(self.image)[..., 3] > 127


@dataclass
class Sample:
    """A target scene plus one reference view per subject, drawn with a *different* pose than in the scene."""

    scene: Scene
    references: List[Reference]


def caption_for(identities: Sequence[Identity], background_name: Optional[str]) -> str:
    """"a red striped star and a blue moon on sand"; ``background_name=None`` leaves the background unnamed (what
    the background-reference stage trains on: there the scene's background comes from its reference image)."""
    names = [f"{'an' if i.name[0] in 'aeiou' else 'a'} {i.name}" for i in identities]
    subjects = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return subjects if background_name is None else f"{subjects} on {background_name}"


def generic_caption_for(count: int, background_name: Optional[str]) -> str:
    return COUNT_WORDS[count] if background_name is None else f"{COUNT_WORDS[count]} on {background_name}"


@dataclass
class WorldConfig:
    image_size: int = 64
    reference_size: int = 64
    min_radius: float = 8.5  # pixels at image_size 64 (scaled for other sizes)
    max_radius: float = 14.0
    max_rotation: float = 180.0  # degrees a subject in a scene turns at most, either way (references: always freely)
    min_subjects: int = 1
    max_subjects: int = 3
    identities: str = "all"  # "all" (every shape x colour x texture) or "named" (the 16 of IDENTITIES)
    distinct_colours: bool = True  # no two subjects of one scene share a colour (leakage stays measurable)
    backgrounds: Tuple[str, ...] = tuple(BACKGROUNDS)

    def __post_init__(self):
        if self.identities not in ("all", "named"):
            raise ValueError(f"identities must be 'all' or 'named', got {self.identities!r}")
        if not 0.0 <= self.max_rotation <= 180.0:
            raise ValueError(f"max_rotation must be in [0, 180] degrees, got {self.max_rotation}")
        if not 1 <= self.min_subjects <= self.max_subjects <= 4:
            raise ValueError(f"need 1 <= min_subjects <= max_subjects <= 4, got {self.min_subjects}, {self.max_subjects}")
        self.backgrounds = tuple(self.backgrounds)


class SyntheticWorld:
    """Deterministic sampler of scenes, references and training samples: everything is a function of (seed, index)."""

    def __init__(self, seed: int = 0, config: Optional[WorldConfig] = None, **overrides):
        self.seed = seed
        self.config = config or WorldConfig(**overrides)
        self.pool = ALL_IDENTITIES if self.config.identities == "all" else IDENTITIES

    def rng(self, index: int, stream: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, index, stream])

    def _pick_identities(self, rng: np.random.Generator, count: int) -> List[Identity]:
        chosen: List[Identity] = []
        while len(chosen) < count:
            cand = self.pool[rng.integers(len(self.pool))]
            if cand in chosen or (self.config.distinct_colours and any(c.colour == cand.colour for c in chosen)):
                continue
            chosen.append(cand)
        return chosen

    def layout(self, identities: Sequence[Identity], rng: np.random.Generator) -> List[Placement]:
        """Non-overlapping placements (bounding circles apart), shrinking sizes when a scene is crowded."""
        cfg = self.config
        unit = cfg.image_size / 64.0
        lo, hi = cfg.min_radius * unit, cfg.max_radius * unit
        turn = math.radians(cfg.max_rotation)
        for attempt in range(200):
            shrink = 1.0 - 0.3 * min(attempt / 100.0, 1.0)
            placed: List[Placement] = []
            for ident in identities:
                r = rng.uniform(lo, hi) * shrink
                for _ in range(50):
                    c = rng.uniform(r + 1, cfg.image_size - r - 1, size=2)
                    if all(math.dist(c, p.center) > r + p.radius + 2 * unit for p in placed):
                        placed.append(Placement(ident, (float(c[0]), float(c[1])), float(r), float(rng.uniform(-turn, turn))))
                        break
                else:
                    break
            if len(placed) == len(identities):
                return placed
        raise RuntimeError(f"could not place {len(identities)} subjects on a {cfg.image_size}px canvas")

    def render(self, placements: Sequence[Placement], background_name: str, rng: np.random.Generator) -> Scene:
        size = (self.config.image_size, self.config.image_size)
        canvas = background(background_name, size, rng)
        masks = np.stack([paint_subject(canvas, p.identity, p.center, p.radius, p.rotation, rng) for p in placements])
        for i in range(len(masks)):  # later subjects occlude earlier ones: keep the masks disjoint and exact
            masks[i] &= ~masks[i + 1:].any(axis=0)
        image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
        ids = [p.identity for p in placements]
        return Scene(image, masks, list(placements), background_name, caption_for(ids, background_name),
                     generic_caption_for(len(ids), background_name))

    def scene(self, index: int, identities: Optional[Sequence[Identity]] = None,
              background_name: Optional[str] = None, count: Optional[int] = None) -> Scene:
        """Scene ``index``; ``identities`` / ``background_name`` / ``count`` pin what would otherwise be random."""
        rng = self.rng(index)
        cfg = self.config
        if identities is None:
            drawn = int(rng.integers(cfg.min_subjects, cfg.max_subjects + 1))
            identities = self._pick_identities(rng, drawn if count is None else count)
        else:
            identities = list(identities)
            rng.integers(0, 1)  # keep the stream aligned whether or not identities were pinned
        if background_name is None:
            background_name = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
        return self.render(self.layout(identities, rng), background_name, rng)

    def reference(self, identity: Identity, index: int, slot: int = 0) -> Reference:
        """A reference view: the subject alone on a transparent square canvas, large, at its own random pose."""
        rng = self.rng(index, stream=1 + slot)
        size = self.config.reference_size
        canvas = np.full((size, size, 3), 255.0, np.float32)
        radius = size * rng.uniform(0.36, 0.44)
        shift = rng.uniform(-0.04, 0.04, 2) * size
        mask = paint_subject(canvas, identity, (size / 2 + shift[0], size / 2 + shift[1]), radius,
                             float(rng.uniform(-math.pi, math.pi)), rng)
        rgba = np.concatenate([np.clip(np.round(canvas), 0, 255).astype(np.uint8),
                               (mask * 255).astype(np.uint8)[..., None]], axis=2)
        return Reference(identity, Image.fromarray(rgba, "RGBA"))

    def background_reference(self, name: str, index: int) -> Image.Image:
        """Another view of backdrop ``name`` with no objects (RGB, ``reference_size``): its own light direction,
        pattern phase and noise, so only what the kind of backdrop shares (colour and texture) carries over to
        a scene of that kind. The background-reference stage's reference and the background study's."""
        size = self.config.reference_size
        image = background(name, (size, size), self.rng(index, stream=BACKGROUND_STREAM))
        return Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8), "RGB")

    def sample(self, index: int, count: Optional[int] = None) -> Sample:
        """Stage-1/2 training sample: the scene and a fresh reference view of each of its subjects."""
        scene = self.scene(index, count=count)
        return Sample(scene, [self.reference(p.identity, index, slot) for slot, p in enumerate(scene.placements)])

    def subject_crops(self, index: int) -> List[Tuple[np.ndarray, np.ndarray, Identity]]:
        """(scene image, subject mask, identity) for every subject of scene ``index`` (classifier training)."""
        scene = self.scene(index)
        return [(scene.image, scene.masks[i], p.identity) for i, p in enumerate(scene.placements)]


def save_reference_png(reference: Reference, path: str) -> None:
    """Write a reference as an RGBA PNG (its alpha channel is the mask the pipeline's default segmenter reads)."""
    reference.image.save(path)
