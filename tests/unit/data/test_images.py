"""Image fetch/decode: every failure is a reason code, never an exception through the pipeline."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tests.faults import RecordingServer
from vlm2rec_ray.data.images import (
    REASONS,
    decode_image,
    encode_image,
    fetch_image_bytes,
    load_image,
    target_size,
)


def _png(w: int, h: int, mode: str = "RGB", color=(10, 200, 30)) -> bytes:
    return encode_image(Image.new(mode, (w, h), color), "PNG")


def _bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (IDAT is a few bytes): a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_reason_codes_are_the_contract() -> None:
    assert REASONS == ("missing", "denied", "too_large", "empty", "corrupt", "not_image", "decompression_bomb",
                       "outside_root", "io_error", "empty_title", "blocked_address")


def test_decode_rgb_and_resize_into_bounds() -> None:
    im, reason = decode_image(_png(300, 150), min_pixels=56 * 56, max_pixels=112 * 112)
    assert reason is None and im.mode == "RGB"
    w, h = im.size
    assert 56 * 56 <= w * h <= 112 * 112 and abs(w / h - 2.0) < 0.05
    small, _ = decode_image(_png(10, 20), min_pixels=56 * 56, max_pixels=112 * 112)
    assert small.size[0] * small.size[1] >= 56 * 56 and abs(small.size[1] / small.size[0] - 2.0) < 0.1
    same, _ = decode_image(_png(64, 64), min_pixels=32 * 32, max_pixels=128 * 128)
    assert same.size == (64, 64)


@pytest.mark.parametrize("w,h,lo,hi", [(1, 1, 3136, 3136), (5000, 3, 3136, 50176), (7, 13, 100, 101), (999, 1001, 1, 1)])
def test_target_size_bounds(w: int, h: int, lo: int, hi: int) -> None:
    tw, th = target_size(w, h, lo, hi)
    assert tw * th <= hi and tw >= 1 and th >= 1


def test_alpha_is_composited_on_white_and_palette_converted() -> None:
    im, _ = decode_image(_png(8, 8, "RGBA", (255, 0, 0, 0)), min_pixels=1, max_pixels=10_000)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 3)
    im2, reason = decode_image(encode_image(pal, "PNG"), min_pixels=1, max_pixels=10_000)
    assert reason is None and im2.mode == "RGB"
    grey, _ = decode_image(encode_image(Image.new("L", (8, 8), 7), "JPEG"), min_pixels=1, max_pixels=10_000)
    assert grey.mode == "RGB"


def test_bad_bytes_get_reasons() -> None:
    kw = {"min_pixels": 16, "max_pixels": 10_000}
    assert decode_image(b"", **kw) == (None, "empty")
    assert decode_image(b"hello, this is not an image at all", **kw) == (None, "not_image")
    jpeg = encode_image(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    assert decode_image(jpeg[: len(jpeg) // 2], **kw) == (None, "corrupt")
    png = _png(64, 64)
    assert decode_image(png[:40], **kw) == (None, "corrupt")
    assert decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, **kw) == (None, "corrupt")


def test_decompression_bomb_rejected_before_decoding() -> None:
    bomb = _bomb_png(30_000, 30_000)  # 900 M pixels declared, < 200 bytes on disk
    assert len(bomb) < 300
    assert decode_image(bomb, min_pixels=16, max_pixels=10_000) == (None, "decompression_bomb")
    assert decode_image(_bomb_png(2000, 2000), min_pixels=16, max_pixels=10_000, max_image_pixels=1_000_000) == (
        None, "decompression_bomb")


def test_extreme_aspect_ratio_is_letterboxed() -> None:
    im, reason = decode_image(_png(2000, 2), min_pixels=56 * 56, max_pixels=224 * 224)
    assert reason is None
    assert max(im.size) / min(im.size) <= 200.5


def test_fetch_local_reasons(tmp_path: Path) -> None:
    good = tmp_path / "root" / "a.png"
    good.parent.mkdir()
    good.write_bytes(_png(20, 20))
    (tmp_path / "root" / "empty.png").write_bytes(b"")
    (tmp_path / "secret.png").write_bytes(_png(20, 20))
    root = str(tmp_path / "root")
    data, reason = fetch_image_bytes(str(good), allowed_roots=[root])
    assert reason is None and data == good.read_bytes()
    assert fetch_image_bytes(f"file://{good}")[1] is None
    assert fetch_image_bytes(str(tmp_path / "root" / "nope.png")) == (None, "missing")
    assert fetch_image_bytes(str(tmp_path / "root" / "empty.png")) == (None, "empty")
    assert fetch_image_bytes(str(good), max_bytes=10) == (None, "too_large")
    assert fetch_image_bytes(str(tmp_path / "secret.png"), allowed_roots=[root]) == (None, "outside_root")
    assert fetch_image_bytes(f"{root}/../secret.png") == (None, "outside_root")
    link = tmp_path / "root" / "link.png"
    link.symlink_to(tmp_path / "secret.png")
    assert fetch_image_bytes(str(link), allowed_roots=[root]) == (None, "outside_root")
    assert fetch_image_bytes(str(tmp_path / "root")) == (None, "missing")  # a directory
    assert fetch_image_bytes("") == (None, "missing")
    assert fetch_image_bytes("s3://x/key.png") == (None, "missing")  # invalid bucket name: no crash


def test_load_image_end_to_end(tmp_path: Path) -> None:
    p = tmp_path / "x.jpg"
    Image.new("RGB", (400, 300), (9, 9, 9)).save(p, quality=90)
    im, reason = load_image(str(p), min_pixels=56 * 56, max_pixels=112 * 112)
    assert reason is None and im.size[0] * im.size[1] <= 112 * 112
    (tmp_path / "bad.jpg").write_bytes(p.read_bytes()[:200])
    assert load_image(str(tmp_path / "bad.jpg"), min_pixels=16, max_pixels=10_000) == (None, "corrupt")


def test_invalid_pixel_bounds_is_a_user_error() -> None:
    with pytest.raises(ValueError, match="min_pixels"):
        decode_image(_png(4, 4), min_pixels=100, max_pixels=10)


def test_jpeg_draft_keeps_quality_for_big_photos() -> None:
    big = Image.new("RGB", (2000, 1500), (200, 100, 50))
    im, _ = decode_image(encode_image(big, "JPEG"), min_pixels=56 * 56, max_pixels=224 * 224)
    r, g, b = im.getpixel((10, 10))
    assert abs(r - 200) < 6 and abs(g - 100) < 6 and abs(b - 50) < 6


def test_http_is_off_unless_a_root_allows_it_and_private_hosts_are_refused(tmp_path: Path) -> None:
    srv = RecordingServer(body=_png(8, 8))
    try:
        url = f"{srv.url}/img.png"
        # A job's default roots are its dataset's prefix: an http(s) URL is outside them, and nothing is requested.
        assert fetch_image_bytes(url, allowed_roots=[str(tmp_path)]) == (None, "outside_root")
        assert fetch_image_bytes(url, allowed_roots=[f"{srv.url}/other/"]) == (None, "outside_root")
        # Allowed explicitly, but the host is loopback: refused before connecting.
        assert fetch_image_bytes(url, allowed_roots=[srv.url]) == (None, "blocked_address")
        assert srv.requests == []
        # The escape hatch (tests, on-prem mirrors) lets it through.
        data, reason = fetch_image_bytes(url, allowed_roots=[srv.url], allow_private_addresses=True)
        assert reason is None and data == _png(8, 8) and srv.requests == ["/img.png"]
        assert fetch_image_bytes(url)[1] is None  # no roots at all: `prepare images` on a public dump, as before
    finally:
        srv.close()


def test_redirects_never_leave_the_origin(tmp_path: Path) -> None:
    target = RecordingServer(body=_png(8, 8))
    hop = RecordingServer(redirect_to=f"{target.url}/secret.png", body=_png(8, 8))
    same = RecordingServer(body=_png(8, 8))
    try:
        kw = {"allowed_roots": [hop.url, target.url], "allow_private_addresses": True}
        assert fetch_image_bytes(f"{hop.url}/r", **kw) == (None, "outside_root")  # another host:port, both allowed
        assert hop.requests == ["/r"] and target.requests == []  # the redirect was not followed
        same_hop = RecordingServer(redirect_to="/img.png", body=_png(8, 8))  # a redirect on the same origin is followed
        try:
            data, reason = fetch_image_bytes(f"{same_hop.url}/r", allowed_roots=[same_hop.url],
                                             allow_private_addresses=True)
            assert reason is None and data == _png(8, 8) and same_hop.requests == ["/r", "/img.png"]
        finally:
            same_hop.close()
        assert fetch_image_bytes(f"{hop.url}/r")[1] is None and target.requests == ["/secret.png"]  # unrestricted
    finally:
        for s in (target, hop, same):
            s.close()


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.1.2.3", "192.168.0.7", "172.16.5.4", "169.254.169.254", "100.64.0.1",
                                "0.0.0.0", "::1", "fd00:ec2::254", "::ffff:127.0.0.1", "224.0.0.1"])
def test_non_public_addresses_are_refused(ip: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from vlm2rec_ray.data import images

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 80))])
    assert images._blocked("metadata.internal", 80)[1] is True
    assert fetch_image_bytes("http://metadata.internal/latest/", allowed_roots=["http://metadata.internal/"]) == (
        None, "blocked_address")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "",
                                                                 ("93.184.216.34", 80))])
    assert images._blocked("example.com", 80) == ("93.184.216.34", False)
