"""The Helm chart in helm/meshwork, proved without a cluster.

Every case (the chart's default values, and each helm/meshwork/ci/*-values.yaml) is linted and
rendered by the real Helm library (helm-python-sdk, Helm v4's Go SDK), and every rendered object
is validated strictly (unknown fields are errors) against the Kubernetes 1.31 to 1.34 schemas of
kubernetes-validate. Only the kinds of CRDs that kubernetes-validate has no schema for are skipped
(cert-manager's Certificate, the Prometheus Operator's ServiceMonitor; see CRD_KINDS); they are
checked by the assertions below instead. Then the rendered manifests are checked for what the chart
promises: hardened containers with probes and resources, configuration files with exactly the keys
the services accept, NetworkPolicies that admit exactly the call graph, and a values schema that
rejects bad values with a message naming the key.

Run: .tools/chart-venv/bin/python -m pytest tests/chart
"""

from __future__ import annotations

import functools
import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "meshwork"
RELEASE = "meshwork"
NAMESPACE = "shop"

SERVICES = ("users", "auth", "billing", "orders")
GRPC_SERVICES = {
    "users": "meshwork.users.v1.UserService",
    "auth": "meshwork.auth.v1.AuthService",
    "billing": "meshwork.billing.v1.BillingService",
    "orders": "meshwork.orders.v1.OrderService",
}
# caller -> callee: the only service-to-service traffic there may be: the business calls, and
# users, billing and orders fetching auth's public keys (GetJwks) to verify access tokens.
CALL_GRAPH = {
    ("auth", "users"),
    ("orders", "users"),
    ("orders", "billing"),
    ("users", "auth"),
    ("billing", "auth"),
    ("orders", "auth"),
}

KUBE_VERSIONS = ("1.31.0", "1.32.0", "1.33.0", "1.34.0")
# Custom resources: kubernetes-validate ships only the built-in kinds' schemas.
CRD_KINDS = {
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}

CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
CASES: dict[str, dict[str, Any] | None] = {"default": None}
CASES.update({p.name.removesuffix("-values.yaml"): yaml.safe_load(p.read_text()) for p in CI_VALUES})

# What the services accept in config.toml (unknown keys stop them at start).
TLS_KEYS = {"cert_file", "key_file", "ca_file", "trust_domain"}
ALLOWED_MESHWORK_ENV = {"MESHWORK_CONFIG", "MESHWORK_LOG_FORMAT", "MESHWORK_DATABASE__URL"}
HARDENED_POD = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


# ---- rendering -------------------------------------------------------------------------------


