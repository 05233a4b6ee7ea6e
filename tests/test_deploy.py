"""deploy/: manifests parse, reference files that exist, agree with the job's CLI and the README, match KubeRay's
CRD schemas (tests/data/kuberay/), ship every ConfigMap, claim and role they use, hold no secrets and never
expose the Ray dashboard outside the cluster; the nightly scheduler never starts a run beside a running one."""

import functools
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
import yaml

from mapray.cli import build_parser
from mapray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
SCHEMAS = Path(__file__).resolve().parent / "data" / "kuberay"
KUBERAY_VERSIONS = ("v1.2.0", "v1.7.0")  # the oldest KubeRay the manifests support, and the newest release
CRD_FILES = {"RayJob": "rayjobs.json", "RayCluster": "rayclusters.json"}


@functools.cache
def manifests() -> dict[str, list[dict]]:
    """Parsed once; tests that change a manifest change a copy."""
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in KUBERAY.glob("*.yaml")}


def docs(kind: str) -> list[dict]:
    return [d for ds in manifests().values() for d in ds if d["kind"] == kind]


def one(kind: str) -> dict:
    (doc,) = docs(kind)
    return doc


def ray_pod_specs(doc: dict) -> list[dict]:
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def pod_specs() -> list[dict]:
    cron = [c["spec"]["jobTemplate"]["spec"]["template"]["spec"] for c in docs("CronJob")]
    return cron + [s for kind in CRD_FILES for d in docs(kind) for s in ray_pod_specs(d)]


def test_manifests_parse_and_have_the_expected_kinds():
    versions = {doc["kind"]: doc["apiVersion"] for docs_ in manifests().values() for doc in docs_}
    assert versions == {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "ConfigMap": "v1", "CronJob": "batch/v1",
                        "ServiceAccount": "v1", "Role": "rbac.authorization.k8s.io/v1",
                        "RoleBinding": "rbac.authorization.k8s.io/v1", "PersistentVolumeClaim": "v1",
                        "Kustomization": "kustomize.config.k8s.io/v1beta1"}


def test_configs_are_valid_mapray_configs():
    run = yaml.safe_load(one("ConfigMap")["data"]["run.yaml"])
    cfg = load_config(None, base=run)
    assert cfg.policy.engine == "vllm" and cfg.metric.implicit == "dpo" and cfg.cache is not None
    assert load_config(str(DEPLOY / "cluster.yaml")).policy.device == "cuda"
    selfplay = load_config(str(DEPLOY / "selfplay.yaml"))
    assert selfplay.generation.model.engine == "vllm" and selfplay.generation.model.path == selfplay.policy.path


