"""cluster/: the Ray cluster-launcher config and the KubeRay RayCluster are valid YAML and pass the
checks Ray itself applies to them (the launcher's ray-schema.json; the KubeRay autoscaler's reading of
the RayCluster, which validates the node types it derives against the same schema)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())


def test_launcher_config_passes_rays_schema_and_asks_for_gpu_workers_with_token_auth():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())
    jsonschema.validate(config, _schema())
    validate_config(prepare_config(config))  # what `ray up` does before it starts anything
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0  # model actors go to the GPU workers
    assert types["gpu_worker"]["resources"]["GPU"] == 1 and types["gpu_worker"]["max_workers"] >= 1
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_launcher_schema_refuses_a_broken_config():
    config = yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())
    del config["available_node_types"]["gpu_worker"]["node_config"]
    with pytest.raises(jsonschema.ValidationError, match="node_config"):
        jsonschema.validate(config, _schema())


def test_kuberay_raycluster_reads_as_a_gpu_cluster_with_token_auth():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    assert (cr["apiVersion"], cr["kind"]) == ("ray.io/v1", "RayCluster")
    derived = _derive_autoscaling_config_from_ray_cr(cr)  # raises on a malformed spec (and schema-validates it)
    types = derived["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0 and types["headgroup"]["resources"]["ckd_node_head"] == 1
    gpu = types["gpu"]
    assert (gpu["resources"]["GPU"], gpu["resources"]["CPU"], gpu["min_workers"], gpu["max_workers"]) == (1, 8, 1, 4)
    containers = [cr["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0],
                  *(g["template"]["spec"]["containers"][0] for g in cr["spec"]["workerGroupSpecs"])]
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ckd-ray-token"
    # KubeRay takes rayStartParams as strings only
    for params in [cr["spec"]["headGroupSpec"]["rayStartParams"], *(g["rayStartParams"] for g in cr["spec"]["workerGroupSpecs"])]:
        assert all(isinstance(v, str) for v in params.values()), params
