"""The deployment files: container image, Kubernetes manifests, systemd unit.

Owns: checking deploy/container/, deploy/kubernetes/ and deploy/systemd/ as shipped, offline:
every Kubernetes object against the Kubernetes schemas (kubernetes-validate), every poproxy
configuration they carry against `poproxy.config.parse`, the security properties the files
promise (no subPath for certificates, non-root, read-only root, no capabilities, probes, grace
periods, egress), that the files agree with each other (ports, names, secrets, selectors), the
systemd unit with `systemd-analyze`, and the Containerfile by reading it (nothing here can
build an image). Must never install anything, start a service or a container, contact a
cluster, or write outside pytest's tmp_path.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import ipaddress
import json
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from support.interop import interop_unavailable, require_program

from poproxy.config import Address, Config, Limits, parse
from poproxy.routing import Router
from poproxy.server import ABORT_TIMEOUT

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
CONTAINER = DEPLOY / "container"
CONTAINERFILE = CONTAINER / "Containerfile"
CONTAINER_CONFIG = CONTAINER / "poproxy.yaml"
KUBERNETES = DEPLOY / "kubernetes"
SIDECAR = KUBERNETES / "sidecar"
DMZ = KUBERNETES / "dmz"
UNIT = DEPLOY / "systemd" / "poproxy.service"
DEPLOY_DOC = REPO / "docs" / "deploy.md"

# The Kubernetes version whose schemas the manifests must satisfy: one that
# kubernetes-validate bundles, old enough for the clusters still in service.
KUBERNETES_VERSION = "1.30"

# Kinds that come from CustomResourceDefinitions, not from Kubernetes: kubernetes-validate
# has no schema for them, so they are checked structurally (apiVersion, kind, metadata,
# spec) and against the other files, below. Kustomization is kustomize's file, not an object.
CUSTOM_KINDS = {
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
KUSTOMIZATION = ("kustomize.config.k8s.io/v1beta1", "Kustomization")

# poproxy's shutdown, after the grace period: how long it waits for the cut sessions to end
# (docs/operations.md "Shutdown").
ABORT_WAIT = ABORT_TIMEOUT

# The container image's user: numeric, not root (Kubernetes' runAsNonRoot checks numbers).
IMAGE_UID = 10001

# What poproxy's DMZ pods may reach: backends on POP3, and DNS.
ALLOWED_EGRESS = {("TCP", 110), ("UDP", 53), ("TCP", 53)}
BACKEND_PORT = 110


# --- Reading the files ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Document:
    path: Path
    index: int
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind"))

    @property
    def name(self) -> str:
        return str(self.body.get("metadata", {}).get("name"))

    def __str__(self) -> str:
        name = f"/{self.name}" if "name" in self.body.get("metadata", {}) else ""
        return f"{self.path.relative_to(REPO)}[{self.index}] {self.kind}{name}"


def _documents(directory: Path) -> list[Document]:
    documents = []
    for path in sorted(directory.glob("*.yaml")):
        with path.open(encoding="utf-8") as file:
            for index, body in enumerate(yaml.safe_load_all(file)):
                if body is None:
                    continue
                assert isinstance(body, dict), f"{path}[{index}]: not a mapping"
                documents.append(Document(path, index, body))
    return documents


def _all_documents() -> list[Document]:
    return [doc for directory in (SIDECAR, DMZ) for doc in _documents(directory)]


def _one(documents: list[Document], kind: str, name: str | None = None) -> Document:
    found = [d for d in documents if d.kind == kind and (name is None or d.name == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[str(d) for d in found]}"
    return found[0]


def _ids(documents: list[Document]) -> list[str]:
    return [str(document) for document in documents]


ALL_DOCUMENTS = _all_documents()


# --- One poproxy deployment: its Deployment, container, config and ConfigMap ---------------


@dataclasses.dataclass(frozen=True)
class PoproxyPod:
    """The poproxy container of a Deployment, and the configuration it runs with."""

    directory: Path
    documents: list[Document]
    deployment: Document
    pod: dict[str, Any]  # the Deployment's spec.template.spec
    container: dict[str, Any]
    config_path: PurePosixPath  # -c in the container's args
    config_text: str
    config: Config

    def volume(self, name: str) -> dict[str, Any]:
        volumes = [v for v in self.pod.get("volumes", []) if v["name"] == name]
        assert len(volumes) == 1, f"{self.deployment}: volume {name!r}"
        volume: dict[str, Any] = volumes[0]
        return volume

    def mount_for(self, path: PurePosixPath) -> dict[str, Any]:
        """The container's volumeMount whose mountPath is the directory of `path`."""
        mounts = [
            m
            for m in self.container.get("volumeMounts", [])
            if PurePosixPath(m["mountPath"]) == path.parent
        ]
        assert len(mounts) == 1, f"{self.deployment}: one volume mounted at {path.parent}"
        mount: dict[str, Any] = mounts[0]
        return mount

    def port(self, name_or_number: str | int) -> int:
        """A container port by name (as probes and Services give it) or number."""
        if isinstance(name_or_number, int):
            return name_or_number
        ports = [p for p in self.container["ports"] if p.get("name") == name_or_number]
        assert len(ports) == 1, f"{self.deployment}: container port {name_or_number!r}"
        return int(ports[0]["containerPort"])

    @property
    def pod_labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.deployment.body["spec"]["template"]["metadata"]["labels"]
        return labels

    @property
    def metrics_port(self) -> int:
        assert self.config.metrics is not None, f"{self.deployment}: no metrics section"
        return self.config.metrics.listen.port

    @property
    def listener_ports(self) -> set[int]:
        return {listener.listen.port for listener in self.config.listeners}


