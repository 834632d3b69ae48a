"""SynthReID: a synthetic person re-ID dataset in the Market-1501 layout.

Each identity is a pedestrian-like figure (head, torso, arms, legs) drawn with PIL. Identity lives in
global cues (upper/lower clothing colour and style, skin, hair, height, build) and in small local
cues (a chest logo, a bag, shoe colour, a hat). A share of identities come as *twins*: two
identities that share every global cue and all local cues but exactly one. Twins stay in the same
split, so the training set teaches local cues and the test set gives a twins-only evaluation.

Each camera has its own nuisance (illumination gain, colour cast, background palette and clutter,
blur, sensor noise, position/scale offsets, how often people walk the other way, i.e. mirror);
each image adds pose jitter (arm swing, stride, head offset, width squash) and position/scale
jitter. Output is byte-identical for a seed: every random stream is a numpy Generator seeded from
(seed, purpose, index), images are saved as baseline JPEG with a fixed quality and no metadata,
and the manifest is written in a fixed order without timestamps.

Layout (Market-1501): ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` holding
``PPPP_cCsS_FFFFFF_NN.jpg``; pid ``0000`` marks gallery distractors; ``manifest.json`` at the root.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pfe.errors import DataError

GENERATOR = "pfe synthreid"
VERSION = 1
HEIGHT, WIDTH = 128, 64  # like Market-1501 crops (H x W)
SUPERSAMPLE = 2  # figures are drawn at 2x and downsampled (anti-aliasing)
JPEG_QUALITY = 90
DEFAULTS: dict[str, int] = {"ids_train": 100, "ids_test": 100, "images_per_id": 8, "cameras": 4}
TWIN_SHARE = 0.3  # share of identities that come in twin pairs
QUERIES_PER_ID = 2  # query images per test identity, each from a different camera
SPLIT_DIRS = ("bounding_box_train", "query", "bounding_box_test")
MARKET_NAME = re.compile(r"([-\d]+)_c(\d)s(\d)_(\d+)_(\d+)")

Color = tuple[int, int, int]
COLORS: dict[str, Color] = {
    "black": (28, 28, 32),
    "white": (236, 236, 232),
    "grey": (128, 128, 128),
    "red": (205, 30, 38),
    "darkred": (120, 20, 30),
    "blue": (35, 70, 200),
    "navy": (25, 32, 88),
    "cyan": (40, 185, 205),
    "green": (40, 150, 60),
    "olive": (110, 120, 45),
    "yellow": (235, 205, 40),
    "orange": (240, 125, 30),
    "purple": (125, 50, 165),
    "pink": (240, 135, 175),
    "brown": (115, 72, 40),
    "beige": (212, 192, 150),
}
SKIN: dict[str, Color] = {"light": (238, 200, 170), "medium": (200, 150, 110), "dark": (120, 82, 58)}
HAIR: dict[str, Color] = {
    "black": (22, 20, 20),
    "brown": (95, 60, 32),
    "blonde": (215, 180, 100),
    "grey": (165, 165, 160),
}
HEIGHTS: dict[str, float] = {"short": 0.80, "medium": 0.87, "tall": 0.94}  # figure height / image height
BUILDS: dict[str, float] = {"slim": 0.82, "medium": 1.0, "broad": 1.2}  # width multiplier

GLOBAL_CHOICES: dict[str, tuple[str, ...]] = {
    "upper_color": tuple(COLORS),
    "lower_color": ("black", "grey", "blue", "navy", "brown", "beige", "white", "green", "darkred", "olive"),
    "lower_style": ("trousers", "shorts", "skirt"),
    "sleeves": ("long", "short"),
    "skin": tuple(SKIN),
    "hair": tuple(HAIR),
    "height": tuple(HEIGHTS),
    "build": tuple(BUILDS),
}
GLOBAL_KEYS: tuple[str, ...] = tuple(GLOBAL_CHOICES)
LOCAL_KEYS: tuple[str, ...] = ("logo", "bag", "shoes", "hat")
LOGO_SHAPES = ("circle", "square", "triangle", "cross")
LOGO_COLORS = ("red", "yellow", "white", "black", "green", "blue", "orange", "cyan", "pink")
BAG_KINDS = ("hip", "hand", "backpack")
BAG_COLORS = ("brown", "black", "red", "blue", "orange", "beige", "green")
HAT_KINDS = ("cap", "beanie")
HAT_COLORS = ("red", "black", "white", "blue", "yellow", "green", "orange")
SHOE_COLORS = ("black", "white", "red", "blue", "yellow", "brown")
MIN_CUE_CONTRAST = 110.0  # RGB distance a local cue keeps from what it sits on / what it replaces


def _dist(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(COLORS[a], COLORS[b], dtype=float)))


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


# ---------------------------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------------------------


def _sample_global(rng: np.random.Generator) -> dict[str, str]:
    g = {key: _pick(rng, choices) for key, choices in GLOBAL_CHOICES.items()}
    while _dist(g["upper_color"], g["lower_color"]) < 60:  # keep upper and lower body apart
        g["lower_color"] = _pick(rng, GLOBAL_CHOICES["lower_color"])
    return g


def _local_value(rng: np.random.Generator, key: str, g: dict[str, str], avoid: str | None = None) -> str:
    """A value for local attribute ``key``; with ``avoid``, one that differs visibly from it."""
    avoid_color = None if avoid in (None, "none") else avoid.split("-")[-1]
    for _ in range(1000):
        if key == "shoes":
            value = _pick(rng, SHOE_COLORS)
        else:
            p_none = {"logo": 0.25, "bag": 0.4, "hat": 0.5}[key]
            # a twin's variant toggles presence, or changes the colour (and maybe the kind)
            none = rng.random() < p_none if avoid is None else avoid != "none" and rng.random() < 0.3
            if none:
                value = "none"
            else:
                kinds, colors = {
                    "logo": (LOGO_SHAPES, LOGO_COLORS),
                    "bag": (BAG_KINDS, BAG_COLORS),
                    "hat": (HAT_KINDS, HAT_COLORS),
                }[key]
                value = f"{_pick(rng, kinds)}-{_pick(rng, colors)}"
        color = None if value == "none" else value.split("-")[-1]
        if key == "logo" and color is not None and _dist(color, g["upper_color"]) < MIN_CUE_CONTRAST:
            continue  # a logo must stand out from the shirt
        if avoid is not None:
            if value == avoid:
                continue
            if color is not None and avoid_color is not None and _dist(color, avoid_color) < MIN_CUE_CONTRAST:
                continue  # a twin's cue must look different, not a near shade
        return value
    raise RuntimeError(f"no value for local attribute {key!r}")  # pragma: no cover - palettes are large


def _flat(attrs: dict[str, dict[str, str]]) -> tuple[str, ...]:
    return tuple(attrs["global"][k] for k in GLOBAL_KEYS) + tuple(attrs["local"][k] for k in LOCAL_KEYS)


def _hamming(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))


def _make_identities(
    rng: np.random.Generator, n: int, n_pairs: int, taken: list[tuple[str, ...]]
) -> list[tuple[dict[str, dict[str, str]], int | None, str | None]]:
    """``n`` identities, the first ``2 * n_pairs`` as twin pairs (2i, 2i+1).

    Returns (attributes, index of the twin or None, local key the twins differ in or None). Any two
    identities that are not twins differ in at least two attributes (``taken`` holds those of other splits).
    """

    def fresh() -> dict[str, dict[str, str]]:
        while True:
            g = _sample_global(rng)
            attrs = {"global": g, "local": {k: _local_value(rng, k, g) for k in LOCAL_KEYS}}
            if all(_hamming(_flat(attrs), t) >= 2 for t in taken):
                return attrs

    out: list[tuple[dict[str, dict[str, str]], int | None, str | None]] = []
    for i in range(n_pairs):
        while True:
            base = fresh()
            key = _pick(rng, LOCAL_KEYS)
            twin = {"global": dict(base["global"]), "local": dict(base["local"])}
            twin["local"][key] = _local_value(rng, key, base["global"], avoid=base["local"][key])
            if all(_hamming(_flat(twin), t) >= 2 for t in taken):
                break
        taken += [_flat(base), _flat(twin)]
        out += [(base, 2 * i + 1, key), (twin, 2 * i, key)]
    for _ in range(n - 2 * n_pairs):
        attrs = fresh()
        taken.append(_flat(attrs))
        out.append((attrs, None, None))
    return out


# ---------------------------------------------------------------------------------------------
# cameras and rendering
# ---------------------------------------------------------------------------------------------


def _camera(seed: int, cam: int) -> dict[str, Any]:
    """Nuisance of camera ``cam`` (1-based), rounded so the manifest holds exactly what is used."""
    rng = np.random.default_rng([seed, 1, cam])

    def r(x: float) -> float:
        return round(float(x), 4)

    return {
        "gain": r(rng.uniform(0.65, 1.25)),
        "cast": [r(v) for v in 1.0 + rng.uniform(-0.13, 0.13, 3)],
        "wall": list(_muted(rng, 60, 200, (0.1, 0.45))),
        "floor": list(_muted(rng, 50, 180, (0.1, 0.35))),
        "horizon": r(rng.uniform(0.55, 0.85)),
        "clutter": int(rng.integers(4, 13)),
        "blur": r(rng.uniform(0.0, 1.0)),
        "noise": r(rng.uniform(2.0, 8.0)),
        "mirror": r(rng.uniform(0.1, 0.9)),
        "scale": r(rng.uniform(0.92, 1.05)),
        "dx": r(rng.uniform(-2.5, 2.5)),
        "dy": r(rng.uniform(-3.0, 3.0)),
    }


def _shade(c: Color, f: float) -> Color:
    return (min(255, int(c[0] * f)), min(255, int(c[1] * f)), min(255, int(c[2] * f)))


def _muted(rng: np.random.Generator, lo: int, hi: int, saturation: tuple[float, float]) -> Color:
    """A random colour pulled towards grey (scenes are mostly dull, with a few vivid things)."""
    r, g, b = (int(v) for v in rng.integers(lo, hi, 3))
    m, s = (r + g + b) / 3.0, float(rng.uniform(*saturation))
    return (int(m + (r - m) * s), int(m + (g - m) * s), int(m + (b - m) * s))


def _background(rng: np.random.Generator, cam: dict[str, Any], w: int, h: int) -> Image.Image:
    """The camera's wall/floor palette, tinted per image, with random clutter shapes."""
    horizon = int(h * (cam["horizon"] + rng.uniform(-0.05, 0.05)))
    tint = rng.integers(-15, 16, 3)
    wall = tuple(int(v) for v in np.clip(np.add(cam["wall"], tint), 0, 255))
    floor = tuple(int(v) for v in np.clip(np.add(cam["floor"], tint), 0, 255))
    img = Image.new("RGB", (w, h), wall)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, horizon, w, h), fill=floor)
    for _ in range(cam["clutter"] + int(rng.integers(-2, 4))):
        color = _muted(rng, 20, 236, (0.15, 0.8))
        x0, y0 = rng.uniform(-0.2 * w, w), rng.uniform(-0.1 * h, h)
        bw, bh = rng.uniform(0.08 * w, 0.6 * w), rng.uniform(0.03 * h, 0.35 * h)
        kind = int(rng.integers(4))
        if kind == 0:
            draw.rectangle((x0, y0, x0 + bw, y0 + bh), fill=color)
        elif kind == 1:
            draw.ellipse((x0, y0, x0 + bw, y0 + bh), fill=color)
        elif kind == 2:  # pole / railing
            draw.line((x0, y0, x0 + rng.uniform(-0.2, 0.2) * w, y0 + bh * 2), fill=color, width=int(rng.integers(2, 9)))
        else:  # window grid
            for j in range(int(rng.integers(2, 5))):
                draw.line((x0, y0 + j * bh / 3, x0 + bw, y0 + j * bh / 3), fill=color, width=2)
    return img


