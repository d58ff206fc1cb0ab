"""deploy/: the Kubernetes manifests validate against the Kubernetes OpenAPI schemas (PyPI
``kubernetes-validate``, strict: unknown fields are errors), hang together (selectors, probes,
config), and the Dockerfile keeps the shape deploy/README.md promises. The image itself cannot be
built here (see deploy/README.md); these checks are what can be had without it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from semroute.cli import build_parser
from semroute.config import load_settings
from semroute.dispatch.backend_config import load_backends

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
K8S_VERSION = "1.37.0"


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in _documents() if d["kind"] == kind]


@pytest.mark.parametrize(("name", "doc"), _documents(),
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_validates_strictly(name: str, doc: dict[str, Any]) -> None:
    """Each resource is valid for Kubernetes 1.37 with no field the schema does not know."""
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    """The validator is strict: a misspelt probe in a copy of the router Deployment fails."""
    deployment = next(d for d in _by_kind("Deployment") if d["metadata"]["name"].endswith("router"))
    container = dict(deployment["spec"]["template"]["spec"]["containers"][0])
    container["readinesProbe"] = container.pop("readinessProbe")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0] = container
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_every_kind_the_issue_asks_for_exists_for_router_and_dispatcher() -> None:
    """Deployment, Service, HPA, PDB and NetworkPolicy for both services, and a ConfigMap."""
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                 "NetworkPolicy"):
        names = {d["metadata"]["name"] for d in _by_kind(kind)}
        assert names == {"semroute-router", "semroute-dispatcher"}, (kind, names)
    assert {d["metadata"]["name"] for d in _by_kind("ConfigMap")} == {"semroute-config"}


def test_deployments_probe_grpc_health_on_a_declared_port_with_limits_as_non_root() -> None:
    """Readiness, liveness and startup probes use the gRPC health service on a port the
    container declares and its command serves; requests and limits are set; pods run non-root."""
    for deployment in _by_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        declared = {p["containerPort"] for p in container["ports"]}
        args = container["args"]
        served = int(args[args.index("--port") + 1])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == served, probe
        assert served in declared
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])
        build_parser().parse_args(args)  # the command line is one semroute accepts


def test_services_hpas_and_pdbs_point_at_the_deployments() -> None:
    """Selectors match the pod labels; HPA targets and PDB selectors name real Deployments; the
    router's Service is headless (gRPC calls spread by the client, not pinned by kube-proxy)."""
    labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
              for d in _by_kind("Deployment")}
    for service in _by_kind("Service"):
        pod_labels = labels[service["metadata"]["name"]]
        assert service["spec"]["selector"].items() <= pod_labels.items()
    router = next(s for s in _by_kind("Service") if s["metadata"]["name"] == "semroute-router")
    assert router["spec"]["clusterIP"] == "None"
    for hpa in _by_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in labels
    for pdb in _by_kind("PodDisruptionBudget"):
        name = pdb["metadata"]["name"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels[name].items()


def test_configmap_holds_valid_semroute_settings_and_backends(tmp_path: Path) -> None:
    """The dispatcher's settings and backends in the ConfigMap load with semroute's own loaders,
    and the files the Deployment passes are the ones the ConfigMap mounts."""
    (configmap,) = _by_kind("ConfigMap")
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text)
    settings = load_settings(tmp_path / "dispatcher.yaml")
    assert settings.state.url.startswith("redis://")
    assert set(load_backends(tmp_path / "backends.yaml")) >= {"local-small", "local-large"}
    dispatcher = next(d for d in _by_kind("Deployment") if "dispatcher" in d["metadata"]["name"])
    pod = dispatcher["spec"]["template"]["spec"]
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    args = pod["containers"][0]["args"]
    for flag in ("--config", "--backends"):
        assert Path(args[args.index(flag) + 1]).name in configmap["data"]
        assert args[args.index(flag) + 1].startswith(mount + "/")


def _stages() -> dict[str, list[str]]:
    """Dockerfile instructions (continuation lines joined) per stage name."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            current = stages.setdefault(line.split()[-1], [])
        current.append(line)
    return stages


def test_dockerfile_two_stages_torch_only_in_export_non_root_healthcheck() -> None:
    """An export stage with torch and a runtime stage without it (no torch, no `export`
    extra), running as a non-root user, with a HEALTHCHECK that runs the gRPC probe script."""
    stages = _stages()
    assert set(stages) == {"export", "runtime"}
    assert any("torch==" in line for line in stages["export"])
    runtime = " ".join(stages["runtime"])
    assert "torch" not in runtime and "[export" not in runtime
    users = [line.split()[1] for line in stages["runtime"] if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(line.startswith("HEALTHCHECK ") and "semroute-healthcheck" in line
               for line in stages["runtime"])


def test_dockerfile_copies_files_that_exist_and_runs_commands_semroute_accepts() -> None:
    """Every file copied from the build context exists in the repository, and the `semroute`
    commands of the export stage and the default CMD parse with the CLI."""
    for lines in _stages().values():
        for line in lines:
            if line.startswith("COPY ") and "--from=" not in line:
                for source in shlex.split(line)[1:-1]:
                    assert (REPO / source).exists(), line
    export = " ".join(_stages()["export"])
    commands = re.findall(r"semroute ((?:encoder|index) [^&]+)", export)
    assert len(commands) == 2
    for command in commands:
        build_parser().parse_args(shlex.split(command))
    cmd = next(line for line in _stages()["runtime"] if line.startswith("CMD "))
    build_parser().parse_args(yaml.safe_load(cmd[len("CMD "):]))
