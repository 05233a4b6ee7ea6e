import subprocess
import sys

import pytest

from mapray.config import ConfigError, load_config
from tests.conftest import UF


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mapray", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


GOOD = f"""
input: {{uri: {UF}}}
output: OUT
policy: {{path: POLICY}}
"""


@pytest.mark.parametrize("text,message", [
    ("input: {uri: x}\noutput: o\npolicy: {path: p, dtyp: float32}\n", "unknown config key policy.dtyp"),
    ("input: {uri: x}\noutput: o\npolicy: {path: p, dtype: fp8}\n", "policy.dtype: 'fp8' is not one of"),
    ("input: {uri: x}\noutput: o\npolicy: {path: p, actors: two}\n", "policy.actors: expected int, got str"),
    ("input: {uri: x}\noutput: o\npolicy: {path: p}\nmetric: {implicit: dpo}\n", "needs a reference model"),
    ("input: {uri: x}\noutput: o\npolicy: {path: p}\nselection: {ratio: 1.5}\n", "selection.ratio: must be in"),
    ("- a list\n", "must be a mapping of sections"),
    ("input: [unclosed\n", "is not valid YAML"),
])
def test_bad_config_fails_with_one_line_naming_the_key(tmp_path, text, message):
    result = run_cli("score", "--config", _write(tmp_path, text))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_missing_model_and_bad_input_fail_before_anything_loads(tmp_path, tiny):
    cfg = _write(tmp_path, GOOD.replace("OUT", str(tmp_path / "out")).replace("POLICY", str(tmp_path / "nope")))
    result = run_cli("score", "--config", cfg)
    assert result.returncode == 2
    assert result.stderr.strip() == f"mapray: error: policy.path: model path does not exist: {tmp_path / 'nope'}"
    assert "Started a local Ray" not in result.stdout + result.stderr
    cfg = _write(tmp_path, GOOD.replace("OUT", str(tmp_path / "out")).replace("POLICY", tiny["policy"]))
    result = run_cli("score", "--config", cfg, "--set", f"input.uri={tmp_path}/missing/*.jsonl")
    assert result.returncode == 2 and "input.uri: no input files at" in result.stderr
    result = run_cli("score", "--config", cfg, "--set", "reward.source=model", "--set",
                     f"reward.model.path={tiny['policy']}/config.json")
    assert result.returncode == 2 and "reward.model.path" in result.stderr and "no config.json" in result.stderr


def test_unwritable_output_fails_fast(tmp_path, tiny):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = _write(tmp_path, GOOD.replace("OUT", str(blocker / "out")).replace("POLICY", tiny["policy"]))
    result = run_cli("score", "--config", cfg)
    assert result.returncode == 2 and "output: cannot write to" in result.stderr


def test_overrides_are_typed():
    cfg = load_config(None, ["policy.dtype=bfloat16", "policy.actors=3", "selection.top_k=10"],
                      base={"input": {"uri": "x"}, "output": "o", "policy": {"path": "p"}})
    assert (cfg.policy.dtype, cfg.policy.actors, cfg.selection.top_k) == ("bfloat16", 3, 10)
    with pytest.raises(ConfigError, match="--set policy: expected key.sub=value|policy is not a section"):
        load_config(None, ["policy=3", "policy.dtype=x"], base={"input": {"uri": "x"}, "output": "o"})


def test_select_on_a_folder_without_manifest(tmp_path):
    result = run_cli("select", "--output", str(tmp_path))
    assert result.returncode == 2 and "no manifest.json under" in result.stderr


def test_rescore_needs_a_cache(tmp_path, tiny):
    cfg = _write(tmp_path, GOOD.replace("OUT", str(tmp_path / "out")).replace("POLICY", tiny["policy"]))
    result = run_cli("rescore", "--config", cfg)
    assert result.returncode == 2
    assert result.stderr.strip() == ("mapray: error: rescore needs a cache URI: "
                                     "set cache in the config (or --set cache=URI)")