def _thick(
    draw: ImageDraw.ImageDraw, p0: tuple[float, float], p1: tuple[float, float], width: float, color: Color
) -> None:
    """A limb: an outlined thick segment with round ends."""
    r = width / 2
    dark = _shade(color, 0.55)
    for c, extra in ((dark, 2.0), (color, 0.0)):
        draw.line((p0, p1), fill=c, width=max(1, int(round(width + extra))))
        for x, y in (p0, p1):
            draw.ellipse((x - r - extra / 2, y - r - extra / 2, x + r + extra / 2, y + r + extra / 2), fill=c)


def _lerp(p0: tuple[float, float], p1: tuple[float, float], t: float) -> tuple[float, float]:
    return (p0[0] + (p1[0] - p0[0]) * t, p0[1] + (p1[1] - p0[1]) * t)


def _draw_figure(
    img: Image.Image,
    attrs: dict[str, dict[str, str]],
    rng: np.random.Generator,
    cx: float,
    top: float,
    fh: float,
    wmul: float,
) -> None:
    """Draw a pedestrian of height ``fh`` pixels whose head top is at ``top``, centred on ``cx``."""
    g, loc = attrs["global"], attrs["local"]
    draw = ImageDraw.Draw(img)
    upper, lower = COLORS[g["upper_color"]], COLORS[g["lower_color"]]
    skin, hair = SKIN[g["skin"]], HAIR[g["hair"]]
    bw = BUILDS[g["build"]] * wmul

    def y(f: float) -> float:
        return top + f * fh

    def u(f: float) -> float:
        return f * fh

    sw, ww, hip_y, sh_y = u(0.115) * bw, u(0.095) * bw, y(0.52), y(0.165)
    # legs (stride jitter: one leg forward, one back)
    stride = rng.normal(0.0, 0.07)
    foot_y = y(0.965)
    leg_w = u(0.058) * bw
    legs = []
    for side, swing in ((-1, stride), (1, -stride)):
        hip = (cx + side * ww * 0.55, hip_y)
        foot = (hip[0] + swing * u(0.45) + side * u(0.012), foot_y - abs(swing) * u(0.06))
        legs.append((hip, foot))
    style = g["lower_style"]
    for hip, foot in legs:
        knee_t = 0.42 if style != "trousers" else 1.0
        _thick(draw, hip, foot, leg_w * (0.85 if style != "trousers" else 1.0), skin if style != "trousers" else lower)
        if style == "shorts":
            _thick(draw, hip, _lerp(hip, foot, knee_t), leg_w * 1.1, lower)
    shoe = COLORS[loc["shoes"]]
    for _, foot in legs:
        fx, fy = foot
        draw.ellipse((fx - u(0.042), fy - u(0.022), fx + u(0.05), fy + u(0.022)), fill=shoe, outline=_shade(shoe, 0.5))
    # pelvis / skirt
    if style == "skirt":
        draw.polygon(
            [
                (cx - ww, hip_y - u(0.02)),
                (cx + ww, hip_y - u(0.02)),
                (cx + ww * 1.45, y(0.74)),
                (cx - ww * 1.45, y(0.74)),
            ],
            fill=lower,
            outline=_shade(lower, 0.55),
        )
    else:
        draw.polygon(
            [(cx - ww, hip_y - u(0.02)), (cx + ww, hip_y - u(0.02)), (cx + ww, y(0.6)), (cx - ww, y(0.6))], fill=lower
        )
    # backpack bulk peeks out behind the shoulders
    bag = loc["bag"]
    bag_kind, bag_color = (bag.split("-") + [""])[:2] if bag != "none" else ("none", "")
    if bag_kind == "backpack":
        bc = COLORS[bag_color]
        draw.rounded_rectangle(
            (cx - sw * 1.08, y(0.19), cx + sw * 1.08, y(0.45)), radius=u(0.03), fill=bc, outline=_shade(bc, 0.5)
        )
    # torso
    draw.polygon(
        [(cx - sw, sh_y), (cx + sw, sh_y), (cx + ww, hip_y), (cx - ww, hip_y)], fill=upper, outline=_shade(upper, 0.55)
    )
    # logo on the chest
    if loc["logo"] != "none":
        shape, lc = loc["logo"].split("-")
        c = COLORS[lc]
        lx, ly, s = cx + rng.normal(0, u(0.004)), y(0.27), u(0.038)
        if shape == "circle":
            draw.ellipse((lx - s, ly - s, lx + s, ly + s), fill=c)
        elif shape == "square":
            draw.rectangle((lx - s * 0.9, ly - s * 0.9, lx + s * 0.9, ly + s * 0.9), fill=c)
        elif shape == "triangle":
            draw.polygon([(lx, ly - s * 1.1), (lx + s * 1.1, ly + s * 0.9), (lx - s * 1.1, ly + s * 0.9)], fill=c)
        else:  # cross
            draw.rectangle((lx - s, ly - s * 0.35, lx + s, ly + s * 0.35), fill=c)
            draw.rectangle((lx - s * 0.35, ly - s, lx + s * 0.35, ly + s), fill=c)
    # bag straps / hip bag
    if bag_kind == "backpack":
        bc = COLORS[bag_color]
        for side in (-1, 1):
            _thick(draw, (cx + side * sw * 0.6, sh_y), (cx + side * sw * 0.55, y(0.42)), u(0.022), bc)
    elif bag_kind == "hip":
        bc = COLORS[bag_color]
        draw.line(
            ((cx - sw * 0.8, sh_y + u(0.005)), (cx + ww * 1.0, y(0.47))),
            fill=_shade(bc, 0.7),
            width=max(2, int(u(0.016))),
        )
        draw.rounded_rectangle(
            (cx + ww * 0.7, y(0.44), cx + ww * 0.7 + u(0.09), y(0.54)),
            radius=u(0.015),
            fill=bc,
            outline=_shade(bc, 0.5),
        )
    # arms (swing jitter)
    arm_w = u(0.044) * bw
    hands = []
    for side in (-1, 1):
        ang = np.deg2rad(rng.normal(8.0, 6.0))  # outward
        swing = rng.normal(0.0, 0.08)
        sh = (cx + side * (sw - arm_w * 0.35), sh_y + arm_w * 0.5)
        hand = (sh[0] + side * np.sin(ang) * u(0.34) + swing * u(0.2), sh[1] + np.cos(ang) * u(0.34))
        if g["sleeves"] == "long":
            _thick(draw, sh, hand, arm_w, upper)
        else:
            _thick(draw, sh, hand, arm_w * 0.85, skin)
            _thick(draw, sh, _lerp(sh, hand, 0.35), arm_w * 1.05, upper)
        r = arm_w * 0.6
        draw.ellipse((hand[0] - r, hand[1] - r, hand[0] + r, hand[1] + r), fill=skin)
        hands.append(hand)
    if bag_kind == "hand":
        bc = COLORS[bag_color]
        hx, hy = hands[1]
        draw.line(((hx, hy), (hx, hy + u(0.03))), fill=_shade(bc, 0.6), width=max(2, int(u(0.01))))
        draw.rectangle((hx - u(0.045), hy + u(0.03), hx + u(0.045), hy + u(0.12)), fill=bc, outline=_shade(bc, 0.5))
    # neck and head
    hx = cx + rng.normal(0.0, u(0.008))
    draw.rectangle((hx - u(0.022), y(0.11), hx + u(0.022), sh_y + u(0.01)), fill=_shade(skin, 0.9))
    hr, hy = u(0.062), y(0.075)
    draw.ellipse((hx - hr, hy - hr, hx + hr, hy + hr), fill=skin, outline=_shade(skin, 0.6))
    draw.chord((hx - hr * 1.05, hy - hr * 1.1, hx + hr * 1.05, hy + hr * 0.9), 180, 360, fill=hair)
    hat = loc["hat"]
    if hat != "none":
        kind, hc = hat.split("-")
        c = COLORS[hc]
        if kind == "cap":
            draw.chord(
                (hx - hr * 1.1, hy - hr * 1.25, hx + hr * 1.1, hy + hr * 0.5), 180, 360, fill=c, outline=_shade(c, 0.5)
            )
            draw.rectangle((hx - hr * 0.2, hy - hr * 0.42, hx + hr * 1.75, hy - hr * 0.22), fill=_shade(c, 0.8))
        else:  # beanie
            draw.chord(
                (hx - hr * 1.12, hy - hr * 1.45, hx + hr * 1.12, hy + hr * 0.7),
                180,
                360,
                fill=c,
                outline=_shade(c, 0.5),
            )
            draw.rectangle((hx - hr * 1.12, hy - hr * 0.35, hx + hr * 1.12, hy - hr * 0.05), fill=_shade(c, 0.75))


