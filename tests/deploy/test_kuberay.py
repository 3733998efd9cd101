"""deploy/kuberay/raycluster.yaml: a KubeRay RayCluster with a head, CPU workers and a GPU recipe."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy/kuberay/raycluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))


def containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def test_is_a_raycluster(cluster: dict[str, Any]) -> None:
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["name"]


def test_ray_version_matches_the_image_base(cluster: dict[str, Any]) -> None:
    dockerfile = (REPO / "deploy/Dockerfile").read_text(encoding="utf-8")
    base = re.search(r"^FROM rayproject/ray:(\S+?)-py311-cpu$", dockerfile, re.MULTILINE)
    assert base and cluster["spec"]["rayVersion"] == base.group(1)


def test_head_group(cluster: dict[str, Any]) -> None:
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (container,) = containers(head)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}


def test_cpu_worker_group(cluster: dict[str, Any]) -> None:
    groups = {group["groupName"]: group for group in cluster["spec"]["workerGroupSpecs"]}
    assert "cpu" in groups
    cpu = groups["cpu"]
    assert cpu["minReplicas"] <= cpu["replicas"] <= cpu["maxReplicas"]
    (container,) = containers(cpu)
    assert container["resources"]["requests"]["cpu"] == container["resources"]["limits"]["cpu"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_every_pod_shares_ray_auth_and_job_storage(cluster: dict[str, Any]) -> None:
    spec = cluster["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        (container,) = containers(group)
        env = {item["name"]: item for item in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "gradwatch-ray-auth",
            "key": "auth_token",
        }
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert mounts["/var/lib/gradwatch"] == "gradwatch-data"
        volumes = {volume["name"]: volume for volume in group["template"]["spec"]["volumes"]}
        assert volumes["gradwatch-data"]["persistentVolumeClaim"]["claimName"] == "gradwatch-data"


def test_gpu_worker_group_is_there_commented_out(cluster: dict[str, Any]) -> None:
    text = MANIFEST.read_text(encoding="utf-8")
    commented = "\n".join(line.split("# ", 1)[1] for line in text.splitlines() if line.startswith("    # "))
    gpu_block = commented[commented.index("- groupName: gpu") :]
    (gpu,) = yaml.safe_load(
        "\n".join(line.replace("*ray-env", "[]").replace("*mounts", "[]").replace("*volumes", "[]")
                  for line in gpu_block.splitlines())
    )  # fmt: skip
    assert gpu["groupName"] == "gpu"
    assert containers(gpu)[0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "gpu" not in {group["groupName"] for group in cluster["spec"]["workerGroupSpecs"]}
