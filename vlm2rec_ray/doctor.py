"""``vlm2rec doctor``: check that this machine can run vlm2rec jobs, with one clear line per check.

Checks: Python and key package versions, CPU/GPU (CUDA device names and memory), the DeepSpeed
accelerator, a Ray cluster (if an address is given or ``RAY_ADDRESS`` is set), and the object-store
endpoint (if given or ``AWS_ENDPOINT_URL`` is set). Each failure says what failed and how to fix it.
Exit code: 0 when every required check passes, 1 otherwise.
"""

from __future__ import annotations

import importlib
import os
import platform
import socket
import sys
from dataclasses import dataclass
from urllib.parse import urlparse

PACKAGES = ("torch", "ray", "transformers", "tokenizers", "peft", "deepspeed", "pyarrow", "PIL", "boto3",
            "pydantic", "typer")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def check_packages() -> list[Check]:
    from vlm2rec_ray.runtime import configure_local_env

    configure_local_env()  # sets DS_ACCELERATOR so importing deepspeed does not warn
    out = []
    for name in PACKAGES:
        try:
            mod = importlib.import_module(name)
            out.append(Check(f"package {name}", True, str(getattr(mod, "__version__", "installed"))))
        except Exception as e:  # a broken install can raise anything on import
            out.append(Check(f"package {name}", False,
                             f"cannot import ({type(e).__name__}: {e}); run `make install` or "
                             "`pip install -c constraints.txt -e .`"))
    return out


def check_compute() -> list[Check]:
    import torch

    checks = [Check("cpu", True, f"{os.cpu_count()} cores, {platform.machine()}, Python {sys.version.split()[0]}")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            checks.append(Check(f"gpu {i}", True, f"{p.name}, {p.total_memory / 2**30:.1f} GiB, "
                                                  f"bf16={'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
    else:
        checks.append(Check("gpu", True, "none visible: training and embedding run on CPU (fp32/bf16)", False))
    return checks


def check_ray(address: str | None) -> list[Check]:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return [Check("ray cluster", True, "no address given (RAY_ADDRESS unset): jobs start a local Ray", False)]
    if address.startswith("http"):
        parsed = urlparse(address)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 8265
    else:
        host, _, p = address.removeprefix("ray://").partition(":")
        port = int(p or 6379)
    try:
        with socket.create_connection((host, port), timeout=3):
            pass
    except OSError as e:
        return [Check("ray cluster", False, f"cannot reach {address} ({e}); start it with `ray start --head` or "
                                            "fix RAY_ADDRESS")]
    return [Check("ray cluster", True, f"{address} reachable")]


def check_object_store(endpoint: str | None) -> list[Check]:
    from vlm2rec_ray import storage

    ep = storage.endpoint_url(endpoint)
    if not ep:
        return [Check("object store", True, "no S3 endpoint configured (AWS default will be used for s3://)",
                      False)]
    try:
        client = storage.s3_client(ep, max_attempts=2, timeout_s=5)
        n = len(client.list_buckets().get("Buckets", []))
    except Exception as e:
        msg = storage.redact(f"{type(e).__name__}: {e}")
        return [Check("object store", False, f"{ep} not usable ({msg}); check the endpoint URL and credentials")]
    return [Check("object store", True, f"{ep} reachable, {n} bucket(s) visible")]


def run_doctor(endpoint: str | None = None, ray_address: str | None = None) -> int:
    checks = check_packages()
    if all(c.ok for c in checks if c.name == "package torch"):
        checks += check_compute()
    checks += check_ray(ray_address)
    checks += check_object_store(endpoint)
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "ok " if c.ok else "FAIL"
        print(f"[{mark}] {c.name:<{width}}  {c.detail}")
    failed = [c for c in checks if not c.ok and c.required]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed" + ("" if not failed else "; see FAIL lines"))
    return 1 if failed else 0
