"""A seeded synthetic multimodal catalog for demos and for measuring modality collapse.

Every item has latent attributes. Some are shown only in its **title** (category, brand, material and a
neutral adjective, e.g. ``"Corvo compact ceramic mug"``); others only in its rendered **image** (shape,
colour, texture of a small PIL drawing). Titles never name an image attribute, and images carry no text.

Each user has a text profile (category, brand) and an image profile (shape, colour). Each step of their
sequence is, with probability ``image_only_signal``, an *image step* (an unseen item with the user's shape
and colour, whose text attributes are random) and otherwise a *text step* (the user's category and brand,
random look); a further ``noise`` share of steps picks any item. So a share ``image_only_signal`` of the
next-item signal is visible only in pixels: a text-only model cannot predict those targets and must
lose to a model that sees images, by a margin that grows with the knob.

By default text and image attributes are independent, so the two modalities carry complementary, never
redundant, signal. ``coupling`` (0..1) makes them partly redundant, as a product's title and picture are:
a share ``coupling`` of the items take the look their text implies (the category fixes the shape, the
brand the colour: :data:`SHAPE_OF`, :data:`COLOUR_OF`) and the same share of users take the look profile
their text profile implies. Titles still never name an image attribute. ``coupling = 0`` draws nothing
extra, so it gives exactly the uncoupled data.

``generate_synthetic`` writes the same files as ``vlm2rec prepare amazon`` (catalog, interactions, splits,
stats, ``images/<item_id>.png``), plus ``attributes.parquet`` (each item's latent attributes),
``transitions.parquet`` (which kind of step produced each interaction, e.g. to score test targets by
kind) and ``synthetic.json`` (the generator settings), to a local dir or an s3:// prefix.
"""

from __future__ import annotations

import json
import math
import random
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from typing import Any

import pyarrow as pa
from PIL import Image, ImageDraw

from vlm2rec_ray import storage
from vlm2rec_ray.data.catalog import write_prepared
from vlm2rec_ray.data.images import encode_image
from vlm2rec_ray.data.splits import build_sequences, compute_stats, leave_one_out

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (235, 200, 20),
    "purple": (148, 60, 200),
    "orange": (255, 127, 14),
}
TEXTURES = ("plain", "striped", "dotted", "checked")
CATEGORIES = ("mug", "lamp", "backpack", "notebook", "sneaker", "clock")
BRANDS = ("Aldano", "Brisk", "Corvo", "Dunmore", "Elsby", "Fenwick")
MATERIALS = ("ceramic", "wooden", "leather", "steel", "cotton", "glass")
ADJECTIVES = ("classic", "compact", "deluxe", "everyday", "premium", "travel", "modern", "essential")
# coupling: the look an item's text implies (category -> shape, brand -> colour).
SHAPE_OF = dict(zip(CATEGORIES, SHAPES, strict=True))
COLOUR_OF = dict(zip(BRANDS, COLOURS, strict=True))
IMAGE_WORDS = frozenset(SHAPES) | frozenset(COLOURS) | frozenset(TEXTURES)
STEP_KINDS = ("image", "text", "noise")
ATTRIBUTES_SCHEMA = pa.schema(
    [(name, pa.string()) for name in
     ("item_id", "shape", "colour", "texture", "category", "brand", "material", "adjective")]
)
TRANSITIONS_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("position", pa.int32()), ("item_id", pa.string()), ("kind", pa.string())]
)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif shape == "diamond":
        pts = [(k * math.pi / 2, r) for k in range(4)]
    elif shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    elif shape == "cross":
        # A plus sign: 12 corners, arms of half-width 0.36 r.
        w = 0.36
        corners = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        return [(cx + r * (x * math.cos(angle) - y * math.sin(angle)), cy + r * (x * math.sin(angle) + y * math.cos(angle)))
                for x, y in corners]
    elif shape == "star":
        pts = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else r * 0.45) for k in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(cx + rad * math.cos(a + angle), cy + rad * math.sin(a + angle)) for a, rad in pts]


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """factor < 1 darkens, > 1 mixes towards white (keeps the hue recognisable)."""
    if factor <= 1:
        return tuple(int(c * factor) for c in rgb)  # type: ignore[return-value]
    t = min(1.0, factor - 1)
    return tuple(int(c + (255 - c) * t) for c in rgb)  # type: ignore[return-value]