def _config_argument(container: dict[str, Any]) -> PurePosixPath:
    args = [*container.get("command", []), *container.get("args", [])]
    assert "-c" in args, f"container {container['name']}: no -c CONFIG in {args}"
    return PurePosixPath(args[args.index("-c") + 1])


@functools.cache
def _poproxy_pod(directory: Path) -> PoproxyPod:
    """Read once, when a test first asks: a broken file fails the tests, not the collection."""
    documents = _documents(directory)
    deployment = _one(documents, "Deployment")
    pod = deployment.body["spec"]["template"]["spec"]
    containers = [c for c in pod["containers"] if c["name"] == "poproxy"]
    assert len(containers) == 1, f"{deployment}: one container named poproxy"
    container = containers[0]
    config_path = _config_argument(container)
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if PurePosixPath(m["mountPath"]) == config_path.parent
    ]
    assert len(mounts) == 1, f"{deployment}: the directory of {config_path} is one volume"
    volumes = [v for v in pod["volumes"] if v["name"] == mounts[0]["name"]]
    assert len(volumes) == 1 and "configMap" in volumes[0], f"{deployment}: config volume"
    config_map = _one(documents, "ConfigMap", volumes[0]["configMap"]["name"])
    text = config_map.body["data"][config_path.name]
    config = parse(text, source=str(config_map), base=Path(config_path.parent))
    return PoproxyPod(directory, documents, deployment, pod, container, config_path, text, config)


@pytest.fixture(params=[SIDECAR, DMZ], ids=["sidecar", "dmz"])
def pod(request: pytest.FixtureRequest) -> PoproxyPod:
    """Each poproxy Deployment in turn."""
    directory: Path = request.param
    return _poproxy_pod(directory)


@pytest.fixture
def sidecar() -> PoproxyPod:
    return _poproxy_pod(SIDECAR)


@pytest.fixture
def dmz() -> PoproxyPod:
    return _poproxy_pod(DMZ)


# --- (a) Kubernetes schemas -----------------------------------------------------------------


@pytest.mark.parametrize("document", ALL_DOCUMENTS, ids=_ids(ALL_DOCUMENTS))
def test_kubernetes_object_is_valid(document: Document) -> None:
    """Every object validates against the Kubernetes schemas, strictly: an unknown or
    misspelt field fails, and so does a number where a string belongs."""
    key = (document.body.get("apiVersion"), document.kind)
    if key == KUSTOMIZATION:
        _check_kustomization(document)
    elif key in CUSTOM_KINDS:
        _check_custom_resource(document)
    else:
        try:
            kubernetes_validate.validate(document.body, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{document}: {where}: {exc.message}", pytrace=False)


# Mistakes the validator must find: (where, key, new value or None to remove the key).
SCHEMA_MISTAKES = {
    "misspelt key": ("container", "volumeMount", []),
    "string for a number": ("pod", "terminationGracePeriodSeconds", "45"),
    "required key missing": ("container", "name", None),
}


@pytest.mark.parametrize(("where", "key", "value"), SCHEMA_MISTAKES.values(), ids=SCHEMA_MISTAKES)
def test_schema_validation_rejects_mistakes(
    where: str, key: str, value: object, dmz: PoproxyPod
) -> None:
    """The validator is not a rubber stamp: it finds the mistakes these files could have."""
    body = json.loads(json.dumps(dmz.deployment.body))
    pod = body["spec"]["template"]["spec"]
    target = pod if where == "pod" else pod["containers"][0]
    if value is None:
        del target[key]
    else:
        target[key] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)


