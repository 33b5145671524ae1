"""Image fetch, decode and validation that never raise for a bad object: failures are reason codes.

A catalog with millions of rows always holds some missing, truncated or hostile images. The pipeline
(Ray Data UDFs, the trainer's collate) calls :func:`fetch_image_bytes` and :func:`decode_image`, which
return ``(value, None)`` on success and ``(None, reason)`` otherwise, with ``reason`` one of
:data:`REASONS`; rows with a reason go to the errors table and are counted in the run summary.

Guards:
- a byte cap (``max_bytes``) checked from the object size before the body is read;
- ``allowed_roots``: the URI must lie under one of these prefixes (local roots compare resolved paths,
  so symlinks and ``..`` cannot escape); a ``..`` segment is always rejected;
- a pixel-count cap (``max_image_pixels``) checked from the header before any pixel is decoded (a
  decompression bomb is a small file that decodes to gigabytes), plus PIL's own bomb error;
- decode errors split into ``not_image`` (no known image signature) and ``corrupt`` (a known format that
  fails to decode, e.g. truncated).
Decoded images are RGB (alpha composited on white, EXIF orientation applied) and resized, keeping the
aspect ratio, so that their area lies in ``[min_pixels, max_pixels]``.
"""

from __future__ import annotations

import io
import math
import struct
import urllib.error
import urllib.request
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from vlm2rec_ray import storage

REASONS = (
    "missing",
    "denied",
    "too_large",
    "empty",
    "corrupt",
    "not_image",
    "decompression_bomb",
    "outside_root",
    "io_error",
    "empty_title",
)
MAX_ASPECT_RATIO = 200.0  # Qwen2-VL's smart_resize rejects images with a longer/shorter side above 200
_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
    b"\x00\x00\x01\x00",  # ICO
)


def _has_image_signature(data: bytes) -> bool:
    if data.startswith(_SIGNATURES):
        return True
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _has_dotdot(uri: str) -> bool:
    path = uri.split("://", 1)[-1]
    return ".." in path.replace("\\", "/").split("/")


def _under_roots(uri: str, roots: list[str]) -> bool:
    for root in roots:
        if storage.is_s3(uri) or storage.is_s3(root):
            if storage.is_s3(uri) and storage.is_s3(root):
                r = root.rstrip("/") + "/"
                if uri.startswith(r) or uri == root.rstrip("/"):
                    return True
            continue
        if uri.startswith(("http://", "https://")) or root.startswith(("http://", "https://")):
            if uri.startswith(root.rstrip("/") + "/"):
                return True
            continue
        try:
            storage.resolve_local(uri, root)
            return True
        except ValueError:
            continue
    return False


