"""Process environment for local runs: keep Ray, DeepSpeed and caches on loopback and inside the repo.

Ray 2.60 on a single box needs a few settings to stay on 127.0.0.1 and inside a writable temp dir, and
DeepSpeed's JIT ops want a cache dir. :func:`configure_local_env` sets them (without overriding what the
user already exported) and :func:`init_local_ray` starts a private local Ray instance.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def build_dir() -> Path:
    """The ignored working directory for Ray temp files, JIT extensions and caches."""
    return Path(os.environ.get("VLM2REC_BUILD_DIR", Path.cwd() / "build")).resolve()


def configure_local_env(base: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Set (setdefault) the environment for local Ray/DeepSpeed runs; returns what is in effect."""
    root = Path(base).resolve() if base else build_dir()
    values = {
        "RAY_TMPDIR": str(root / "ray"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps Ray on 127.0.0.1 instead of eth0
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TORCH_EXTENSIONS_DIR": str(root / "torch_extensions"),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR") or _default_accelerator(),
        "VLM2REC_CACHE": str(root / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    for k, v in values.items():
        os.environ.setdefault(k, v)
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    return {k: os.environ[k] for k in values}


def _default_accelerator() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def init_local_ray(num_cpus: int | None = None, **kwargs: Any) -> Any:
    """Start (or reuse) a private local Ray instance bound to loopback, with the dashboard (Train V2 needs
    its state API)."""
    configure_local_env()
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    return ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _temp_dir=os.environ["RAY_TMPDIR"],
        log_to_driver=kwargs.pop("log_to_driver", True),
        **kwargs,
    )