def _check_custom_resource(document: Document) -> None:
    body = document.body
    assert set(body) == {"apiVersion", "kind", "metadata", "spec"}, f"{document}: {set(body)}"
    assert isinstance(body["metadata"], dict), document
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", document.name), document
    assert isinstance(body["spec"], dict) and body["spec"], document


def _check_kustomization(document: Document) -> None:
    resources = document.body["resources"]
    directory = document.path.parent
    for resource in resources:
        assert (directory / resource).is_file(), f"{document}: {resource} does not exist"
    # Every file of Kubernetes' own kinds is listed; files of custom kinds are not, so that
    # `kubectl apply -k` works on a cluster without cert-manager or the Prometheus Operator.
    for other in _documents(directory):
        key = (other.body.get("apiVersion"), other.kind)
        listed = other.path.name in resources
        if key == KUSTOMIZATION:
            continue
        if key in CUSTOM_KINDS:
            assert not listed, f"{document}: {other.path.name} needs a CRD: do not list it"
        else:
            assert listed, f"{document}: {other.path.name} is not listed in resources"


# --- (b) Every poproxy configuration parses --------------------------------------------------


def _embedded_configs() -> list[tuple[str, str]]:
    configs = [(str(CONTAINER_CONFIG.relative_to(REPO)), CONTAINER_CONFIG.read_text())]
    for document in ALL_DOCUMENTS:
        if document.kind == "ConfigMap":
            for key, value in document.body.get("data", {}).items():
                if key.endswith((".yaml", ".yml")):
                    configs.append((f"{document} {key}", value))
    return configs


EMBEDDED_CONFIGS = _embedded_configs()


@pytest.mark.parametrize(("source", "text"), EMBEDDED_CONFIGS, ids=[s for s, _ in EMBEDDED_CONFIGS])
def test_embedded_config_parses(source: str, text: str) -> None:
    """parse, not check-config: the certificate and map files exist only where deployed."""
    config = parse(text, source=source)
    assert config.user is None, "never started as root: `user:` would only mislead"
    assert config.group is None
    assert config.metrics is not None, "probes and the HEALTHCHECK need /healthz and /readyz"
    for listener in config.listeners:
        # The containers have no capability: only ports above 1023 can be bound.
        assert listener.listen.port > 1023, f"{source}: {listener.name}"
    for certificate in config.tls.certificates:
        assert certificate.cert.is_absolute() and certificate.key.is_absolute()


def test_every_configmap_config_is_found() -> None:
    """Two ConfigMaps with a poproxy.yaml, each the one its Deployment runs."""
    found = [source for source, _ in EMBEDDED_CONFIGS if "ConfigMap" in source]
    assert len(found) == 2, found
    for directory in (SIDECAR, DMZ):
        pod = _poproxy_pod(directory)
        assert any(pod.config_text == text for _, text in EMBEDDED_CONFIGS)


def test_dmz_map_file_routes(tmp_path: Path, dmz: PoproxyPod) -> None:
    """users.map in the DMZ ConfigMap loads with no complaint and routes as it says."""
    (route,) = [r for r in dmz.config.routes if r.map_file is not None]
    assert route.map_file is not None
    mount = dmz.mount_for(PurePosixPath(route.map_file))
    config_map = _one(dmz.documents, "ConfigMap", dmz.volume(mount["name"])["configMap"]["name"])
    local = tmp_path / route.map_file.name
    local.write_text(config_map.body["data"][route.map_file.name])
    routes = tuple(
        dataclasses.replace(r, map_file=local) if r is route else r for r in dmz.config.routes
    )
    router = Router(routes, tuple(backend.name for backend in dmz.config.backends))
    assert router.refresh() == []
    assert router.route(b"alice@example.org").backend == "mail-b"
    assert router.route(b"bob@example.org").backend == "legacy"
    assert router.route(b"carol@example.org").server == ("10.20.0.12", 110)