def _fetch_http(uri: str, max_bytes: int, timeout_s: float) -> tuple[bytes | None, str | None]:
    req = urllib.request.Request(uri, headers={"User-Agent": "vlm2rec-ray/0.1"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                return None, "too_large"
            data = resp.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            return None, "missing"
        if e.code in (401, 403):
            return None, "denied"
        return None, "io_error"
    except (urllib.error.URLError, OSError, ValueError):
        return None, "io_error"
    if len(data) > max_bytes:
        return None, "too_large"
    return (data, None) if data else (None, "empty")


def fetch_image_bytes(
    uri: str,
    *,
    endpoint: str | None = None,
    max_bytes: int = 20_000_000,
    allowed_roots: list[str] | None = None,
    timeout_s: float = 30.0,
) -> tuple[bytes | None, str | None]:
    """Read an image's bytes from s3://, a local path (or ``file://``) or http(s)://.

    Args:
        uri: an absolute image URI (see :func:`vlm2rec_ray.data.catalog.resolve_image_uri`).
        endpoint: S3 endpoint (default ``AWS_ENDPOINT_URL``).
        max_bytes: objects larger than this are not read (``too_large``).
        allowed_roots: if given, prefixes/directories the URI must lie under (``outside_root``).
        timeout_s: per-request timeout for http(s) URIs (S3 uses the storage client's timeouts).

    Returns:
        ``(data, None)`` or ``(None, reason)`` with reason in :data:`REASONS`; never raises for a bad object.
    """
    if not uri or not uri.strip():
        return None, "missing"
    if _has_dotdot(uri):
        return None, "outside_root"
    if allowed_roots and not _under_roots(uri, allowed_roots):
        return None, "outside_root"
    if uri.startswith(("http://", "https://")):
        return _fetch_http(uri, max_bytes, timeout_s)
    try:
        data = storage.read_bytes(uri, endpoint=endpoint, max_bytes=max_bytes)
    except storage.StorageError as e:
        return None, e.reason if e.reason in REASONS else "io_error"
    except ValueError:  # malformed s3 URI (e.g. bucket name too short)
        return None, "missing"
    except Exception:  # network errors after retries, odd filesystems: a reason, not a crash
        return None, "io_error"
    if not data:
        return None, "empty"
    return data, None


def target_size(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (width, height) with the same aspect ratio whose area lies in ``[min_pixels, max_pixels]``
    (unchanged if it already does)."""
    area = width * height
    if min_pixels <= area <= max_pixels:
        return width, height
    scale = math.sqrt((max_pixels if area > max_pixels else min_pixels) / area)
    w, h = width * scale, height * scale
    if area > max_pixels:
        w, h = max(1, math.floor(w)), max(1, math.floor(h))
    else:
        w, h = max(1, math.ceil(w)), max(1, math.ceil(h))
        # Rounding up may overshoot the cap when min_pixels is close to max_pixels.
        while w * h > max_pixels and (w > 1 or h > 1):
            if w >= h:
                w -= 1
            else:
                h -= 1
    return w, h


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB") if im.mode != "RGB" else im


def _pad_aspect(im: Image.Image, max_ratio: float) -> Image.Image:
    w, h = im.size
    if max(w, h) / max(1, min(w, h)) <= max_ratio:
        return im
    # Letterbox onto white so the content is kept and the processor accepts the shape.
    if w > h:
        size = (w, max(1, math.ceil(w / max_ratio)))
    else:
        size = (max(1, math.ceil(h / max_ratio)), h)
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(im, ((size[0] - w) // 2, (size[1] - h) // 2))
    return canvas


def decode_image(
    data: bytes,
    *,
    min_pixels: int,
    max_pixels: int,
    max_image_pixels: int = 50_000_000,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
) -> tuple[Image.Image | None, str | None]:
    """Decode bytes into an RGB image whose area lies in ``[min_pixels, max_pixels]``.

    Args:
        data: encoded image bytes.
        min_pixels, max_pixels: area bounds after resizing (aspect ratio kept).
        max_image_pixels: images whose header declares more pixels are rejected before decoding.
        max_aspect_ratio: more elongated images are letterboxed on white to this ratio.

    Returns:
        ``(image, None)`` or ``(None, reason)``: ``empty``, ``not_image``, ``corrupt`` or
        ``decompression_bomb``; never raises for bad bytes.
    """
    if min_pixels <= 0 or max_pixels < min_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}")
    if not data:
        return None, "empty"
    known = _has_image_signature(data)
    opened = False  # failures after PIL recognised the format are "corrupt", before it "not_image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            opened = True
            w, h = im.size
            if w <= 0 or h <= 0:
                return None, "corrupt"
            if w * h > max_image_pixels:
                return None, "decompression_bomb"
            tw, th = target_size(w, h, min_pixels, max_pixels)
            if im.format == "JPEG" and tw < w:
                im.draft("RGB", (tw, th))  # decode JPEG at a reduced scale: much less work for big photos
            im.load()
            im = ImageOps.exif_transpose(im) or im
            im = _to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        return None, "decompression_bomb"
    except UnidentifiedImageError:
        return None, "corrupt" if known else "not_image"
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error):
        return None, "corrupt" if known or opened else "not_image"
    im = _pad_aspect(im, max_aspect_ratio)
    tw, th = target_size(im.size[0], im.size[1], min_pixels, max_pixels)
    if (tw, th) != im.size:
        im = im.resize((tw, th), Image.Resampling.BICUBIC)
    return im, None


def load_image(
    uri: str,
    *,
    min_pixels: int,
    max_pixels: int,
    endpoint: str | None = None,
    max_bytes: int = 20_000_000,
    allowed_roots: list[str] | None = None,
    max_image_pixels: int = 50_000_000,
) -> tuple[Image.Image | None, str | None]:
    """:func:`fetch_image_bytes` then :func:`decode_image`; ``(image, None)`` or ``(None, reason)``."""
    data, reason = fetch_image_bytes(uri, endpoint=endpoint, max_bytes=max_bytes, allowed_roots=allowed_roots)
    if data is None:
        return None, reason
    return decode_image(data, min_pixels=min_pixels, max_pixels=max_pixels, max_image_pixels=max_image_pixels)


def encode_image(im: Image.Image, fmt: str = "PNG", quality: int = 90) -> bytes:
    """Encode a PIL image (PNG or JPEG) to bytes."""
    buf = io.BytesIO()
    if fmt.upper() in ("JPEG", "JPG"):
        im.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        im.save(buf, format=fmt.upper())
    return buf.getvalue()


__all__ = [
    "MAX_ASPECT_RATIO",
    "REASONS",
    "decode_image",
    "encode_image",
    "fetch_image_bytes",
    "load_image",
    "target_size",
]
