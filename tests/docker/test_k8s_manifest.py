"""The example Kubernetes manifest agrees with the server it runs: its probes, port,
arguments and shutdown timing."""

from __future__ import annotations

from pathlib import Path

import yaml

from server.cli import build_parser

MANIFEST = Path(__file__).resolve().parents[2] / "docker" / "k8s" / "talan-serve.yaml"


def test_manifest_matches_the_server():
    deployment, service = yaml.safe_load_all(MANIFEST.read_text())
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["args"])  # talan-serve takes them
    assert args.model == "q8b-talan"
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]  # the image's port
    for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # preStop, then SIGTERM and the drain: both before the grace period's SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + args.drain_timeout
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