# --- (c) Security properties and agreement between the files ---------------------------------


def _effective_security(pod: PoproxyPod) -> dict[str, Any]:
    """The container's securityContext over the pod's (the container's wins)."""
    merged: dict[str, Any] = dict(pod.pod.get("securityContext", {}))
    merged.update(pod.container.get("securityContext", {}))
    return merged


def test_poproxy_container_is_locked_down(pod: PoproxyPod) -> None:
    security = _effective_security(pod)
    assert security.get("runAsNonRoot") is True
    assert security.get("runAsUser", IMAGE_UID) != 0
    assert security.get("readOnlyRootFilesystem") is True
    assert security.get("allowPrivilegeEscalation") is False
    capabilities = security.get("capabilities", {})
    assert capabilities.get("drop") == ["ALL"]
    assert not capabilities.get("add")
    assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert not security.get("privileged")
    assert pod.pod.get("automountServiceAccountToken") is False
    assert not pod.pod.get("hostNetwork")


def test_certificates_come_from_a_secret_directory(pod: PoproxyPod) -> None:
    """A Secret mounted as a directory: a subPath mount would never see a renewal."""
    for certificate in pod.config.tls.certificates:
        for path in (PurePosixPath(certificate.cert), PurePosixPath(certificate.key)):
            mount = pod.mount_for(path)
            assert "subPath" not in mount and "subPathExpr" not in mount, mount
            assert mount.get("readOnly") is True
            volume = pod.volume(mount["name"])
            assert "secret" in volume, f"{pod.deployment}: {path} is not in a Secret volume"
            # A kubernetes.io/tls Secret (cert-manager's, kubectl create secret tls) has these
            # keys; `items` would pick files and is not needed.
            assert path.name in {"tls.crt", "tls.key"}
            assert "items" not in volume["secret"]
    for mount in pod.container.get("volumeMounts", []):
        assert "subPath" not in mount and "subPathExpr" not in mount, mount


def test_secret_is_the_one_cert_manager_writes(pod: PoproxyPod) -> None:
    certificate = _one(pod.documents, "Certificate")
    (cert_file,) = {PurePosixPath(c.cert) for c in pod.config.tls.certificates}
    secret = pod.volume(pod.mount_for(cert_file)["name"])["secret"]
    assert certificate.body["spec"]["secretName"] == secret["secretName"]
    assert certificate.body["spec"]["dnsNames"]
    assert certificate.body["spec"]["issuerRef"]["name"]
    # The key must be readable by the container's user: through fsGroup with a group-read
    # mode, or world-read inside a volume only this container mounts.
    mode = secret.get("defaultMode", 0o644)
    fs_group = pod.pod.get("securityContext", {}).get("fsGroup")
    user = _effective_security(pod).get("runAsUser", IMAGE_UID)
    assert mode & 0o004 or (fs_group is not None and mode & 0o040), (mode, fs_group, user)
    assert not mode & 0o002, "never writable"


def test_probes_use_health_endpoints(pod: PoproxyPod) -> None:
    liveness = pod.container["livenessProbe"]["httpGet"]
    readiness = pod.container["readinessProbe"]["httpGet"]
    assert liveness["path"] == "/healthz"
    assert readiness["path"] == "/readyz"
    assert pod.port(liveness["port"]) == pod.metrics_port
    assert pod.port(readiness["port"]) == pod.metrics_port
    metrics = pod.config.metrics
    assert metrics is not None
    # The kubelet probes the pod's address, not its loopback: listen on every address.
    assert ipaddress.ip_address(metrics.listen.host).is_unspecified


def _prestop_seconds(container: dict[str, Any]) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"unknown preStop {command}"
    return float(command[1])


def test_grace_period_covers_poproxy_shutdown(pod: PoproxyPod) -> None:
    """preStop, then shutdown_grace, then the wait for the cut sessions, before SIGKILL."""
    grace = pod.pod["terminationGracePeriodSeconds"]
    needed = _prestop_seconds(pod.container) + pod.config.limits.shutdown_grace + ABORT_WAIT
    assert grace > needed, f"{pod.deployment}: {grace}s is not more than {needed}s"


