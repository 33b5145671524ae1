"""`vlm2rec prepare images` and `prepare amazon --copy-images`: images served by an HTTP server on
127.0.0.1 (one 404, one flaky 503-then-200, one corrupt, one not an image) copied into a moto S3 bucket,
with failures counted by reason and kept in image_errors.parquet."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.fixtures.amazon import CORE_ITEMS, EXPECTED_STATS, write_amazon_fixture
from vlm2rec_ray import storage
from vlm2rec_ray.cli import app
from vlm2rec_ray.data.catalog import read_catalog, read_split, read_stats, resolve_image_uri, write_prepared
from vlm2rec_ray.data.images import encode_image, load_image
from vlm2rec_ray.data.prepare_images import IMAGE_ERRORS_FILE

pytestmark = pytest.mark.integration


class ImageServer:
    """Serves /img/<name>: ``ok*`` a JPEG, ``gone`` 404, ``flaky`` 503 on the first request then a PNG,
    ``corrupt`` a truncated JPEG, ``page`` an HTML page. Counts requests per path."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        jpeg = encode_image(Image.new("RGB", (90, 70), (20, 120, 220)), "JPEG")
        png = encode_image(Image.new("RGB", (50, 50), (250, 120, 20)), "PNG")
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.hits[self.path] += 1
                name = self.path.rsplit("/", 1)[-1].split(".")[0]
                status, body, ctype = 200, jpeg, "image/jpeg"
                if name == "gone":
                    status, body, ctype = 404, b"not found", "text/plain"
                elif name == "flaky" and server.hits[self.path] == 1:
                    status, body, ctype = 503, b"busy", "text/plain"
                elif name == "flaky":
                    body, ctype = png, "image/png"
                elif name == "corrupt":
                    body = jpeg[: len(jpeg) // 2]
                elif name == "page":
                    body, ctype = b"<html>login</html>", "text/html"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.close()


def test_prepare_images_cli_counts_failures_by_reason(image_server: ImageServer, moto_endpoint: str,
                                                      s3_bucket: str) -> None:
    ds = f"s3://{s3_bucket}/ds"
    names = {"a": "ok1", "b": "ok2", "c": "gone", "d": "flaky", "e": "corrupt", "f": "page"}
    catalog = pa.table({"item_id": list(names), "title": [f"t{i}" for i in names],
                        "image_uri": [f"{image_server.url}/img/{n}.jpg" for n in names.values()]})
    inter = pa.table({"user_id": ["u"] * 3, "item_id": ["a", "b", "d"], "timestamp": [1, 2, 3]})
    split = pa.table({"user_id": ["u"], "history": [["a", "b"]], "target": ["d"]})
    write_prepared(ds, catalog=catalog, interactions=inter, splits=dict.fromkeys(("train", "valid", "test"), split),
                   stats={"users": 1})

    result = CliRunner().invoke(app, ["prepare", "images", "--dataset", ds, "--concurrency", "4", "--retries", "2",
                                      "--endpoint", moto_endpoint])
    assert result.exit_code == 0, result.output
    assert "3 ok, 3 failed" in result.output
    for part in ("copied=3", "missing=1", "corrupt=1", "not_image=1", "retries=1"):
        assert part in result.output
    assert image_server.hits["/img/flaky.jpg"] == 2  # 503 retried once
    assert image_server.hits["/img/gone.jpg"] == 1  # a 404 is not retried

    cat = read_catalog(ds)
    uris = dict(zip(cat.column("item_id").to_pylist(), cat.column("image_uri").to_pylist(), strict=True))
    assert uris["a"] == "images/a.jpg" and uris["d"] == "images/d.png"
    assert uris["c"].startswith("http://")  # failed rows keep their source, listed with the reason
    im, reason = load_image(resolve_image_uri(uris["d"], f"{ds}/catalog.parquet"), min_pixels=1, max_pixels=10**6)
    assert reason is None and im.getpixel((0, 0)) == (250, 120, 20)
    errors = storage.read_parquet(f"{ds}/{IMAGE_ERRORS_FILE}").to_pylist()
    assert sorted((e["item_id"], e["reason"]) for e in errors) == [("c", "missing"), ("e", "corrupt"),
                                                                   ("f", "not_image")]

    # A second run resumes: copied images are local now, only the failures are tried again.
    before = sum(image_server.hits.values())
    again = CliRunner().invoke(app, ["prepare", "images", "--dataset", ds, "--retries", "0"])
    assert again.exit_code == 0, again.output
    assert "0 ok, 3 failed, 3 already local" in again.output
    assert sum(image_server.hits.values()) - before == 3


def test_prepare_amazon_copy_images_to_s3(image_server: ImageServer, moto_endpoint: str, s3_bucket: str,
                                          tmp_path) -> None:
    urls = {item: f"{image_server.url}/img/{'flaky' if item == 'i3' else 'ok-' + item}.jpg" for item in CORE_ITEMS}
    reviews, meta = write_amazon_fixture(tmp_path / "raw", "2023", url_for=lambda i: urls.get(i, f"{image_server.url}/img/gone.jpg"))
    # inputs from S3 too
    storage.write_bytes(f"s3://{s3_bucket}/raw/reviews.jsonl.gz", reviews.read_bytes())
    storage.write_bytes(f"s3://{s3_bucket}/raw/meta.jsonl.gz", meta.read_bytes())
    out = f"s3://{s3_bucket}/amazon"
    result = CliRunner().invoke(app, ["prepare", "amazon", "--reviews", f"s3://{s3_bucket}/raw/reviews.jsonl.gz",
                                      "--meta", f"s3://{s3_bucket}/raw/meta.jsonl.gz", "--out", out,
                                      "--copy-images", "--concurrency", "3", "--name", "Beauty"])
    assert result.exit_code == 0, result.output
    assert "#Users" in result.output and "Beauty" in result.output and "16.67%" in result.output
    assert '"copied": 6' in result.output
    assert read_stats(out) == EXPECTED_STATS
    cat = read_catalog(out)
    assert all(u.startswith("images/") for u in cat.column("image_uri").to_pylist())
    assert storage.list_uris(f"{out}/images") == sorted(f"{out}/images/{i}.{'png' if i == 'i3' else 'jpg'}"
                                                       for i in CORE_ITEMS)
    assert image_server.hits["/img/gone.jpg"] == 0  # images of items dropped earlier are never fetched
    assert read_split(out, "test").num_rows == 6
