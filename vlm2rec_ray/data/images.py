"""Image fetch, decode and validation that never raise for a bad object: failures are reason codes.

A catalog with millions of rows always holds some missing, truncated or hostile images. The pipeline
(Ray Data UDFs, the trainer's collate) calls :func:`fetch_image_bytes` and :func:`decode_image`, which
return ``(value, None)`` on success and ``(None, reason)`` otherwise, with ``reason`` one of
:data:`REASONS`; rows with a reason go to the errors table and are counted in the run summary.

Guards:
- a byte cap (``max_bytes``) checked from the object size before the body is read;
- ``allowed_roots``: the URI must lie under one of these prefixes (local roots compare resolved paths,
  so symlinks and ``..`` cannot escape), checked before anything is opened; a ``..`` segment is always
  rejected; an http(s) URL needs an http(s) root, its redirects must stay on its origin, and hosts on loopback,
  private, link-local (cloud metadata) or other non-public addresses are refused (``blocked_address``);
- a pixel-count cap (``max_image_pixels``) checked from the header before any pixel is decoded (a
  decompression bomb is a small file that decodes to gigabytes), plus PIL's own bomb error;
- decode errors split into ``not_image`` (no known image signature) and ``corrupt`` (a known format that
  fails to decode, e.g. truncated).
Decoded images are RGB (alpha composited on white, EXIF orientation applied) and resized, keeping the
aspect ratio, so that their area lies in ``[min_pixels, max_pixels]``.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import ipaddress
import math
import socket
import struct
import urllib.parse
import warnings
from collections.abc import Sequence

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
    "blocked_address",
)
_MAX_REDIRECTS = 3
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


def _is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def _origin(uri: str) -> tuple[str, str, int]:
    u = urllib.parse.urlsplit(uri)
    return u.scheme.lower(), (u.hostname or "").lower(), u.port or (443 if u.scheme.lower() == "https" else 80)


def _under_roots(uri: str, roots: Sequence[str]) -> bool:
    """``uri`` lies under one of ``roots``: an http(s) root matches its origin and path prefix, a store root its
    prefix, a local root its directory (resolved: ``..`` and symlinks cannot escape)."""
    for root in roots:
        if _is_http(uri) or _is_http(root):
            path, rpath = urllib.parse.urlsplit(uri).path, urllib.parse.urlsplit(root).path.rstrip("/") + "/"
            if _is_http(uri) and _is_http(root) and _origin(uri) == _origin(root) and (path + "/").startswith(rpath):
                return True
        else:
            try:
                if storage.is_under(uri, root):
                    return True
            except ValueError:  # a URI or root of a scheme no backend handles
                continue
    return False


def _blocked(host: str, port: int) -> tuple[str | None, bool]:
    """``(address to connect to, refused)``: refused when any address of ``host`` is loopback, private, link-local
    (cloud metadata: 169.254.169.254), shared, reserved or multicast."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addrs = [ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos]
    mapped = [getattr(a, "ipv4_mapped", None) or a for a in addrs]
    return str(addrs[0]), any(not a.is_global or a.is_multicast for a in mapped)