def test_container_ports_are_the_configured_ones(pod: PoproxyPod) -> None:
    declared = {int(p["containerPort"]) for p in pod.container["ports"]}
    assert declared == pod.listener_ports | {pod.metrics_port}
    resources = pod.container["resources"]
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[section]), f"{pod.deployment}: {section}"
    annotations = pod.deployment.body["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(pod.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def test_public_service_exposes_only_the_pop3_listeners(pod: PoproxyPod) -> None:
    public = [
        d
        for d in pod.documents
        if d.kind == "Service" and d.body["spec"].get("type") == "LoadBalancer"
    ]
    assert len(public) == 1
    spec = public[0].body["spec"]
    assert _selects(spec["selector"], pod.pod_labels)
    targets = {pod.port(p["targetPort"]): p["port"] for p in spec["ports"]}
    assert set(targets) == pod.listener_ports, "metrics and the backend stay private"
    tls_of = {listener.listen.port: listener.tls for listener in pod.config.listeners}
    assert {tls_of[target]: port for target, port in targets.items()} == {
        "implicit": 995,
        "starttls": 110,
    }


def test_service_monitor_finds_the_metrics_service(pod: PoproxyPod) -> None:
    monitor = _one(pod.documents, "ServiceMonitor")
    selector = monitor.body["spec"]["selector"]["matchLabels"]
    services = [
        d
        for d in pod.documents
        if d.kind == "Service" and _selects(selector, d.body["metadata"]["labels"])
    ]
    assert len(services) == 1, f"{monitor}: selects {_ids(services)}"
    service = services[0].body["spec"]
    assert service["type"] == "ClusterIP"
    assert _selects(service["selector"], pod.pod_labels)
    (endpoint,) = monitor.body["spec"]["endpoints"]
    (port,) = [p for p in service["ports"] if p["name"] == endpoint["port"]]
    assert pod.port(port["targetPort"]) == pod.metrics_port
    assert endpoint["path"] == "/metrics"


# The sidecar: the mail server is reached on the pod's loopback, and only by poproxy.


def _dovecot_conf(sidecar: PoproxyPod) -> str:
    config_maps = [d for d in sidecar.documents if "dovecot.conf" in d.body.get("data", {})]
    assert len(config_maps) == 1
    text: str = config_maps[0].body["data"]["dovecot.conf"]
    return text


def _dovecot_settings(text: str) -> dict[str, str]:
    """Top-level `key = value` lines (not inside a section)."""
    settings: dict[str, str] = {}
    depth = 0
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.endswith("{"):
            depth += 1
        elif line == "}":
            depth -= 1
        elif depth == 0 and "=" in line:
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip()
    return settings


def test_sidecar_mail_server_listens_on_loopback_only(sidecar: PoproxyPod) -> None:
    settings = _dovecot_settings(_dovecot_conf(sidecar))
    assert settings["listen"] == "127.0.0.1"
    assert settings["ssl"] == "no"
    assert settings["login_trusted_networks"] == "127.0.0.1/32"
    assert settings.get("disable_plaintext_auth", "yes") == "yes"
    (mail_server,) = [c for c in sidecar.pod["containers"] if c["name"] != "poproxy"]
    assert "ports" not in mail_server, "the plaintext POP3 port is no port of the pod"
    for backend in sidecar.config.backends:
        for server in backend.servers:
            assert ipaddress.ip_address(server.host).is_loopback, server
            assert server.port == BACKEND_PORT


def test_sidecar_dovecot_conf_is_accepted_by_doveconf(sidecar: PoproxyPod, tmp_path: Path) -> None:
    doveconf = require_program("doveconf")
    conf = tmp_path / "dovecot.conf"
    conf.write_text(_dovecot_conf(sidecar))
    result = subprocess.run(
        [doveconf, "-n", "-c", str(conf)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "listen = 127.0.0.1" in result.stdout


def test_sidecar_mail_server_outlives_poproxy(sidecar: PoproxyPod) -> None:
    """Dovecot's preStop waits for poproxy's metrics endpoint to close, so that the sessions
    poproxy drains still have their backend."""
    (mail_server,) = [c for c in sidecar.pod["containers"] if c["name"] != "poproxy"]
    command = " ".join(mail_server["lifecycle"]["preStop"]["exec"]["command"])
    assert f"/dev/tcp/127.0.0.1/{sidecar.metrics_port}" in command
    match = re.search(r"seq (\d+)", command)
    assert match is not None
    assert int(match.group(1)) < sidecar.pod["terminationGracePeriodSeconds"]


# The DMZ tier: PROXY protocol, many replicas, egress to the backends only.


def test_dmz_listeners_require_the_proxy_header(dmz: PoproxyPod) -> None:
    for listener in dmz.config.listeners:
        assert listener.proxy_protocol is not None, listener.name
        assert listener.proxy_protocol.trusted
        for network in listener.proxy_protocol.trusted:
            assert ipaddress.ip_network(network).is_private, "trust the balancer's network only"


def test_dmz_backends_have_health_checks(dmz: PoproxyPod) -> None:
    assert len(dmz.config.backends) >= 2
    for backend in dmz.config.backends:
        assert backend.health_check is not None, backend.name
    kinds = {route.kind for route in dmz.config.routes}
    assert {"users", "domains", "map_file"} <= kinds


def _egress_rules(dmz: PoproxyPod) -> list[dict[str, Any]]:
    policy = _one(dmz.documents, "NetworkPolicy").body["spec"]
    assert _selects(policy["podSelector"]["matchLabels"], dmz.pod_labels)
    assert "Egress" in policy["policyTypes"] and "Ingress" in policy["policyTypes"]
    rules: list[dict[str, Any]] = policy["egress"]
    return rules


def test_dmz_egress_only_to_backends_and_dns(dmz: PoproxyPod) -> None:
    rules = _egress_rules(dmz)
    assert rules
    for rule in rules:
        assert rule.get("ports"), f"a rule without ports allows every port: {rule}"
        assert rule.get("to"), f"a rule without destinations allows every one: {rule}"
        ports = {(port.get("protocol", "TCP"), port["port"]) for port in rule["ports"]}
        assert ports <= ALLOWED_EGRESS, ports
        assert all("endPort" not in port for port in rule["ports"])
        if (("TCP", BACKEND_PORT)) in ports:
            for peer in rule["to"]:
                assert set(peer) == {"ipBlock"}, "backends by CIDR"
                assert ipaddress.ip_network(peer["ipBlock"]["cidr"]).is_private


def _egress_allows(dmz: PoproxyPod, address: Address) -> bool:
    for rule in _egress_rules(dmz):
        ports = {(port.get("protocol", "TCP"), port["port"]) for port in rule["ports"]}
        if ("TCP", address.port) not in ports:
            continue
        for peer in rule["to"]:
            block = peer.get("ipBlock")
            if block and ipaddress.ip_address(address.host) in ipaddress.ip_network(block["cidr"]):
                return True
    return False


def _map_file_servers(dmz: PoproxyPod) -> Iterator[Address]:
    config_map = _one(dmz.documents, "ConfigMap", "poproxy")
    for route in dmz.config.routes:
        if route.map_file is None:
            continue
        for line in config_map.body["data"][route.map_file.name].splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) == 2 and ":" in words[1]:
                host, port = words[1].rsplit(":", 1)
                yield Address(host.strip("[]"), int(port))


def test_dmz_egress_reaches_every_backend(dmz: PoproxyPod) -> None:
    servers = [server for backend in dmz.config.backends for server in backend.servers]
    servers.extend(_map_file_servers(dmz))
    assert len(servers) >= 5
    for server in servers:
        assert _egress_allows(dmz, server), f"networkpolicy.yaml blocks backend {server}"


def test_dmz_ingress_is_the_pop3_ports_and_metrics(dmz: PoproxyPod) -> None:
    policy = _one(dmz.documents, "NetworkPolicy").body["spec"]
    open_ports: set[int] = set()
    for rule in policy["ingress"]:
        ports = {int(port["port"]) for port in rule["ports"]}
        if dmz.metrics_port in ports:
            assert rule.get("from"), "metrics from the monitoring namespace only"
        open_ports |= ports
    assert open_ports == dmz.listener_ports | {dmz.metrics_port}


def test_dmz_scales_and_spreads(dmz: PoproxyPod) -> None:
    spec = dmz.deployment.body["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = _one(dmz.documents, "HorizontalPodAutoscaler").body["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dmz.deployment.name,
    }
    assert hpa["minReplicas"] >= 2
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in dmz.container["resources"]["requests"], "utilization needs a request"
    pdb = _one(dmz.documents, "PodDisruptionBudget").body["spec"]
    assert _selects(pdb["selector"]["matchLabels"], dmz.pod_labels)
    spread = dmz.pod.get("topologySpreadConstraints", [])
    anti_affinity = dmz.pod.get("affinity", {}).get("podAntiAffinity")
    assert spread or anti_affinity
    for constraint in spread:
        assert _selects(constraint["labelSelector"]["matchLabels"], dmz.pod_labels)


def test_dmz_service_documents_proxy_protocol_annotations() -> None:
    text = (DMZ / "service.yaml").read_text()
    assert "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol" in text


# --- (d) systemd ---------------------------------------------------------------------------


def _unit() -> dict[str, dict[str, list[str]]]:
    """Sections of the unit, each key with all its values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{UNIT}: {line!r} before any section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


_SYSTEMD_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "": 1.0}


def _systemd_seconds(text: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * _SYSTEMD_UNITS[unit]
    return total


def test_unit_settings() -> None:
    service = {key: values[-1] for key, values in _unit()["Service"].items()}
    assert service["Type"] == "notify"
    assert service["ExecStart"] == "/usr/local/bin/poproxy run -c /etc/poproxy/poproxy.yaml"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert service.get("User") == "poproxy" or service.get("DynamicUser") == "yes"
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    for key, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "SystemCallArchitectures": "native",
    }.items():
        assert service[key] == value, key
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert _unit()["Service"]["SystemCallFilter"][0] == "@system-service"
    # SIGKILL must not come before poproxy has finished its shutdown.
    stop = _systemd_seconds(service["TimeoutStopSec"])
    assert stop > Limits().shutdown_grace + ABORT_WAIT


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's poproxy: verify checks that it exists."""
    poproxy = Path(sys.executable).parent / "poproxy"
    assert poproxy.is_file(), f"{poproxy}: poproxy is not installed beside {sys.executable}"
    text = UNIT.read_text().replace("/usr/local/bin/poproxy", str(poproxy))
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    systemd_analyze = require_program("systemd-analyze")
    unit = _unit_for_this_machine(tmp_path)
    result = subprocess.run(
        [systemd_analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on unknown keys and bad values, and only warns: read what it says.
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if unit.name in line
    ]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_unit_sandbox_exposure_is_low(tmp_path: Path) -> None:
    """systemd's own rating of the sandbox: 'OK' (below 2.0 of 10)."""
    systemd_analyze = require_program("systemd-analyze")
    unit = _unit_for_this_machine(tmp_path)
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=true", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "unrecognized option" in result.stderr:
        interop_unavailable(
            f"systemd-analyze security --offline needs systemd 250: {result.stderr}"
        )
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_catches_mistakes(tmp_path: Path) -> None:
    """The verify check above does see a bad unit."""
    systemd_analyze = require_program("systemd-analyze")
    unit = _unit_for_this_machine(tmp_path)
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notifyy"))
    result = subprocess.run(
        [systemd_analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert unit.name in result.stdout + result.stderr


# --- (e) The Containerfile, read (it cannot be built here) ----------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line:
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    assert not pending, "the Containerfile ends in a continuation"
    return instructions


def _arguments(name: str) -> list[str]:
    return [rest for word, rest in _instructions() if word == name]


def _container_config() -> Config:
    return parse(CONTAINER_CONFIG.read_text(), source=str(CONTAINER_CONFIG))


def test_containerfile_base_and_user() -> None:
    for base in _arguments("FROM"):
        image = base.split()[0]
        assert re.fullmatch(r"python:3\.1[12]-slim", image), image
    user = _arguments("USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) == IMAGE_UID, "numeric and not root"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    assert _arguments("STOPSIGNAL") == ["SIGTERM"]


def test_containerfile_installs_from_the_repository() -> None:
    for add in _arguments("ADD"):
        assert not re.search(r"\b(?:https?|ftp|git)://", add), f"ADD of a remote URL: {add}"
    runs = " ".join(_arguments("RUN"))
    assert "pip install --no-cache-dir" in runs
    assert not re.search(r"\b(?:curl|wget)\b", runs)
    for copy in _arguments("COPY"):
        words = [w for w in copy.split() if not w.startswith("--")]
        if copy.startswith("--from="):
            continue
        for source in words[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_containerfile_default_config() -> None:
    copies = [c.split() for c in _arguments("COPY")]
    assert ["deploy/container/poproxy.yaml", "/etc/poproxy/poproxy.yaml"] in copies
    entrypoint = json.loads(_arguments("ENTRYPOINT")[0])
    command = json.loads(_arguments("CMD")[-1])
    assert entrypoint == ["poproxy"]
    assert command == ["run", "-c", "/etc/poproxy/poproxy.yaml"]
    config = _container_config()
    assert {listener.listen.port for listener in config.listeners} == {1995, 1110}
    assert config.metrics is not None and str(config.metrics.listen) == "0.0.0.0:9110"
    assert {str(c.cert) for c in config.tls.certificates} == {"/etc/poproxy/tls/tls.crt"}
    assert {str(c.key) for c in config.tls.certificates} == {"/etc/poproxy/tls/tls.key"}
    exposed = {int(p.split("/")[0]) for e in _arguments("EXPOSE") for p in e.split()}
    assert exposed == {1995, 1110, 9110}


def _healthcheck_command() -> list[str]:
    (healthcheck,) = _arguments("HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv: list[str] = json.loads(command)
    return argv


def test_containerfile_healthcheck_asks_healthz() -> None:
    argv = _healthcheck_command()
    assert argv[:2] == ["python", "-c"]
    config = _container_config()
    assert config.metrics is not None
    assert f"http://127.0.0.1:{config.metrics.listen.port}/healthz" in argv[2]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False), (None, False)])
def test_containerfile_healthcheck_exit_status(status: int | None, healthy: bool) -> None:
    """The HEALTHCHECK's Python line, run here against a stand-in /healthz: exit 0 on 200,
    non-zero on an error status or when nothing listens."""
    code = _healthcheck_command()[2]

    class Handler(_Health):
        pass

    Handler.status = status or 200
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        if status is None:
            server.shutdown()
            server.server_close()
        local = code.replace("127.0.0.1:9110", f"127.0.0.1:{port}")
        assert local != code
        result = subprocess.run(
            [sys.executable, "-c", local], capture_output=True, text=True, timeout=30, check=False
        )
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
        thread.join(timeout=10)
    assert (result.returncode == 0) == healthy, result.stderr


# --- docs/deploy.md ----------------------------------------------------------------------------


def test_deploy_doc_describes_every_file() -> None:
    text = DEPLOY_DOC.read_text()
    for directory in (CONTAINER, SIDECAR, DMZ, UNIT.parent):
        for path in sorted(directory.iterdir()):
            relative = path.relative_to(REPO)
            assert str(relative) in text or f"`{path.name}`" in text, f"{relative} not described"
    for words in ("docker run", "podman run", "995:1995", "110:1110", "systemd-analyze"):
        assert words in text, words
    assert "login_trusted_networks" in text and "disable_plaintext_auth" in text
    # No invented figure: sizing points at the benchmark's recorded results.
    assert "bench/RESULTS.md" in text
    assert not re.search(r"\d[\d,]*\s*sessions/s", text)


def _doc_commands(prefixes: tuple[str, ...]) -> list[str]:
    """Shell commands in the doc that start a line with one of `prefixes`, continuations joined."""
    commands: list[str] = []
    lines = iter(DEPLOY_DOC.read_text().splitlines())
    for line in lines:
        if not line.startswith(prefixes):
            continue
        command = line
        while command.endswith("\\"):
            command = command[:-1] + " " + next(lines).strip()
        commands.append(command)
    return commands


def test_deploy_doc_run_lines() -> None:
    """The `docker run` / `podman run` lines split as a shell would, map the standard ports
    onto the image's, mount the certificates read-only and wait out the shutdown."""
    commands = _doc_commands(("docker run", "podman run"))
    assert len(commands) >= 2
    image_ports = {port for e in _arguments("EXPOSE") for port in e.split()}
    for command in commands:
        words = shlex.split(command)
        published = [words[i + 1] for i, word in enumerate(words) if word == "-p"]
        assert {"995:1995", "110:1110"} <= set(published), command
        for mapping in published:
            assert f"{mapping.rsplit(':', 1)[1]}/tcp" in image_ports, mapping
        volumes = [words[i + 1] for i, word in enumerate(words) if word == "-v"]
        assert any(
            v.split(":")[1] == "/etc/poproxy/tls" and "ro" in v.split(":")[2].split(",")
            for v in volumes
        ), command
        timeout = int(words[words.index("--stop-timeout") + 1])
        assert timeout > Limits().shutdown_grace + ABORT_WAIT