@dataclass
class Rendered:
    values: dict[str, Any]  # the merged values the templates saw
    objects: list[dict[str, Any]]  # every object, hooks included
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        matches = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
        return matches[0]

    def pod_specs(self) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        """(name, pod metadata, pod spec) of every Deployment's template and every bare Pod."""
        specs = [
            (d["metadata"]["name"], d["spec"]["template"]["metadata"], d["spec"]["template"]["spec"])
            for d in self.of_kind("Deployment")
        ]
        specs += [(p["metadata"]["name"], p["metadata"], p["spec"]) for p in self.of_kind("Pod")]
        return specs


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(values: dict[str, Any] | None, *, name: str = RELEASE) -> Rendered:
    manifests = chart().render(values, name=name, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects += [o for o in yaml.safe_load_all(text) if o]
    return Rendered(chart().merge_values(values), objects, notes)


@functools.cache
def rendered(case: str) -> Rendered:
    return render(CASES[case])


def rejection(values: dict[str, Any]) -> str:
    """The message Helm refuses these values with (schema or template check)."""
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    return str(caught.value)


case_names = pytest.mark.parametrize("case", list(CASES))


def test_ci_values_files_are_shipped() -> None:
    shipped = {p.name for p in CI_VALUES}
    wanted = {f"{c}-values.yaml" for c in ("certmanager", "secrets", "postgres", "hpa")}
    assert wanted <= shipped, f"missing: {sorted(wanted - shipped)}"


# ---- lint, render, strict schema validation --------------------------------------------------


@case_names
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_chart_lints_clean(case: str, kube: str) -> None:
    report = helm.lint(CHART, CASES[case], strict=True, namespace=NAMESPACE, kube_version=f"v{kube}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not problems and not report["errors"], report


@case_names
def test_renders_the_whole_mesh(case: str) -> None:
    r = rendered(case)
    v = r.values
    counts = {kind: len(r.of_kind(kind)) for kind in {o["kind"] for o in r.objects}}
    expected = {
        "ServiceAccount": 4,
        "ConfigMap": 4,
        "Deployment": 4,
        "Service": 8,  # a headless and a ClusterIP Service each
        "PodDisruptionBudget": 4,
        "NetworkPolicy": 5,  # one per service and one for the `helm test` pod
        "Pod": 1,  # the `helm test` hook
    }
    autoscaled = sum(v["services"][s]["autoscaling"]["enabled"] for s in SERVICES)
    if autoscaled:
        expected["HorizontalPodAutoscaler"] = autoscaled
    if v["tls"]["mode"] == "certManager":
        expected["Certificate"] = 5  # the four services and the operator
    if v["telemetry"]["serviceMonitor"]["enabled"]:
        expected["ServiceMonitor"] = 4
    if v["database"]["mode"] == "sqlite" and v["database"]["sqlite"]["persistence"]["enabled"]:
        expected["PersistentVolumeClaim"] = 4
    assert counts == expected
    for obj in r.objects:
        assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]
    for svc in SERVICES:
        headless = r.named("Service", f"{RELEASE}-{svc}-headless")["spec"]
        assert headless["clusterIP"] == "None" and not headless["publishNotReadyAddresses"]
        r.named("Service", f"{RELEASE}-{svc}")
        assert r.named("ServiceAccount", svc)["automountServiceAccountToken"] is False


@case_names
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_every_object_validates_strictly(case: str, kube: str) -> None:
    failures, skipped = [], []
    for obj in rendered(case).objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            skipped.append(where)
            continue
        try:
            kubernetes_validate.validate(obj, kube, strict=True)
        except kubernetes_validate.ValidationError as e:
            failures.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        # SchemaNotFoundError is not caught: a kind without a schema fails the test.
    assert not failures, "\n".join(failures)
    assert all(k.split("/")[0] in {kind for _, kind in CRD_KINDS} for k in skipped)


def test_kubernetes_validate_ships_the_target_versions() -> None:
    shipped = kubernetes_validate.utils.all_versions()
    for version in KUBE_VERSIONS:
        assert version in shipped


# ---- the pods --------------------------------------------------------------------------------


def check_container(where: str, c: dict[str, Any], pod_sc: dict[str, Any]) -> None:
    sc = c.get("securityContext", {})
    assert sc.get("readOnlyRootFilesystem") is True, where
    assert sc.get("allowPrivilegeEscalation") is False, where
    assert sc.get("privileged", False) is False, where
    assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
    assert not sc.get("capabilities", {}).get("add"), where
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
    assert sc.get("runAsUser", pod_sc.get("runAsUser")) not in (None, 0), where
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile"))
    assert seccomp == {"type": "RuntimeDefault"}, where
    res = c.get("resources", {})
    assert {"cpu", "memory"} <= set(res.get("requests", {})), f"{where}: requests"
    assert "memory" in res.get("limits", {}), f"{where}: memory limit"


@case_names
def test_every_container_is_hardened_with_resources(case: str) -> None:
    for name, _, spec in rendered(case).pod_specs():
        sc = spec["securityContext"]
        for key, want in HARDENED_POD.items():
            assert sc.get(key) == want, f"{name}: pod securityContext.{key}"
        assert spec["automountServiceAccountToken"] is False, name
        # Service links would put MESHWORK_*_SERVICE_HOST into the environment: config keys.
        assert spec["enableServiceLinks"] is False, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for c in spec["containers"] + spec.get("initContainers", []):
            check_container(f"{name}/{c['name']}", c, sc)


@case_names
def test_services_probe_grpc_health_on_the_admin_port(case: str) -> None:
    r = rendered(case)
    admin, mesh = r.values["ports"]["admin"], r.values["ports"]["mesh"]
    for d in r.of_kind("Deployment"):
        spec = d["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": admin, "service": ""}, f"{d['metadata']['name']} {probe}"
        assert admin != mesh
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": mesh, "admin": admin}
        # SIGTERM: NOT_SERVING, then up to 10 s of draining after the preStop pause.
        pause = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert spec["terminationGracePeriodSeconds"] > pause + 10


@case_names
def test_deployments_spread_and_are_disruption_budgeted(case: str) -> None:
    r = rendered(case)
    for svc in SERVICES:
        d = r.named("Deployment", f"{RELEASE}-{svc}")
        selector = d["spec"]["selector"]["matchLabels"]
        spread = d["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert "kubernetes.io/hostname" in {t["topologyKey"] for t in spread}
        assert all(t["labelSelector"]["matchLabels"] == selector for t in spread)
        pdb = r.named("PodDisruptionBudget", f"{RELEASE}-{svc}")
        assert pdb["spec"]["selector"]["matchLabels"] == selector
        autoscaling = r.values["services"][svc]["autoscaling"]
        if autoscaling["enabled"]:
            hpa = r.named("HorizontalPodAutoscaler", f"{RELEASE}-{svc}")["spec"]
            assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": d["metadata"]["name"]}
            assert "replicas" not in d["spec"], "the HPA owns the replica count"
        else:
            assert d["spec"]["replicas"] == r.values["services"][svc]["replicas"]


@case_names
def test_configuration_matches_the_runtime_contract(case: str) -> None:
    r = rendered(case)
    v = r.values
    sqlite = v["database"]["mode"] == "sqlite"
    for svc in SERVICES:
        config = tomllib.loads(r.named("ConfigMap", f"{RELEASE}-{svc}-config")["data"]["config.toml"])
        callees = sorted(callee for caller, callee in CALL_GRAPH if caller == svc)
        sections = {"server", "admin", "tls", *callees} | ({"database"} if sqlite else set())
        assert set(config) == sections, svc
        assert config["server"] == {"listen_addr": f"0.0.0.0:{v['ports']['mesh']}"}
        assert config["admin"] == {"listen_addr": f"0.0.0.0:{v['ports']['admin']}"}
        assert config["tls"] == {
            "cert_file": "/var/run/meshwork/tls/tls.crt",
            "key_file": "/var/run/meshwork/tls/tls.key",
            "ca_file": "/var/run/meshwork/tls/ca.crt",
            "trust_domain": v["trustDomain"],
        }
        if sqlite:
            assert config["database"] == {"url": f"sqlite:///var/lib/meshwork/{svc}.db"}
        for callee in callees:
            host = f"{RELEASE}-{callee}-headless.{NAMESPACE}.svc.cluster.local"
            assert config[callee] == {"endpoints": [f"dns://{host}:{v['ports']['mesh']}"]}
            r.named("Service", f"{RELEASE}-{callee}-headless")

        d = r.named("Deployment", f"{RELEASE}-{svc}")
        pod = d["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["command"] == [f"/usr/local/bin/{svc}"]
        assert pod["serviceAccountName"] == svc
        env = {e["name"]: e for e in c["env"]}
        assert {n for n in env if n.startswith("MESHWORK_")} <= ALLOWED_MESHWORK_ENV
        assert env["MESHWORK_CONFIG"]["value"] == "/etc/meshwork/config.toml"
        assert env["OTEL_SERVICE_NAME"]["value"] == svc
        assert env["OTEL_TRACES_SAMPLER"]["value"] == "parentbased_traceidratio"
        assert float(env["OTEL_TRACES_SAMPLER_ARG"]["value"]) == v["telemetry"]["samplingRatio"]
        if v["telemetry"]["otlpEndpoint"]:
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == v["telemetry"]["otlpEndpoint"]
        else:
            assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
        if sqlite:
            assert "MESHWORK_DATABASE__URL" not in env
        else:  # the URL only from a Secret, never in plain text
            url = env["MESHWORK_DATABASE__URL"]
            assert "value" not in url
            ref = v["database"]["postgres"][svc]
            assert url["valueFrom"]["secretKeyRef"] == {"name": ref["secretName"], "key": ref["key"]}

        mounts = {m["name"]: m for m in c["volumeMounts"]}
        volumes = {vol["name"]: vol for vol in pod["volumes"]}
        assert mounts["config"]["mountPath"] == "/etc/meshwork"
        assert volumes["config"]["configMap"]["name"] == f"{RELEASE}-{svc}-config"
        # The certificate Secret as a directory: no subPath, so renewals reach the files.
        assert mounts["tls"]["mountPath"] == "/var/run/meshwork/tls" and "subPath" not in mounts["tls"]
        assert all("subPath" not in m for m in c["volumeMounts"])
        secret = volumes["tls"]["secret"]["secretName"]
        if v["tls"]["mode"] == "secrets":
            assert secret == (v["tls"]["secrets"][svc] or f"{RELEASE}-{svc}-tls")
        else:
            assert secret == r.named("Certificate", f"{RELEASE}-{svc}")["spec"]["secretName"]
        if sqlite:
            assert mounts["data"]["mountPath"] == "/var/lib/meshwork"
            persistent = v["database"]["sqlite"]["persistence"]["enabled"]
            assert ("persistentVolumeClaim" in volumes["data"]) == persistent
            assert ("emptyDir" in volumes["data"]) == (not persistent)
        else:
            assert "data" not in mounts


@case_names
def test_certificates_carry_the_spiffe_identities(case: str) -> None:
    r = rendered(case)
    v = r.values
    certs = {c["metadata"]["name"]: c["spec"] for c in r.of_kind("Certificate")}
    if v["tls"]["mode"] != "certManager":
        assert not certs
        return
    issuer = v["tls"]["certManager"]["issuerRef"]
    for identity in (*SERVICES, "operator"):
        spec = certs[f"{RELEASE}-{identity}"]
        assert spec["uris"] == [f"spiffe://{v['trustDomain']}/ns/{NAMESPACE}/sa/{identity}"]
        assert spec["issuerRef"] == issuer
        assert spec["secretName"] == f"{RELEASE}-{identity}-tls"
        assert "client auth" in spec["usages"]
        assert ("server auth" in spec["usages"]) == (identity != "operator")
        assert spec["privateKey"]["rotationPolicy"] == "Always"
    for svc in SERVICES:
        assert f"{RELEASE}-{svc}.{NAMESPACE}.svc" in certs[f"{RELEASE}-{svc}"]["dnsNames"]


@case_names
def test_service_monitors_scrape_the_admin_port(case: str) -> None:
    r = rendered(case)
    for sm in r.of_kind("ServiceMonitor"):
        (endpoint,) = sm["spec"]["endpoints"]
        assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"
        matching = [
            s for s in r.of_kind("Service")
            if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert len(matching) == 1 and "admin" in {p["name"] for p in matching[0]["spec"]["ports"]}


@case_names
def test_helm_test_hook_checks_every_service(case: str) -> None:
    r = rendered(case)
    (pod,) = r.of_kind("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    image = r.values["tests"]["image"]
    addresses = set()
    for c in pod["spec"]["containers"]:
        assert c["image"] == f"{image['repository']}:{image['tag']}" and image["tag"] != "latest"
        addresses |= {a.removeprefix("-addr=") for a in c["command"] if a.startswith("-addr=")}
    admin = r.values["ports"]["admin"]
    assert addresses == {f"{RELEASE}-{s}.{NAMESPACE}.svc.cluster.local:{admin}" for s in SERVICES}


@case_names
def test_notes_show_grpcurl_for_every_service(case: str) -> None:
    notes = rendered(case).notes
    for svc, grpc_service in GRPC_SERVICES.items():
        assert f"port-forward svc/{RELEASE}-{svc} " in notes
        assert f"describe {grpc_service}" in notes
    assert notes.count("grpcurl -cacert ca.crt -cert operator.crt -key operator.key") >= 8
    assert f"spiffe://{rendered(case).values['trustDomain']}/ns/{NAMESPACE}/sa/operator" in notes
    assert "grpc.health.v1.Health/Check" in notes


def test_names_fit_with_the_longest_release_name() -> None:
    name = "r" * 53  # Helm's limit
    r = render(None, name=name)
    for obj in r.objects:
        limit = 63 if obj["kind"] in {"Service", "Pod", "Deployment"} else 253
        assert len(obj["metadata"]["name"]) <= limit, obj["metadata"]["name"]
    (auth_config,) = [c for c in r.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-auth-config")]
    auth = tomllib.loads(auth_config["data"]["config.toml"])
    host = auth["users"]["endpoints"][0].removeprefix("dns://").split(".")[0]
    assert host in {s["metadata"]["name"] for s in r.of_kind("Service")}


# ---- NetworkPolicies: exactly the call graph --------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A pod (namespace, labels) or an address outside the cluster (ip)."""

    name: str
    namespace: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    ip: str | None = None
    ours: bool = field(default=False, compare=False)

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace} if self.namespace else {}


def pod(name: str, namespace: str, labels: dict[str, str], ours: bool = False) -> Endpoint:
    return Endpoint(name, namespace, tuple(sorted(labels.items())), ours=ours)


# Traffic that may be tried: (protocol, port).
PORTS = [("TCP", 50051), ("TCP", 9090), ("UDP", 53), ("TCP", 53), ("TCP", 4317), ("TCP", 5432)]


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def peer_matches(peer: dict[str, Any], other: Endpoint, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        if other.ip is None:
            return False
        ip = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if other.namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return "podSelector" not in peer or selector_matches(peer["podSelector"], other.label_map)


def rule_matches(rule: dict[str, Any], peers_key: str, other: Endpoint, proto: str, port: int, ns: str) -> bool:
    peers = rule.get(peers_key) or []
    ports = rule.get("ports") or []
    peer_ok = not peers or any(peer_matches(p, other, ns) for p in peers)
    port_ok = not ports or any(
        p.get("protocol", "TCP") == proto and (p.get("port") is None or p["port"] <= port <= p.get("endPort", p["port"]))
        for p in ports
    )
    return peer_ok and port_ok


def direction_allows(policies, subject: Endpoint, other: Endpoint, direction: str, proto: str, port: int) -> bool:
    """Kubernetes semantics: a pod selected by no policy of this direction is not isolated;
    otherwise some rule of some selecting policy must allow the connection."""
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [
        p for p in policies
        if subject.namespace == p["metadata"]["namespace"]
        and direction in p["spec"]["policyTypes"]
        and selector_matches(p["spec"]["podSelector"], subject.label_map)
    ]
    if subject.namespace is None or not selecting:
        return True
    return any(
        rule_matches(rule, peers_key, other, proto, port, p["metadata"]["namespace"])
        for p in selecting
        for rule in p["spec"].get(rules_key) or []
    )


def allowed_edges(policies, endpoints: list[Endpoint]) -> set[tuple[str, str, str, int]]:
    edges = set()
    for src in endpoints:
        for dst in endpoints:
            if not (src.ours or dst.ours):
                continue
            for proto, port in PORTS:
                if direction_allows(policies, src, dst, "Egress", proto, port) and direction_allows(
                    policies, dst, src, "Ingress", proto, port
                ):
                    edges.add((src.name, dst.name, proto, port))
    return edges


@case_names
def test_network_policies_admit_exactly_the_call_graph(case: str) -> None:
    r = rendered(case)
    v = r.values
    policies = r.of_kind("NetworkPolicy")
    assert v["networkPolicy"]["enabled"]

    # No rule may be an "allow everything": every rule names its peers and its ports.
    for p in policies:
        for key, peers_key in (("ingress", "from"), ("egress", "to")):
            for rule in p["spec"].get(key) or []:
                assert rule.get(peers_key) and rule.get("ports"), f"{p['metadata']['name']}: {rule}"

    mine = [pod(pod_name(meta), NAMESPACE, meta["labels"], ours=True) for _, meta, _ in r.pod_specs()]
    users_labels = dict(next(e for e in mine if e.name == "users").labels)
    others = [
        pod("operator", NAMESPACE, {"meshwork.io/role": "operator"}),
        pod("stranger", NAMESPACE, {"app": "something-else"}),
        # Our labels in another namespace: a podSelector alone must not admit it.
        pod("impostor", "elsewhere", users_labels),
        pod("kube-dns", "kube-system", {"k8s-app": "kube-dns"}),
        pod("otel-collector", "observability", {"app.kubernetes.io/name": "otel-collector"}),
        pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}),
        pod("postgres-pod", "databases", {"app.kubernetes.io/name": "postgresql"}),
        Endpoint("postgres-external", ip="10.20.0.5"),
        Endpoint("internet", ip="203.0.113.7"),
    ]
    got = allowed_edges(policies, mine + others)

    mesh, admin = v["ports"]["mesh"], v["ports"]["admin"]
    expected = {(a, b, "TCP", mesh) for a, b in CALL_GRAPH}
    expected |= {("operator", s, "TCP", mesh) for s in SERVICES}
    expected |= {(s, "kube-dns", proto, 53) for s in (*SERVICES, "health-test") for proto in ("UDP", "TCP")}
    expected |= {("health-test", s, "TCP", admin) for s in SERVICES}
    if v["telemetry"]["otlpEndpoint"]:
        expected |= {(s, "otel-collector", "TCP", 4317) for s in SERVICES}
    if v["telemetry"]["serviceMonitor"]["enabled"]:
        expected |= {("prometheus", s, "TCP", admin) for s in SERVICES}
    if v["database"]["mode"] == "postgres":
        db = {"postgres": "postgres-external", "hpa": "postgres-pod"}[case]
        expected |= {(s, db, "TCP", 5432) for s in SERVICES}

    assert {e for e in got if e[0] in SERVICES and e[1] in SERVICES} == {
        (a, b, "TCP", mesh) for a, b in CALL_GRAPH
    }, "service-to-service traffic must be exactly the call graph"
    assert got == expected, f"unexpected: {sorted(got - expected)}; missing: {sorted(expected - got)}"


def pod_name(meta: dict[str, Any]) -> str:
    return meta["labels"]["app.kubernetes.io/component"]


def test_network_policies_can_be_turned_off() -> None:
    r = render({"networkPolicy": {"enabled": False}})
    assert not r.of_kind("NetworkPolicy")


# ---- the values schema and the cross-key checks ----------------------------------------------


BAD_VALUES = {
    "negative replicas": (
        {"services": {"users": {"replicas": -1}}},
        ["/services/users/replicas", "minimum: got -1, want 0"],
    ),
    "unknown service": (
        {"services": {"payments": {"replicas": 1}}},
        ["/services", "additional properties 'payments' not allowed"],
    ),
    "unknown key in a service": (
        {"services": {"users": {"replicaCount": 2}}},
        ["/services/users", "additional properties 'replicaCount' not allowed"],
    ),
    "sampling ratio above 1": (
        {"telemetry": {"samplingRatio": 1.5}},
        ["/telemetry/samplingRatio", "maximum: got 1.5, want 1"],
    ),
    "sampling ratio as text": (
        {"telemetry": {"samplingRatio": "10%"}},
        ["/telemetry/samplingRatio", "got string, want number"],
    ),
    "tls mode outside the enum": (
        {"tls": {"mode": "vault"}},
        ["/tls/mode", "'certManager'", "'secrets'"],
    ),
    "database mode outside the enum": (
        {"database": {"mode": "mysql"}},
        ["/database/mode", "'postgres'", "'sqlite'"],
    ),
    "root user": ({"runAsUser": 0}, ["/runAsUser", "minimum: got 0, want 1"]),
    "image tag as digest": ({"image": {"digest": "latest"}}, ["/image/digest", "does not match pattern"]),
    "empty network peer": (
        {"networkPolicy": {"operator": {"from": [{}]}}},
        ["/networkPolicy/operator/from/0", "minProperties"],
    ),
    "missing memory limit": (
        {"services": {"auth": {"resources": {"limits": {"memory": None}}}}},
        ["/services/auth/resources/limits", "missing property 'memory'"],
    ),
    "key size that does not fit the algorithm": (
        {"tls": {"certManager": {"privateKey": {"algorithm": "RSA", "size": 256}}}},
        ["/tls/certManager/privateKey/size", "value must be one of 2048, 4096, 8192"],
    ),
    "bad duration": (
        {"tls": {"certManager": {"duration": "90 days"}}},
        ["/tls/certManager/duration", "does not match pattern"],
    ),
    "bad OTLP endpoint": (
        {"telemetry": {"otlpEndpoint": "otel:4317"}},
        ["/telemetry/otlpEndpoint", "does not match pattern"],
    ),
    # Cross-key checks, made by the templates.
    "cert-manager without an issuer": (
        {"tls": {"mode": "certManager"}},
        ["tls.mode=certManager needs tls.certManager.issuerRef.name"],
    ),
    "postgres without a Secret": (
        {"database": {"mode": "postgres"}, "networkPolicy": {"postgres": {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}}},
        ["database.mode=postgres needs database.postgres.users.secretName"],
    ),
    "several replicas on SQLite": (
        {"services": {"orders": {"replicas": 2}}},
        ["services.orders: more than one replica", "needs database.mode=postgres"],
    ),
    "autoscaling on SQLite": (
        {"services": {"users": {"autoscaling": {"enabled": True}}}},
        ["services.users: more than one replica", "needs database.mode=postgres"],
    ),
    "postgres unreachable through the policies": (
        {"database": {"mode": "postgres", "postgres": {s: {"secretName": f"{s}-db"} for s in SERVICES}}},
        ["needs networkPolicy.postgres.to"],
    ),
    "collector unreachable through the policies": (
        {"telemetry": {"otlpEndpoint": "http://otel.observability.svc:4317"}},
        ["needs networkPolicy.otlpCollector.to"],
    ),
    "grace period shorter than the drain": (
        {"terminationGracePeriodSeconds": 12},
        ["terminationGracePeriodSeconds (12) must exceed preStopSleepSeconds (5) plus the services' 10 s drain"],
    ),
    "one port for mesh and admin": ({"ports": {"admin": 50051}}, ["ports.mesh and ports.admin must differ"]),
}


@pytest.mark.parametrize("label", list(BAD_VALUES))
def test_bad_values_are_rejected_with_a_clear_message(label: str) -> None:
    values, fragments = BAD_VALUES[label]
    message = rejection(values)
    for fragment in fragments:
        assert fragment in message, f"{label}: {fragment!r} not in {message!r}"


def test_lint_reports_a_bad_value_as_an_error() -> None:
    report = helm.lint(CHART, {"services": {"users": {"replicas": -1}}}, strict=True, namespace=NAMESPACE)
    assert any("/services/users/replicas" in e for e in report["errors"]), report