class _PinnedConnection(http.client.HTTPSConnection):
    """Connects to the address that was checked (no second DNS lookup to rebind), TLS verified against the host."""

    def __init__(self, host: str, port: int, ip: str, tls: bool, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.ip, self.tls = ip, tls

    def connect(self) -> None:
        self.sock = socket.create_connection((self.ip, self.port), self.timeout)
        if self.tls:
            self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


def _fetch_http(uri: str, max_bytes: int, timeout_s: float, roots: Sequence[str] | None,
                allow_private: bool) -> tuple[bytes | None, str | None]:
    """GET an http(s) image. With ``roots`` a redirect must stay on the same origin and under a root, and a host
    resolving to a non-public address is refused (``blocked_address``) unless ``allow_private``."""
    for _ in range(_MAX_REDIRECTS + 1):
        scheme, host, port = _origin(uri)
        try:
            ip, refused = _blocked(host, port)
            if refused and not allow_private:
                return None, "blocked_address"
            conn = _PinnedConnection(host, port, ip, scheme == "https", timeout_s)
            u = urllib.parse.urlsplit(uri)
            conn.request("GET", (u.path or "/") + (f"?{u.query}" if u.query else ""),
                         headers={"User-Agent": "vlm2rec-ray/0.1"})
            resp = conn.getresponse()
            with contextlib.closing(conn):
                if resp.status in (301, 302, 303, 307, 308):
                    nxt = urllib.parse.urljoin(uri, resp.getheader("Location") or "")
                    if roots is not None and (_origin(nxt) != _origin(uri) or not _under_roots(nxt, roots)):
                        return None, "outside_root"  # never follow a redirect to another host
                    uri = nxt
                    continue
                if resp.status in (404, 410):
                    return None, "missing"
                if resp.status in (401, 403):
                    return None, "denied"
                if resp.status != 200:
                    return None, "io_error"
                length = resp.getheader("Content-Length")
                if length is not None and length.isdigit() and int(length) > max_bytes:
                    return None, "too_large"
                data = resp.read(max_bytes + 1)
        except (OSError, ValueError, http.client.HTTPException):
            return None, "io_error"
        if len(data) > max_bytes:
            return None, "too_large"
        return (data, None) if data else (None, "empty")
    return None, "io_error"  # too many redirects


def resolve_roots(allowed: Sequence[str], own: str) -> list[str]:
    """The roots a job's images may come from: ``allowed`` (``storage.allowed_roots``), or when none are listed
    the job's own dataset/catalog prefix ``own``; local ones made absolute (do it on the driver: workers run in
    other directories)."""
    return [r if "://" in r else str(storage.resolve_local(r)) for r in (list(allowed) or [own])]


def fetch_image_bytes(
    uri: str,
    *,
    endpoint: str | None = None,
    max_bytes: int = 20_000_000,
    allowed_roots: Sequence[str] | None = None,
    allow_private_addresses: bool = False,
    timeout_s: float = 30.0,
) -> tuple[bytes | None, str | None]:
    """Read an image's bytes from object storage, a local path (or ``file://``) or http(s)://.

    Args:
        uri: an absolute image URI (see :func:`vlm2rec_ray.data.catalog.resolve_image_uri`).
        endpoint: the object store's endpoint (S3: default ``AWS_ENDPOINT_URL``).
        max_bytes: objects larger than this are not read (``too_large``).
        allowed_roots: the prefixes, directories and http(s) origins+paths the URI must lie under, checked
            before anything is opened or requested (``outside_root``); an http(s) URI needs an http(s) root. With
            roots, an http(s) redirect must stay on its origin and a host on a non-public address (loopback,
            private, link-local/cloud metadata) is refused (``blocked_address``). ``None``: no restriction at
            all (only for copying a public dump's images by hand, ``vlm2rec prepare images``).
        allow_private_addresses: with roots, let http(s) hosts on non-public addresses through (tests, on-prem).
        timeout_s: per-request timeout for http(s) URIs (object stores use their clients' timeouts).

    Returns:
        ``(data, None)`` or ``(None, reason)`` with reason in :data:`REASONS`; never raises for a bad object.
    """
    if not uri or not uri.strip():
        return None, "missing"
    if _has_dotdot(uri) or (allowed_roots is not None and not _under_roots(uri, allowed_roots)):
        return None, "outside_root"
    if _is_http(uri):
        return _fetch_http(uri, max_bytes, timeout_s, allowed_roots, allow_private_addresses or allowed_roots is None)
    try:
        data = storage.read_bytes(uri, endpoint=endpoint, max_bytes=max_bytes)
    except storage.StorageError as e:
        return None, e.reason if e.reason in REASONS else "io_error"
    except ValueError:  # a malformed URI (e.g. an S3 bucket name too short) or a scheme no backend handles
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
    allowed_roots: Sequence[str] | None = None,
    allow_private_addresses: bool = False,
    max_image_pixels: int = 50_000_000,
) -> tuple[Image.Image | None, str | None]:
    """:func:`fetch_image_bytes` then :func:`decode_image`; ``(image, None)`` or ``(None, reason)``."""
    data, reason = fetch_image_bytes(uri, endpoint=endpoint, max_bytes=max_bytes, allowed_roots=allowed_roots,
                                     allow_private_addresses=allow_private_addresses)
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
    "resolve_roots",
    "target_size",
]