def render_item(shape: str, colour: str, texture: str, *, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draw one item: a ``shape`` filled with ``colour`` and ``texture`` on a light background, with small
    random jitter (position, scale, rotation, background tint) so equal attributes give different images."""
    rng = rng or random.Random(0)
    ss = 2  # supersampling for smooth edges
    n = size * ss
    tint = rng.randint(-8, 8)
    img = Image.new("RGB", (n, n), (240 + tint // 2, 240 + tint // 2, 240 - tint // 2))
    rgb = COLOURS[colour]
    fill = Image.new("RGB", (n, n), rgb)
    draw = ImageDraw.Draw(fill)
    step = max(4, n // 8)
    if texture == "striped":
        dark = _shade(rgb, 0.55)
        for x in range(-n, n, step):
            draw.polygon([(x, 0), (x + step // 2, 0), (x + step // 2 + n, n), (x + n, n)], fill=dark)
    elif texture == "dotted":
        light = _shade(rgb, 1.65)
        rad = max(2, step // 4)
        for y in range(step // 2, n, step):
            for x in range(step // 2, n, step):
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=light)
    elif texture == "checked":
        dark = _shade(rgb, 0.55)
        for y in range(0, n, step):
            for x in range(0, n, step):
                if (x // step + y // step) % 2 == 0:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=dark)
    elif texture != "plain":
        raise ValueError(f"unknown texture {texture!r}")
    mask = Image.new("L", (n, n), 0)
    mdraw = ImageDraw.Draw(mask)
    cx = n / 2 + rng.uniform(-0.06, 0.06) * n
    cy = n / 2 + rng.uniform(-0.06, 0.06) * n
    r = rng.uniform(0.33, 0.42) * n
    if shape == "circle":
        mdraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        mdraw.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.2, 0.2)), fill=255)
    img.paste(fill, mask=mask)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def make_title(attrs: dict[str, str]) -> str:
    """The item's title: brand, adjective, material and category only (never an image attribute)."""
    return f"{attrs['brand']} {attrs['adjective']} {attrs['material']} {attrs['category']}"


def _balanced(combos: list[tuple[str, ...]], n: int, rng: random.Random) -> list[tuple[str, ...]]:
    """n draws covering every combination as evenly as possible, in random order."""
    out = [combos[i % len(combos)] for i in range(n)]
    rng.shuffle(out)
    return out


def _sample_items(num_items: int, rng: random.Random, prefix: str = "I") -> list[dict[str, str]]:
    """``num_items`` items with balanced (shape, colour) looks and (category, brand) texts, the other attributes
    drawn at random; each a dict of attributes plus ``item_id`` (``<prefix>00042``) and ``title``."""
    looks = _balanced(list(product(SHAPES, COLOURS)), num_items, rng)
    texts = _balanced(list(product(CATEGORIES, BRANDS)), num_items, rng)
    items: list[dict[str, str]] = []
    for i in range(num_items):
        shape, colour = looks[i]
        category, brand = texts[i]
        attrs = {
            "item_id": f"{prefix}{i:05d}",
            "shape": shape,
            "colour": colour,
            "texture": rng.choice(TEXTURES),
            "category": category,
            "brand": brand,
            "material": rng.choice(MATERIALS),
            "adjective": rng.choice(ADJECTIVES),
        }
        attrs["title"] = make_title(attrs)
        items.append(attrs)
    return items


def sample_items(num_items: int, *, seed: int, prefix: str = "I") -> list[dict[str, str]]:
    """Items only (attributes, ``item_id``, ``title``), no users: e.g. a pre-training corpus drawn with another
    seed and id prefix than an evaluation catalog. Same generator as :func:`build_synthetic`."""
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    return _sample_items(num_items, random.Random(seed), prefix)


def build_synthetic(
    *,
    num_items: int = 300,
    num_users: int = 200,
    image_only_signal: float = 0.5,
    seed: int = 0,
    min_length: int = 5,
    max_length: int = 10,
    noise: float = 0.0,
    coupling: float = 0.0,
) -> dict[str, Any]:
    """The synthetic data in memory (no images rendered): ``items`` (dicts of attributes with ``item_id``
    and ``title``), ``interactions`` table and ``transitions`` table. See the module docstring."""
    if not 0.0 <= coupling <= 1.0:
        raise ValueError(f"coupling must be in [0, 1], got {coupling}")
    if not 0.0 <= image_only_signal <= 1.0:
        raise ValueError(f"image_only_signal must be in [0, 1], got {image_only_signal}")
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    if num_items < 20:
        raise ValueError(f"num_items must be >= 20 (got {num_items}): each attribute profile needs a few items")
    if num_users < 1:
        raise ValueError(f"num_users must be >= 1, got {num_users}")
    if not 3 <= min_length <= max_length:
        raise ValueError(f"need 3 <= min_length <= max_length, got {min_length}, {max_length}")
    if max_length > num_items:
        raise ValueError(f"max_length={max_length} exceeds num_items={num_items}; sequences never repeat an item")
    rng = random.Random(seed)
    items = _sample_items(num_items, rng)
    # A separate stream decides coupling, so coupling = 0 leaves every other draw as it was.
    crng = random.Random(seed * 1_000_003 + 7) if coupling > 0 else None
    if crng is not None:
        for attrs in items:
            if crng.random() < coupling:
                attrs["shape"], attrs["colour"] = SHAPE_OF[attrs["category"]], COLOUR_OF[attrs["brand"]]
    by_look: dict[tuple[str, str], list[int]] = {}
    by_text: dict[tuple[str, str], list[int]] = {}
    by_attr: dict[tuple[str, str], list[int]] = {}
    for i, attrs in enumerate(items):
        by_look.setdefault((attrs["shape"], attrs["colour"]), []).append(i)
        by_text.setdefault((attrs["category"], attrs["brand"]), []).append(i)
        for key in ("shape", "colour", "category", "brand"):
            by_attr.setdefault((key, attrs[key]), []).append(i)

    users, item_ids, stamps = [], [], []
    t_users, t_pos, t_items, t_kinds = [], [], [], []
    for u in range(num_users):
        user = f"U{u:05d}"
        look = (rng.choice(SHAPES), rng.choice(list(COLOURS)))
        text = (rng.choice(CATEGORIES), rng.choice(BRANDS))
        if crng is not None and crng.random() < coupling:
            look = (SHAPE_OF[text[0]], COLOUR_OF[text[1]])
        used: set[int] = set()
        ts = 1_600_000_000 + u * 97
        for pos in range(rng.randint(min_length, max_length)):
            r = rng.random()
            kind = "noise" if r < noise else ("image" if rng.random() < image_only_signal else "text")
            if kind == "image":
                pools = [by_look.get(look, []), by_attr.get(("shape", look[0]), []), by_attr.get(("colour", look[1]), [])]
            elif kind == "text":
                pools = [by_text.get(text, []), by_attr.get(("category", text[0]), []), by_attr.get(("brand", text[1]), [])]
            else:
                pools = []
            choice = None
            for pool in pools:  # the exact profile first; one matching attribute when it is used up
                free = [i for i in pool if i not in used]
                if free:
                    choice = rng.choice(free)
                    break
            if choice is None:
                choice = rng.choice([i for i in range(num_items) if i not in used])
            used.add(choice)
            ts += rng.randint(3_600, 3 * 86_400)
            users.append(user)
            item_ids.append(items[choice]["item_id"])
            stamps.append(ts)
            t_users.append(user)
            t_pos.append(pos)
            t_items.append(items[choice]["item_id"])
            t_kinds.append(kind)
    interactions = pa.table({"user_id": users, "item_id": item_ids, "timestamp": pa.array(stamps, pa.int64())})
    transitions = pa.table({"user_id": t_users, "position": pa.array(t_pos, pa.int32()), "item_id": t_items,
                            "kind": t_kinds}, schema=TRANSITIONS_SCHEMA)
    return {"items": items, "interactions": interactions, "transitions": transitions}


def generate_synthetic(
    out_uri: str,
    *,
    num_items: int = 300,
    num_users: int = 200,
    image_only_signal: float = 0.5,
    seed: int = 0,
    image_size: int = 64,
    min_length: int = 5,
    max_length: int = 10,
    noise: float = 0.0,
    coupling: float = 0.0,
    max_history: int = 10,
    endpoint: str | None = None,
    concurrency: int = 16,
) -> dict[str, Any]:
    """Generate the synthetic dataset and write it to ``out_uri`` (local dir or s3:// prefix).

    Args:
        image_only_signal: share of sequence steps predictable only from image attributes (0..1).
        image_size: side of the square PNG images in pixels.
        min_length, max_length: range of per-user sequence lengths (uniform).
        noise: share of steps that pick a random item.
        coupling: share of items (and users) whose look follows their text (see the module docstring).

    Returns:
        The Table 3 stats (also in ``stats.json``): users, items, interactions, avg_length, sparsity.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    data = build_synthetic(num_items=num_items, num_users=num_users, image_only_signal=image_only_signal, seed=seed,
                           min_length=min_length, max_length=max_length, noise=noise, coupling=coupling)
    items = data["items"]

    def write_image(k: int) -> None:
        it = items[k]
        img = render_item(it["shape"], it["colour"], it["texture"], size=image_size, rng=random.Random(seed * 1_000_003 + k))
        storage.write_bytes(storage.join(out_uri, "images", f"{it['item_id']}.png"), encode_image(img, "PNG"),
                            endpoint=endpoint)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(pool.map(write_image, range(len(items))))

    catalog = pa.table({
        "item_id": [it["item_id"] for it in items],
        "title": [it["title"] for it in items],
        "image_uri": [f"images/{it['item_id']}.png" for it in items],
        "description": [f"A {it['material']} {it['category']} by {it['brand']}." for it in items],
        "category": [it["category"] for it in items],
    })
    attributes = pa.Table.from_pylist([{k: it[k] for k in ATTRIBUTES_SCHEMA.names} for it in items],
                                      schema=ATTRIBUTES_SCHEMA)
    storage.write_parquet(attributes, storage.join(out_uri, "attributes.parquet"), endpoint=endpoint)
    storage.write_parquet(data["transitions"], storage.join(out_uri, "transitions.parquet"), endpoint=endpoint)
    settings = {"num_items": num_items, "num_users": num_users, "image_only_signal": image_only_signal, "seed": seed,
                "image_size": image_size, "min_length": min_length, "max_length": max_length, "noise": noise,
                "coupling": coupling,
                "max_history": max_history}
    storage.write_text(storage.join(out_uri, "synthetic.json"), json.dumps(settings, indent=2) + "\n", endpoint=endpoint)
    interactions = data["interactions"]
    splits, _ = leave_one_out(build_sequences(interactions), max_history=max_history)
    stats = compute_stats(interactions)
    write_prepared(out_uri, catalog=catalog, interactions=interactions, splits=splits, stats=stats, endpoint=endpoint)
    return stats