def test_rayjob_entrypoint_matches_the_cli_and_the_mounted_config():
    job = one("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    script = Path(argv[1])
    assert argv[0] == "python" and script.parent == Path("/app/jobs") and (ROOT / "jobs" / script.name).exists()
    args = build_parser().parse_args([script.stem, *argv[2:]])  # what jobs/<verb>.py hands to the CLI
    assert args.verb == "rescore"  # the nightly run reuses the cache for every model that did not change
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if Path(args.config).parent == Path(m["mountPath"]))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    configmap = one("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert Path(args.config).name in configmap["data"]


# --- the ray.io objects against KubeRay's own CRD schemas ---

def strict(schema: dict) -> dict:
    """The schema with unknown fields refused: the API server drops them silently, so a misspelt field (a
    deadline, a volume) would vanish without an error."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    if "items" in out:
        out["items"] = strict(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    return out


def crd_validator(version: str, kind: str) -> jsonschema.Draft4Validator:
    vendored = json.loads((SCHEMAS / version / CRD_FILES[kind]).read_text())
    assert vendored["kuberay"] == version
    return jsonschema.Draft4Validator(strict(vendored["openAPIV3Schema"]))


def schema_errors(version: str, doc: dict) -> list[str]:
    errors = crd_validator(version, doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@pytest.mark.parametrize("version", KUBERAY_VERSIONS)
def test_ray_objects_match_the_kuberay_crd_schemas(version):
    ray_docs = [d for ds in manifests().values() for d in ds if d["apiVersion"].startswith("ray.io/")]
    assert sorted(d["kind"] for d in ray_docs) == ["RayCluster", "RayJob"]
    for doc in ray_docs:
        assert doc["apiVersion"] == "ray.io/v1"
        assert schema_errors(version, doc) == [], doc["kind"]


def test_the_schema_check_catches_misspelt_fields_and_wrong_types():
    job = one("RayJob")
    misspelt = json.loads(json.dumps(job))
    misspelt["spec"]["activeDeadlineSecond"] = misspelt["spec"].pop("activeDeadlineSeconds")
    assert any("activeDeadlineSecond" in e for e in schema_errors("v1.7.0", misspelt))
    wrong = json.loads(json.dumps(job))
    wrong["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "4"
    wrong["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"] = {
        "claim": "mapray-model-cache"}
    errors = schema_errors("v1.7.0", wrong)
    assert any("replicas" in e and "integer" in e for e in errors)
    assert any("claimName" in e for e in errors) and any("claim" in e and "unexpected" in e.lower() for e in errors)


def test_ray_objects_pass_kuberay_validation_rules():
    """Rules the operator checks beyond the schema (ray-operator/controllers/ray/utils/validation.go)."""
    job = one("RayJob")
    name = job["metadata"]["name"]
    assert "generateName" not in job["metadata"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)  # MaxRayJobNameLength, DNS-1035
    spec = job["spec"]
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
    assert spec["ttlSecondsAfterFinished"] >= 0 and spec["shutdownAfterJobFinishes"] is True
    for doc in [job, one("RayCluster")]:
        cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        for group in cluster["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(s["containers"] for s in ray_pod_specs(doc))


# --- what the manifests use is shipped ---

def kustomization() -> dict:
    return one("Kustomization")


def test_every_configmap_claim_and_account_used_is_shipped():
    generated = {g["name"]: g["files"] for g in kustomization()["configMapGenerator"]}
    assert all((KUBERAY / f).is_file() for files in generated.values() for f in files)
    volumes = [v for spec in pod_specs() for v in spec.get("volumes", [])]
    used_maps = {v["configMap"]["name"] for v in volumes if "configMap" in v}
    used_claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
    used_accounts = {spec["serviceAccountName"] for spec in pod_specs() if "serviceAccountName" in spec}
    assert used_maps == {d["metadata"]["name"] for d in docs("ConfigMap")} | set(generated)
    assert used_claims == {d["metadata"]["name"] for d in docs("PersistentVolumeClaim")}
    assert used_accounts == {d["metadata"]["name"] for d in docs("ServiceAccount")}


def test_kustomization_installs_the_schedule_but_starts_no_run():
    resources = kustomization()["resources"]
    assert all((KUBERAY / r).is_file() for r in resources)
    installed = {d["kind"] for r in resources for d in manifests()[r]}
    assert installed == {"ConfigMap", "PersistentVolumeClaim", "ServiceAccount", "Role", "RoleBinding", "CronJob"}
    assert "rayjob.yaml" not in resources and "raycluster.yaml" not in resources


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for its built-in kustomize) not installed")
def test_kustomize_builds_the_scheduler_configmap_from_the_rayjob_file():
    built = list(yaml.safe_load_all(subprocess.run(["kubectl", "kustomize", str(KUBERAY)], check=True,
                                                   capture_output=True, text=True).stdout))
    configmaps = {d["metadata"]["name"]: d for d in built if d["kind"] == "ConfigMap"}
    scheduler = configmaps["mapray-rescore-scheduler"]
    assert scheduler["data"]["rayjob.yaml"] == (KUBERAY / "rayjob.yaml").read_text()
    assert {d["kind"] for d in built} == {"ConfigMap", "PersistentVolumeClaim", "ServiceAccount", "Role",
                                          "RoleBinding", "CronJob"}


def test_every_ray_pod_keeps_its_model_cache_on_the_claim():
    for kind in CRD_FILES:
        for spec in (s for d in docs(kind) for s in ray_pod_specs(d)):
            claims = {v["name"] for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName")
                      == "mapray-model-cache"}
            for container in spec["containers"]:
                cache = next(e["value"] for e in container["env"] if e["name"] == "MAPRAY_CACHE")
                assert any(m["mountPath"] == cache and m["name"] in claims for m in container["volumeMounts"])
    pvc = one("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # the pods of a run are on several nodes at once
    assert re.fullmatch(r"\d+[GT]i", pvc["spec"]["resources"]["requests"]["storage"])


# --- the schedule: deadlines, the scheduler pod and its rights ---

def test_schedule_has_deadlines_and_runs_the_scheduler_on_the_rayjob_file():
    cron = one("CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    minute, hour, *daily = spec["schedule"].split()
    assert daily == ["*", "*", "*"] and 0 <= int(hour) < 24 and 0 <= int(minute) < 60
    assert spec["concurrencyPolicy"] == "Forbid" and 0 < spec["startingDeadlineSeconds"] <= 3600
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert job["activeDeadlineSeconds"] > 600 and pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    mount = container["volumeMounts"][0]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    generated = {g["name"]: g["files"] for g in kustomization()["configMapGenerator"]}
    files = generated[volume["configMap"]["name"]]
    python, script, manifest = container["command"]
    assert python == "python" and Path(script).parent == Path(manifest).parent == Path(mount["mountPath"])
    assert Path(script).name == "start_rescore.py" and Path(manifest).name == "rayjob.yaml"
    assert {Path(script).name, Path(manifest).name} <= set(files)
    rayjob = one("RayJob")["spec"]  # every attempt of a run ends before the next night's run is due
    assert rayjob["activeDeadlineSeconds"] * (rayjob["backoffLimit"] + 1) < 24 * 3600


def test_scheduler_role_is_least_privilege_and_bound_to_the_cronjob_pod():
    role, binding = one("Role"), one("RoleBinding")
    name = one("RayJob")["metadata"]["name"]
    granted = sorted((tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r.get("resourceNames", ())),
                      tuple(sorted(r["verbs"]))) for r in role["rules"])
    assert granted == [(("ray.io",), ("rayjobs",), (), ("create",)),
                       (("ray.io",), ("rayjobs",), (name,), ("delete", "get"))]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    pod = one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"]}]


# --- start_rescore.py against a Kubernetes API that enforces rbac.yaml ---

def load_scheduler():
    spec = importlib.util.spec_from_file_location("start_rescore", KUBERAY / "start_rescore.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeApi(ThreadingHTTPServer):
    """RayJobs of one namespace, each request authorized against the Role in rbac.yaml; a deleted RayJob
    lingers for a few reads, as one does while foreground deletion removes its cluster."""

    PREFIX = "/apis/ray.io/v1/namespaces/ns/rayjobs"

    def __init__(self, rayjobs: dict):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.rayjobs, self.calls, self.lingering = rayjobs, [], {}
        self.rules = one("Role")["rules"]

    def allowed(self, verb: str, name: str) -> bool:
        return any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and verb in r["verbs"]
                   and ("resourceNames" not in r or (verb != "create" and name in r["resourceNames"]))
                   for r in self.rules)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, verb: str) -> None:
        api: FakeApi = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or "null")
        name = body["metadata"]["name"] if verb == "create" else self.path.removeprefix(api.PREFIX + "/")
        api.calls.append((verb, name, body))
        if self.headers["Authorization"] != "Bearer sa-credential" or not api.allowed(verb, name):
            return self._answer(403, {"reason": "Forbidden"})
        if verb == "create":
            if name in api.rayjobs:
                return self._answer(409, {"reason": "AlreadyExists"})
            api.rayjobs[name] = body
            return self._answer(201, body)
        if name not in api.rayjobs:
            return self._answer(404, {"reason": "NotFound"})
        if verb == "delete":
            api.lingering[name] = 3
            return self._answer(200, api.rayjobs[name])
        if api.lingering.get(name) == 0:
            del api.rayjobs[name], api.lingering[name]
            return self._answer(404, {"reason": "NotFound"})
        if name in api.lingering:
            api.lingering[name] -= 1
        return self._answer(200, api.rayjobs[name])

    def do_GET(self):
        self._handle("get")

    def do_POST(self):
        self._handle("create")

    def do_DELETE(self):
        self._handle("delete")


def run_scheduler(existing: dict) -> tuple[str, list, dict]:
    scheduler = load_scheduler()
    manifest = one("RayJob")
    server = FakeApi(dict(existing))
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        api = scheduler.Api(f"http://127.0.0.1:{server.server_port}", "ns", "sa-credential")
        said = scheduler.start(api, manifest, wait_s=5, poll_s=0.01)
    finally:
        server.shutdown()
    return said, [(verb, name) for verb, name, _ in server.calls], server


def rayjob_in(state: str | None) -> dict:
    name = one("RayJob")["metadata"]["name"]
    return {name: {"metadata": {"name": name}, "status": {"jobDeploymentStatus": state} if state else {}}}


def test_scheduler_creates_the_rayjob_when_there_is_none():
    said, calls, server = run_scheduler({})
    name = one("RayJob")["metadata"]["name"]
    assert calls == [("get", name), ("create", name)] and "created" in said
    assert server.rayjobs[name] == one("RayJob")  # the manifest as it is in rayjob.yaml


@pytest.mark.parametrize("state", [None, "Initializing", "Running", "Retrying", "Suspended"])
def test_scheduler_starts_nothing_while_the_last_run_is_not_finished(state):
    said, calls, server = run_scheduler(rayjob_in(state))
    name = one("RayJob")["metadata"]["name"]
    assert calls == [("get", name)] and "nothing started" in said
    assert server.rayjobs == rayjob_in(state)


@pytest.mark.parametrize("state", ["Complete", "Failed"])
def test_scheduler_replaces_a_finished_run_once_it_and_its_cluster_are_gone(state):
    said, calls, server = run_scheduler(rayjob_in(state))
    name = one("RayJob")["metadata"]["name"]
    assert calls[:2] == [("get", name), ("delete", name)] and calls[-1] == ("create", name)
    assert calls[2:-1] == [("get", name)] * 4  # polled until the lingering RayJob was gone, then created
    delete_body = next(body for verb, _, body in server.calls if verb == "delete")
    assert delete_body == {"propagationPolicy": "Foreground"}
    assert server.rayjobs[name] == one("RayJob") and state in said


def test_scheduler_fails_on_an_api_error_and_creates_nothing():
    scheduler = load_scheduler()
    api = scheduler.Api("http://127.0.0.1:9", "ns", "wrong")  # nothing listens on port 9
    with pytest.raises(scheduler.ApiError, match="GET"):
        scheduler.start(api, one("RayJob"), wait_s=1, poll_s=0.01)


# --- the rest of deploy/ ---

def test_readme_describes_the_manifests_as_they_are():
    paragraphs = [p for p in (ROOT / "README.md").read_text().split("\n\n") if "deploy/kuberay" in p]
    assert paragraphs
    text = "\n".join(paragraphs)
    script = Path(shlex.split(one("RayJob")["spec"]["entrypoint"])[1]).name
    assert set(re.findall(r"jobs/\w+\.py", text)) == {f"jobs/{script}"}
    for name in set(re.findall(r"\b[\w-]+\.(?:yaml|py)\b", text)) - {script}:
        assert (KUBERAY / name).exists() or (DEPLOY / name).exists(), name


def test_dockerfile_copies_files_that_exist():
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src


def test_dashboard_not_exposed_and_no_secrets():
    text = "\n".join(p.read_text() for p in DEPLOY.rglob("*") if p.is_file())
    for docs_ in manifests().values():
        for doc in docs_:
            assert doc["kind"] != "Ingress"
    assert not re.search(r"serviceType:\s*(LoadBalancer|NodePort)", text)
    assert re.findall(r"serviceType:\s*(\w+)", text) == ["ClusterIP"] * 2
    secret = re.compile(r"(secret|password|passwd|token|aws_access_key_id|private_key)\s*[:=]\s*\S+", re.I)
    assert not secret.search(text)
