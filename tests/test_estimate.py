"""`mapray estimate` on tiny models: the tokens it counts are the encoder's, its FLOPs the formula's, its time the
measured figure's; a kind without a figure says so. (Checked against a real run on this machine: the demo's
model pass, in benchmarks/README.md.)"""

import json

import pytest

from mapray.cli import main
from mapray.config import ColumnNames, load_config
from mapray.estimate import MEASURED, _shape, estimate, render
from mapray.formats import RejectRow, normalize_record
from mapray.stages import load_encoder
from tests.conftest import UF


def _config(tmp_path, tiny, n: int):
    lines = UF.read_text().splitlines()[:n]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    model = {"path": tiny["policy"], "max_length": 256, "dtype": "bfloat16"}
    return load_config(None, base={"input": {"uri": str(tmp_path / "in.jsonl"), "format": "conversational",
                                             "columns": {"id": "prompt_id"}},
                                   "output": str(tmp_path / "out"), "policy": model,
                                   "reference": {**model, "path": tiny["reference"], "prefix_sharing": False},
                                   "metric": {"implicit": "dpo"}}), lines


def test_tokens_flops_and_time_are_the_encoders_the_formulas_and_the_figures(tmp_path, tiny):
    cfg, lines = _config(tmp_path, tiny, 12)
    result = estimate(cfg, "cpu", devices=2, sample_rows=12)
    assert result["rows"] == 12 and result["rows_exact"] is False  # JSONL: from the files' sizes, all sampled
    encoder, local = load_encoder(cfg.policy)
    params, hidden, vocab = _shape(local)
    shared = unshared = responses = 0
    for line in lines:
        pair = normalize_record(json.loads(line), "conversational", ColumnNames(id="prompt_id"))
        try:
            (p1, r1), (p2, r2) = encoder.encode_pair(pair.prompt, pair.chosen, pair.rejected).sequences()
        except RejectRow:  # the stage sets it aside: no model work
            continue
        shared += max(len(p1), len(p2)) + len(r1) + len(r2)
        unshared += len(p1) + len(p2) + len(r1) + len(r2)
        responses += len(r1) + len(r2)
    assert result["models"]["policy"]["tokens"] == shared  # the torch engine shares each prompt
    assert result["models"]["reference"]["tokens"] == unshared  # prefix_sharing off: twice
    flops = 2 * params * (shared + unshared) + 2 * 2 * hidden * vocab * responses
    assert result["flops"] == pytest.approx(flops)
    figure = MEASURED[("cpu", "bfloat16")]
    assert result["wall_s"] == pytest.approx(flops / (2 * figure["peak_tflops"] * 1e12 * figure["fraction"]))
    assert result["device_hours"] == pytest.approx(result["wall_s"] * 2 / 3600)
    text = render(result)  # the figure it used, with its date and source, beside the estimate
    assert "on 2 x cpu" in text and "(model pass; loading and fixed costs not included)" in text
    assert (f"figure used   {figure['fraction']:.1%} of {figure['peak_tflops']:g} TFLOP/s on {figure['device']}, "
            f"measured {figure['date']}: {figure['what']}") in text.splitlines()[-1]


def test_a_kind_without_a_measured_figure_says_so(tmp_path, tiny, capsys):
    _, _ = _config(tmp_path, tiny, 4)
    (tmp_path / "run.yaml").write_text(json.dumps({
        "input": {"uri": str(tmp_path / "in.jsonl"), "format": "conversational", "columns": {"id": "prompt_id"}},
        "output": str(tmp_path / "out"), "policy": {"path": tiny["policy"], "max_length": 256}}))
    assert main(["estimate", "--config", str(tmp_path / "run.yaml"), "--kind", "h100"]) == 0
    out = capsys.readouterr().out
    assert "no measured figure for h100 in float32" in out and "FLOPs" in out and "device-hours" not in out
    assert main(["estimate", "--config", str(tmp_path / "run.yaml"), "--kind", "cpu", "--devices", "0"]) == 2
