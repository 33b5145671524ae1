"""Every file under cluster/ parses, and holds the fields the project relies on: S3 credentials and the Ray auth
token from Secrets (never inline), token authentication in every Ray container, and a NetworkPolicy that admits
only job submitters to the job API (8265) and Ray Client (10001)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[3] / "cluster"
ALL_YAML = sorted(CLUSTER.rglob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _walk(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_parses_and_has_no_inline_secrets(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path} is empty"
    for key, value in _walk(docs):
        if key in {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "aws_secret_access_key"}:
            pytest.fail(f"{path}: credential {key} written inline; use a Kubernetes Secret or instance role")
        if isinstance(value, dict) and value.get("name") == "RAY_AUTH_TOKEN" and "value" in value:
            pytest.fail(f"{path}: the Ray auth token is written inline; take it from the vlm2rec-ray-auth Secret")
        if isinstance(value, str):
            assert not re.search(r"AKIA[0-9A-Z]{16}", value), f"{path}: looks like an AWS key id"
            assert not re.search(r"RAY_AUTH_TOKEN=\S", value), f"{path}: the Ray auth token is written inline"


AUTH_SECRET = "vlm2rec-ray-auth"
SUBMITTER_LABEL = {"vlm2rec-ray/job-submitter": "true"}


def _check_token_auth(pod_template: dict, where: str) -> None:
    """Every container runs with RAY_AUTH_MODE=token and the token from the Secret."""
    for c in _containers(pod_template):
        env = {e["name"]: e for e in c.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: {c['name']} without token auth"
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        assert ref == {"name": AUTH_SECRET, "key": "auth_token"}, f"{where}: {c['name']}: token not from the Secret"


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == "2.60.0", where
    head = spec["headGroupSpec"]
    for t in [head["template"], *(g["template"] for g in spec["workerGroupSpecs"])]:
        _check_token_auth(t, where)
        assert t["metadata"]["labels"]["app"] == "vlm2rec-ray", f"{where}: pods outside networkpolicy.yaml"
    assert head["rayStartParams"]["num-cpus"] == "0", f"{where}: the head should not run work"
    for c in _containers(head["template"]):
        assert {"secretRef": {"name": "vlm2rec-s3"}} in c.get("envFrom", []), f"{where}: S3 creds via Secret"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "gpu" in groups, f"{where}: needs a GPU worker group"
    gpu = groups["gpu"]
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"], f"{where}: autoscaling bounds"
    assert int(gpu["rayStartParams"]["object-store-memory"]) > 1e9
    for c in _containers(gpu["template"]):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
        assert {"secretRef": {"name": "vlm2rec-s3"}} in c["envFrom"]


def test_raycluster() -> None:
    (doc,) = _docs(CLUSTER / "kuberay" / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    _check_cluster_spec(doc["spec"], "raycluster")


def test_rayjob_train() -> None:
    (doc,) = _docs(CLUSTER / "kuberay" / "rayjob-train.yaml")
    assert doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python jobs/train.py --config cluster/presets/")
    preset = spec["entrypoint"].split("--config ")[1].split()[0]
    assert (CLUSTER.parent / preset).exists(), f"RayJob points at a missing preset {preset}"
    assert spec["shutdownAfterJobFinishes"] is True
    yaml.safe_load(spec["runtimeEnvYAML"])
    _check_cluster_spec(spec["rayClusterSpec"], "rayjob-train")
    _check_submitter(spec, "rayjob-train")


def _check_submitter(spec: dict, where: str) -> None:
    """The pod that runs `ray job submit` carries the token and the label the NetworkPolicy admits."""
    assert spec["submissionMode"] == "K8sJobMode", where
    submitter = spec["submitterPodTemplate"]
    assert submitter["metadata"]["labels"] == SUBMITTER_LABEL, where
    _check_token_auth(submitter, f"{where} submitter")


def test_nightly_cronjob_creates_a_rayjob() -> None:
    docs = {d["kind"]: d for d in _docs(CLUSTER / "kuberay" / "nightly-cronjob.yaml")}
    assert {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"} <= set(docs)
    cron = docs["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert len(cron["schedule"].split()) == 5
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert "create" in docs["Role"]["rules"][0]["verbs"] and "rayjobs" in docs["Role"]["rules"][0]["resources"]
    rayjob = yaml.safe_load(docs["ConfigMap"]["data"]["rayjob.yaml"])
    assert rayjob["kind"] == "RayJob" and rayjob["metadata"]["generateName"].endswith("-")
    assert rayjob["spec"]["entrypoint"].startswith("python jobs/nightly.py")
    _check_cluster_spec(rayjob["spec"]["rayClusterSpec"], "nightly rayjob")
    _check_submitter(rayjob["spec"], "nightly rayjob")


def test_network_policy_admits_only_submitters_to_the_job_api() -> None:
    (doc,) = _docs(CLUSTER / "kuberay" / "networkpolicy.yaml")
    assert doc["kind"] == "NetworkPolicy" and doc["spec"]["policyTypes"] == ["Ingress"]
    assert doc["spec"]["podSelector"] == {"matchLabels": {"app": "vlm2rec-ray"}}
    for rule in doc["spec"]["ingress"]:
        sources = rule["from"]
        assert sources, "a rule without `from` admits everyone"
        if "ports" not in rule:  # every port: only the cluster's own pods
            assert sources == [{"podSelector": {"matchLabels": {"app": "vlm2rec-ray"}}}], rule
            continue
        assert sorted(p["port"] for p in rule["ports"]) == [8265, 10001], rule
        for src in sources:
            labels = src["podSelector"]["matchLabels"]
            assert labels == SUBMITTER_LABEL or labels == {"app.kubernetes.io/name": "kuberay-operator"}, src
            assert "ipBlock" not in src
    # the cluster files point people at it
    for name in ("raycluster.yaml", "rayjob-train.yaml", "nightly-cronjob.yaml"):
        assert "networkpolicy.yaml" in (CLUSTER / "kuberay" / name).read_text(), name


def test_ray_up_file() -> None:
    (doc,) = _docs(CLUSTER / "aws" / "ray-up.yaml")
    assert doc["provider"]["type"] == "aws"
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values()), "S3 access via instance role"
    assert sum(t.get("max_workers", 0) for t in types.values()) >= doc["max_workers"]
    assert any(t["node_config"]["InstanceType"].startswith(("g5", "p4d", "p5")) for t in types.values())
    # token auth: the token file comes from the submitter's machine, every `ray start` runs in token mode, and the
    # job API listens on the head's loopback (reached through `ray dashboard`'s SSH tunnel)
    assert doc["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    starts = [c for c in doc["head_start_ray_commands"] + doc["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts), starts
    assert "--dashboard-host=127.0.0.1" in starts[0]


def test_runtime_env() -> None:
    (doc,) = _docs(CLUSTER / "runtime_env.yaml")
    assert ".venv" in doc["excludes"] and "build" in doc["excludes"]
    assert not any("AWS_SECRET" in k for k in doc.get("env_vars", {}))


@pytest.mark.parametrize("size", ["3b", "7b", "32b"])
def test_backbone_presets_validate_and_agree_with_plan(size: str) -> None:
    from vlm2rec_ray.config import EmbedJobConfig, TrainJobConfig, load_config
    from vlm2rec_ray.plan import plan

    train = load_config(TrainJobConfig, CLUSTER / "presets" / f"qwen2_5_vl_{size}.yaml", [])
    embed = load_config(EmbedJobConfig, CLUSTER / "presets" / f"embed_qwen2_5_vl_{size}.yaml", [])
    assert train.scaling.use_gpu and train.precision == "bf16" and train.train.gradient_checkpointing
    assert train.uses_lora and train.lora.r == 16
    rec = plan(train.model.name, train.scaling.num_workers, 80, lora=True, lora_r=train.lora.r,
               micro_batch=train.train.per_device_batch_size)["recommended"]
    assert rec is not None
    assert train.train.zero_stage == rec["zero_stage"], (size, rec)
    assert train.train.offload_optimizer == (rec["offload"] != "none")
    assert train.train.offload_params == (rec["offload"] == "optimizer+params")
    assert train.train.per_device_batch_size == rec["micro_batch"] and train.train.grad_accum == rec["grad_accum"]
    # the embedding actor holds bf16 weights (2 bytes/param) with 25% room for activations
    params = plan(train.model.name, 1, 80)["params"]
    gpus = embed.gpus_per_actor
    assert gpus is not None and 2 * params * 1.25 <= gpus * 80 * 2**30, (size, gpus)
    assert embed.incremental and embed.model_version
