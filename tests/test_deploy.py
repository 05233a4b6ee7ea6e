"""deploy/: manifests parse, reference files that exist, agree with the job's CLI, hold no secrets and never
expose the Ray dashboard outside the cluster."""

import re
import shlex
from pathlib import Path

import yaml

from mapray.cli import build_parser
from mapray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def manifests() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in (DEPLOY / "kuberay").glob("*.yaml")}


def test_manifests_parse_and_have_the_expected_kinds():
    kinds = {doc["kind"] for docs in manifests().values() for doc in docs}
    assert kinds == {"RayCluster", "RayJob", "ConfigMap", "CronJob"}


def test_configs_are_valid_mapray_configs():
    configmap = manifests()["configmap.yaml"][0]
    run = yaml.safe_load(configmap["data"]["run.yaml"])
    cfg = load_config(None, base=run)
    assert cfg.policy.engine == "vllm" and cfg.metric.implicit == "dpo" and cfg.cache is not None
    assert load_config(str(DEPLOY / "cluster.yaml")).policy.device == "cuda"


def test_rayjob_entrypoint_matches_the_cli_and_the_mounted_config():
    job = manifests()["rayjob.yaml"][0]
    argv = shlex.split(job["spec"]["entrypoint"])
    script = Path(argv[1])
    assert argv[0] == "python" and script.parent == Path("/app/jobs") and (ROOT / "jobs" / script.name).exists()
    args = build_parser().parse_args([script.stem, *argv[2:]])  # what jobs/<verb>.py hands to the CLI
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = head["containers"][0]["volumeMounts"][0]
    assert Path(args.config).parent == Path(mount["mountPath"])
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    configmap = manifests()["configmap.yaml"][0]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert Path(args.config).name in configmap["data"]


def test_cronjob_creates_the_rayjob_and_never_overlaps():
    cron = manifests()["rescore-cronjob.yaml"][0]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["kubectl", "create", "-f"] and command[3].endswith("rayjob.yaml")


def test_dockerfile_copies_files_that_exist():
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src


def test_dashboard_not_exposed_and_no_secrets():
    text = "\n".join(p.read_text() for p in DEPLOY.rglob("*") if p.is_file())
    for docs in manifests().values():
        for doc in docs:
            assert doc["kind"] != "Ingress"
    assert not re.search(r"serviceType:\s*(LoadBalancer|NodePort)", text)
    assert re.findall(r"serviceType:\s*(\w+)", text) == ["ClusterIP"] * 2
    secret = re.compile(r"(secret|password|passwd|token|aws_access_key_id|private_key)\s*[:=]\s*\S+", re.I)
    assert not secret.search(text)