def _finish(img: Image.Image, rng: np.random.Generator, cam: dict[str, Any]) -> Image.Image:
    """Downsample to 128x64 and apply the camera's illumination, colour cast, noise, blur, mirror."""
    img = img.reduce(SUPERSAMPLE)
    arr = np.array(img, dtype=np.float32)
    # uneven light: a smooth gain field over the crop, 1 +- 0.15
    field = Image.fromarray(rng.integers(0, 256, (3, 2), dtype=np.uint8)).resize(
        (WIDTH, HEIGHT), Image.Resampling.BILINEAR
    )
    light = 1.0 + (np.asarray(field, dtype=np.float32)[..., None] - 127.5) * (0.15 / 127.5)
    gain = cam["gain"] * rng.uniform(0.9, 1.1)
    cast = np.asarray(cam["cast"], dtype=np.float32) * np.float32(gain)
    arr *= light
    arr *= cast
    noise = rng.standard_normal(arr.shape, dtype=np.float32)
    noise *= np.float32(cam["noise"])
    arr += noise
    arr += np.float32(0.5)  # round half up, then truncate
    np.clip(arr, 0, 255, out=arr)
    img = Image.fromarray(arr.astype(np.uint8))
    blur = cam["blur"] + rng.uniform(-0.2, 0.2)
    if blur > 0.15:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    if rng.random() < cam["mirror"]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def render_image(attrs: dict[str, dict[str, str]], cam: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    """One 128x64 view of an identity (``attrs`` as in the manifest) seen by camera ``cam``."""
    w, h = WIDTH * SUPERSAMPLE, HEIGHT * SUPERSAMPLE
    img = _background(rng, cam, w, h)
    fh = h * HEIGHTS[attrs["global"]["height"]] * cam["scale"] * rng.uniform(0.96, 1.04)
    cx = w / 2 + (cam["dx"] + rng.normal(0.0, 1.5)) * SUPERSAMPLE
    top = (h - fh) / 2 + (cam["dy"] + rng.normal(0.0, 1.5)) * SUPERSAMPLE
    _draw_figure(img, attrs, rng, cx, top, fh, wmul=rng.uniform(0.88, 1.05))
    if rng.random() < 0.08:  # an occasional pole in front of the person
        draw = ImageDraw.Draw(img)
        x = rng.uniform(0, w)
        draw.line(
            ((x, 0), (x + rng.uniform(-10, 10), h)),
            fill=tuple(int(v) for v in rng.integers(30, 200, 3)),
            width=int(rng.integers(4, 10)),
        )
    return _finish(img, rng, cam)


def _render_distractor(seed: int, j: int, cam: dict[str, Any]) -> Image.Image:
    """A bad detection (pid 0000): background only, or a stranger cut off by the box."""
    rng = np.random.default_rng([seed, 4, j])
    w, h = WIDTH * SUPERSAMPLE, HEIGHT * SUPERSAMPLE
    img = _background(rng, cam, w, h)
    if rng.random() < 0.6:
        g = _sample_global(rng)
        attrs = {"global": g, "local": {k: _local_value(rng, k, g) for k in LOCAL_KEYS}}
        fh = h * rng.uniform(0.7, 1.5)
        cx = w / 2 + rng.choice([-1, 1]) * rng.uniform(0.3, 0.6) * w
        top = rng.uniform(-0.5, 0.3) * fh
        _draw_figure(img, attrs, rng, cx, top, fh, wmul=rng.uniform(0.9, 1.1))
    return _finish(img, rng, cam)


# ---------------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------------


def _check_sizes(ids_train: int, ids_test: int, images_per_id: int, cameras: int, distractors: int) -> None:
    if ids_train < 2 or ids_test < 2:
        raise DataError(f"synthreid: --ids-train and --ids-test must be >= 2 (got {ids_train}, {ids_test})")
    if ids_train + ids_test > 9999:
        raise DataError(f"synthreid: at most 9999 identities fit 4-digit Market pids (got {ids_train + ids_test})")
    if images_per_id < 4:
        raise DataError(
            f"synthreid: --images-per-id must be >= 4 (got {images_per_id}): train ids need 4 images over 2 cameras"
        )
    if not 2 <= cameras <= 9:
        raise DataError(
            f"synthreid: --cameras must be between 2 and 9 (got {cameras}): Market names hold one camera digit"
        )
    if distractors < 0:
        raise DataError(f"synthreid: distractors must be >= 0 (got {distractors})")


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of a SynthReID written to ``out`` earlier, or None (no folder, no manifest, not ours)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR else None


def manifest_differences(manifest: dict[str, Any], seed: int = 0, **sizes: int | None) -> list[str]:
    """How ``manifest`` differs from a generation with ``seed`` and ``sizes`` (None: DEFAULTS), as
    "ids_train 751 there, 100 asked"; [] when it is the same set."""
    params = manifest.get("params") or {}
    there = {"seed": manifest.get("seed"), **{key: params.get(key) for key in DEFAULTS}}
    asked = {"seed": seed, **{key: DEFAULTS[key] if sizes.get(key) is None else int(sizes[key]) for key in DEFAULTS}}
    return [f"{key} {there[key]} there, {asked[key]} asked" for key in asked if there[key] != asked[key]]


def _prepare_out(out: Path, seed: int, sizes: dict[str, int], replace: bool) -> None:
    """Create ``out``; refuse a non-empty folder unless it holds an earlier SynthReID of the same seed
    and sizes (or ``replace``): then delete its images, to be written again."""
    if out.exists() and not out.is_dir():
        raise DataError(f"synthreid: {out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        previous = read_manifest(out)
        if previous is None:
            raise DataError(
                f"synthreid: {out} is not empty and holds no SynthReID manifest; choose an empty or new --out"
            )
        changed = manifest_differences(previous, seed, **sizes)
        if changed and not replace:  # runs trained on the set there would silently change their data
            raise DataError(
                f"synthreid: {out} holds a SynthReID of other parameters ({'; '.join(changed)}); runs trained "
                "on it would no longer match their data: choose another --out, or --force to replace it"
            )
        for name in SPLIT_DIRS:
            for f in sorted((out / name).glob("*.jpg")):
                f.unlink()
        (out / "manifest.json").unlink()
    for name in SPLIT_DIRS:
        (out / name).mkdir(parents=True, exist_ok=True)


def _camera_plan(rng: np.random.Generator, images: int, cameras: int, min_cams: int) -> list[int]:
    """Camera (1-based) of each image: k >= min_cams distinct cameras, each seen at least once."""
    k = int(rng.integers(min(min_cams, cameras), cameras + 1))
    k = min(k, images)
    cams = sorted(int(c) + 1 for c in rng.choice(cameras, size=k, replace=False))
    plan = cams + [cams[int(i)] for i in rng.integers(0, k, images - k)]
    return [plan[int(i)] for i in rng.permutation(images)]


def generate_synthreid(
    out: str | Path,
    ids_train: int | None = None,
    ids_test: int | None = None,
    images_per_id: int | None = None,
    cameras: int | None = None,
    seed: int = 0,
    *,
    twin_share: float = TWIN_SHARE,
    queries_per_id: int = QUERIES_PER_ID,
    distractors: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """Write a SynthReID dataset to ``out`` (Market-1501 layout) and return its manifest.

    ``None`` sizes take ``DEFAULTS``; ``distractors`` (pid 0000 gallery images) defaults to
    ``ids_test // 2``. Train pids are 0001..ids_train, test pids follow. Every train id has
    ``images_per_id`` images over >= 2 cameras; every test id has up to ``queries_per_id`` query
    images, each in a different camera, and its other images in the gallery, at least one of them
    in a camera no query of that id uses. ``progress(done, total)`` is called after each image.
    An earlier SynthReID at ``out`` is written again if it has the same seed and sizes (the result is
    the same bytes) and refused otherwise, unless ``replace``.
    """
    ids_train = DEFAULTS["ids_train"] if ids_train is None else int(ids_train)
    ids_test = DEFAULTS["ids_test"] if ids_test is None else int(ids_test)
    images_per_id = DEFAULTS["images_per_id"] if images_per_id is None else int(images_per_id)
    cameras = DEFAULTS["cameras"] if cameras is None else int(cameras)
    distractors = ids_test // 2 if distractors is None else int(distractors)
    _check_sizes(ids_train, ids_test, images_per_id, cameras, distractors)
    if not 0.0 <= twin_share <= 1.0 or queries_per_id < 1:
        raise DataError(
            f"synthreid: twin_share must be in [0, 1] and queries_per_id >= 1 (got {twin_share}, {queries_per_id})"
        )
    out = Path(out)
    sizes = {"ids_train": ids_train, "ids_test": ids_test, "images_per_id": images_per_id, "cameras": cameras}
    _prepare_out(out, seed, sizes, replace)

    cams = {c: _camera(seed, c) for c in range(1, cameras + 1)}
    id_rng = np.random.default_rng([seed, 0])
    taken: list[tuple[str, ...]] = []
    ids: dict[str, dict[str, Any]] = {}
    for split, n, first_pid in (("train", ids_train, 1), ("test", ids_test, ids_train + 1)):
        people = _make_identities(id_rng, n, int(round(n * twin_share / 2)), taken)
        order = [int(i) for i in id_rng.permutation(n)]  # slot -> pid offset, so twins are not always neighbours
        pid_of = {slot: first_pid + order[slot] for slot in range(n)}
        for slot in sorted(range(n), key=lambda s: pid_of[s]):
            attrs, twin, differs = people[slot]
            ids[f"{pid_of[slot]:04d}"] = {
                "split": split,
                "attributes": attrs,
                "twin": None if twin is None else f"{pid_of[twin]:04d}",
                "differs_in": differs,
            }

    total = (ids_train + ids_test) * images_per_id + distractors
    done = 0
    name_rng = np.random.default_rng([seed, 3])
    frames = {c: int(name_rng.integers(100, 2000)) for c in cams}
    counts = {name: {"images": 0, "ids": 0} for name in SPLIT_DIRS}

    def save(img: Image.Image, folder: str, pid: int, cam: int) -> None:
        nonlocal done
        frames[cam] += int(name_rng.integers(20, 400))
        seq = 1 + min(5, frames[cam] // 40000)
        nn = 0 if name_rng.random() < 0.7 else int(name_rng.integers(1, 3))
        img.save(
            out / folder / f"{pid:04d}_c{cam}s{seq}_{frames[cam]:06d}_{nn:02d}.jpg", format="JPEG", quality=JPEG_QUALITY
        )
        counts[folder]["images"] += 1
        done += 1
        if progress is not None:
            progress(done, total)

    for key in sorted(ids):
        info, pid = ids[key], int(key)
        plan_rng = np.random.default_rng([seed, 2, pid])
        min_cams = 2 if info["split"] == "train" else min(cameras, queries_per_id + 1)
        plan = _camera_plan(plan_rng, images_per_id, cameras, min_cams)
        info["cameras"] = sorted(set(plan))
        folders = ["bounding_box_train"] * images_per_id
        if info["split"] == "test":
            query_cams = info["cameras"][:]
            plan_rng.shuffle(query_cams)
            query_cams = query_cams[: min(queries_per_id, len(info["cameras"]) - 1)]
            folders = ["bounding_box_test"] * images_per_id
            for qc in query_cams:
                folders[plan.index(qc)] = "query"
        for name in sorted(set(folders)):
            counts[name]["ids"] += 1
        for k, (cam, folder) in enumerate(zip(plan, folders, strict=True)):
            img = render_image(info["attributes"], cams[cam], np.random.default_rng([seed, 5, pid, k]))
            save(img, folder, pid, cam)
    dist_rng = np.random.default_rng([seed, 6])
    for j in range(distractors):
        cam = int(dist_rng.integers(1, cameras + 1))
        save(_render_distractor(seed, j, cams[cam]), "bounding_box_test", 0, cam)

    manifest: dict[str, Any] = {
        "generator": GENERATOR,
        "version": VERSION,
        "seed": seed,
        "params": {
            "ids_train": ids_train,
            "ids_test": ids_test,
            "images_per_id": images_per_id,
            "cameras": cameras,
            "twin_share": twin_share,
            "queries_per_id": queries_per_id,
            "distractors": distractors,
            "height": HEIGHT,
            "width": WIDTH,
            "jpeg_quality": JPEG_QUALITY,
            "global_attributes": list(GLOBAL_KEYS),
            "local_attributes": list(LOCAL_KEYS),
            "camera_nuisance": {str(c): cams[c] for c in cams},
        },
        "counts": counts,
        "ids": ids,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
