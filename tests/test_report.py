"""`mapray report` / `mapray show` on a hand-built output (no models): every number of report.json against a direct
numpy / pandas computation, the literature's metrics against hand-computed values, and the page in a real
headless browser."""

import hashlib
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mapray import columns as C
from mapray import histograms, metrics
from mapray.config import InputConfig, MetricConfig, ModelConfig, RunConfig, SelectionConfig, to_dict
from mapray.report import ReportSettings, report, stats
from mapray.report.variants import plan

ALPHA, RATIO, N = 0.5, 0.4, 300
METRICS = ["map_z", "map", "map_unreg", "explicit_margin", "implicit_margin_small", "random",
           "implicit_margin_large", "dpo_loss", "dpo_grad_weight", "rm_confidence", "rank_disagreement"]


# ---- the literature's metrics, by hand ----

def test_literature_metrics_against_hand_computed_values():
    cols = {"explicit_margin": np.array([1.0, -1.0, 2.0, 0.0]), "implicit_margin": np.array([0.0, 2.0, -3.0, 0.0])}
    score = lambda name: metrics.selection_score(name, cols)  # noqa: E731
    # -log sigma(m): log 2, log(1 + e^-2), log(1 + e^3), log 2
    assert score("dpo_loss") == pytest.approx([0.6931471805599453, 0.1269280110429725, 3.048587351573742,
                                               0.6931471805599453], abs=1e-15)
    # sigma(-m_im): 1/2, 1/(1 + e^2), 1/(1 + e^-3)
    assert score("dpo_grad_weight") == pytest.approx([0.5, 0.11920292202211755, 0.9525741268224334, 0.5], abs=1e-15)
    # sigma(m_ex): 1/(1 + e^-1), 1/(1 + e), 1/(1 + e^-2), 1/2
    assert score("rm_confidence") == pytest.approx([0.7310585786300049, 0.2689414213699951, 0.8807970779778823,
                                                    0.5], abs=1e-15)
    # signs of m_im (0, +, -, 0) against m_ex (+, -, +, 0)
    assert score("rank_disagreement").tolist() == [1.0, 1.0, 1.0, 0.0]
    assert score("implicit_margin_large").tolist() == [0.0, 2.0, -3.0, 0.0]
    assert score("implicit_margin_small").tolist() == [0.0, -2.0, -3.0, 0.0]
    far = {"explicit_margin": np.array([-800.0, 800.0]), "implicit_margin": np.array([-800.0, 800.0])}
    with np.errstate(over="raise", invalid="raise"):  # far out the loss is -m_im and the weights saturate
        assert metrics.selection_score("dpo_loss", far).tolist() == [800.0, 0.0]
        assert metrics.selection_score("dpo_grad_weight", far).tolist() == [1.0, 0.0]
        assert metrics.selection_score("rm_confidence", far).tolist() == [0.0, 1.0]


def test_every_metric_is_selectable_by_name():
    import typing

    from mapray.cli import build_parser
    from mapray.config import SelectionMetric, load_config

    assert list(typing.get_args(SelectionMetric)) == METRICS
    base = {"input": {"uri": "x"}, "output": "o", "policy": {"path": "p"}}
    for name in METRICS:
        assert load_config(None, [f"selection.metric={name}"], base=base).selection.metric == name
        assert build_parser().parse_args(["select", "--output", "o", "--metric", name]).metric == name


# ---- the report's arithmetic ----

def test_histogram_arithmetic_by_hand():
    assert histograms.rank_edges(np.array([3.0, 1.0, 3.0, 2.0]), 8).tolist() == [1.0, 2.0, 3.0]  # few: every value
    edges = np.array([1.0, 2.0, 3.0])
    assert histograms.bin_index(np.array([0.5, 1.0, 2.5, 3.0, 9.0]), edges).tolist() == [0, 1, 2, 3, 3]
    # bins from the top: [5, 0, 2, 3] -> the 4th best row lies in bin 2 (3 above it), the first of its 2 rows
    assert histograms.top_bin(np.array([5, 0, 2, 3]), 4) == histograms.TopBin(bin=2, keep=1, size=2)
    assert histograms.top_bin(np.array([5, 0, 2, 3]), 10) == histograms.TopBin(bin=0, keep=5, size=5)
    # unflipped 1, 2, 2 and flipped 0, 2 on edges [1, 2]: bins (-inf,1) [1,2) [2,inf)
    hist = stats.Hist.of(np.array([1.0, 2.0, 2.0, 0.0, 2.0]), np.array([False, False, False, True, True]),
                         np.array([1.0, 2.0]))
    auc, bound = stats.auc_flipped_below(hist)
    # pairs (u, f): 1>0, 2>0, 2>0 win; 1<2 loses; 2=2 twice ties: (3 + 0 + 1) / 6
    assert auc == pytest.approx(4 / 6) and bound == 0.0  # every bin holds a single value: exact
    coarse = stats.Hist.of(np.array([1.0, 2.0, 2.0, 0.0, 2.0]), np.array([False, False, False, True, True]),
                           np.array([5.0]))  # everything in one bin: every pair counts 1/2
    assert stats.auc_flipped_below(coarse) == (0.5, 0.5)
    gram = np.array([[4, 2, 0], [2, 3, 0], [0, 0, 0]])
    jac = stats.jaccard(gram)
    assert jac[0, 1] == pytest.approx(2 / 5) and jac[0, 2] == 0.0 and np.isnan(jac[2, 2])


def test_a_threshold_run_is_compared_at_its_size():
    variants = plan(SelectionConfig(metric="explicit_margin", threshold=0.5), 1.0, 17, (0.0, 2.0))
    assert {v.rule for v in variants if v.group in ("overlap", "noise")} == {("top_k", 17)}
    alpha = [v for v in variants if v.group == "alpha"]  # alpha does not reach explicit_margin: map_z is swept
    assert [(v.metric, v.alpha, v.rule) for v in alpha] == [("map_z", 0.0, ("threshold", 0.5)),
                                                            ("map_z", 2.0, ("threshold", 0.5))]
    assert all(v.flipped for v in variants if v.group == "noise")


# ---- a hand-built output and the report of it ----

def by_hand(m_ex: np.ndarray, m_im: np.ndarray, ids: list[str], alpha: float, seed: int = 0) -> dict:
    """Every metric's score, straight from the formulas (population std for map_z)."""
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    return {"map_z": z(m_ex) - alpha * z(np.abs(m_im)), "map": np.abs(m_ex) - alpha * np.abs(m_im),
            "map_unreg": m_ex - alpha * m_im, "explicit_margin": m_ex, "implicit_margin_small": -np.abs(m_im),
            "random": metrics.seeded_uniform(ids, seed), "implicit_margin_large": m_im,
            "dpo_loss": -np.log(sig(m_im)), "dpo_grad_weight": sig(-m_im), "rm_confidence": sig(m_ex),
            "rank_disagreement": (np.sign(m_im) != np.sign(m_ex)).astype(float)}


def top(scores: np.ndarray, ids: list[str], k: int) -> set[str]:
    frame = pd.DataFrame({"s": scores, "id": ids}).sort_values(["s", "id"], ascending=[False, True])
    return set(frame["id"].head(k))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def swapped(ids: list[str], fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """The noise audit's documented rule: blake2b-128 of "mapray-report:{seed}:{pair_id}", first 8 bytes."""
    return np.array([int.from_bytes(hashlib.blake2b(f"mapray-report:{seed}:{i}".encode(), digest_size=16)
                                    .digest()[:8], "big") / 2.0**64 < fraction for i in ids])


def auc_below(scores: np.ndarray, flipped: np.ndarray) -> float:
    u, f = scores[~flipped][:, None], scores[flipped][None, :]
    return float(((u > f) + 0.5 * (u == f)).mean())


def write_output(out, n: int = N) -> pd.DataFrame:
    """scored/ in two files, rejects/, manifest.json, as a run with map_z, alpha 0.5, ratio 0.4 writes them.
    Margins are continuous, with 30 rows repeated exactly: ties that only the pair_id breaks."""
    rng = np.random.default_rng(5)
    m_ex, m_im = rng.normal(0.8, 1.5, n), rng.normal(0.1, 1.0, n)
    m_ex[-30:], m_im[-30:] = m_ex[:30], m_im[:30]
    ids = [f"p{i:04d}" for i in rng.permutation(n)]
    frame = pd.DataFrame({"prompt": [f"q{i}" for i in range(n)], "domain": [["math", "code", "chat"][i % 3]
                                                                          for i in range(n)],
                          C.PAIR_ID: ids, "explicit_margin": m_ex, "implicit_margin": m_im,
                          "chosen_tokens": rng.integers(1, 500, n), "rejected_tokens": rng.integers(1, 400, n)})
    k = int(n * RATIO)
    kept = top(by_hand(m_ex, m_im, ids, ALPHA)["map_z"], ids, k) if n else set()
    frame["selected"] = np.array([i in kept for i in ids], dtype=bool)
    (out / "scored").mkdir(parents=True)
    for part, rows in enumerate((frame.iloc[: n // 2], frame.iloc[n // 2:])):
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), out / "scored" / f"part-{part}.parquet")
    (out / "rejects").mkdir()
    rejects = [("r1", "empty_response", "empty chosen response", "normalize", "a.jsonl:3"),
               ("r2", "empty_response", "empty chosen response", "normalize", "b.jsonl:7"),
               ("r3", "prompt_fills_max_length", "the prompt alone fills max_length (900 >= 512 tokens)", "policy",
                "b.jsonl:9")]
    table = dict(zip(C.REJECTS_SCHEMA.names, [*map(list, zip(*rejects)), [None] * 3]))
    pq.write_table(pa.table(table, schema=C.REJECTS_SCHEMA), out / "rejects" / "r.parquet")
    cfg = RunConfig(input=InputConfig(uri=["a.jsonl", "b.jsonl"]), output=str(out), policy=ModelConfig(path="pol"),
                    metric=MetricConfig(alpha=ALPHA), selection=SelectionConfig(ratio=RATIO))
    manifest = {"run_id": "run-test", "config": to_dict(cfg), "models": {"policy": {"configured": "pol",
                "engine": "torch", "dtype": "float32", "sha256": "cd" * 32}},
                "counts": {"input": n + 3, "scored": n, "rejected": 3, "selected": k}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return frame


@pytest.fixture(scope="module")
def output(tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("report") / "out"
    frame = write_output(out)
    return out, frame, report(str(out), ReportSettings(by="domain"))


def test_report_numbers_match_a_direct_computation(output):
    out, frame, _ = output
    numbers = json.loads((out / "report" / "report.json").read_text())
    ids, m_ex, m_im = list(frame[C.PAIR_ID]), frame["explicit_margin"].to_numpy(), frame["implicit_margin"].to_numpy()
    k, run_kept = int(N * RATIO), set(frame[C.PAIR_ID][frame["selected"]])
    assert (numbers["scored"], numbers["selected"], numbers["run"]["run_id"]) == (N, k, "run-test")
    scores = by_hand(m_ex, m_im, ids, ALPHA)
    last = frame.assign(s=scores["map_z"]).sort_values(["s", C.PAIR_ID], ascending=[False, True]).iloc[k - 1]
    assert numbers["cutoff"]["pair_id"] == last[C.PAIR_ID]
    assert numbers["cutoff"]["score"] == pytest.approx(last["s"], abs=1e-12)
    # the reward-bias audit on rows without response texts: the length bias only (tests/test_ensemble.py checks
    # its numbers against a direct computation)
    audit = numbers["reward_audit"]
    assert audit["skipped_biases"] == ["format"] and "agreement" not in audit
    metrics = ["map_z", "map", "map_unreg", "explicit_margin", "rm_confidence", "rank_disagreement"]
    assert [(r["margin"], r["bias"], r["fraction"], r["metric"]) for r in audit["rows"]] == [
        ("explicit_margin", "length", f, m) for f in (0.25, 0.5, 1.0) for m in metrics]

    sweep = numbers["alpha_sweep"]
    assert sweep["metric"] == "map_z" and [r["alpha"] for r in sweep["rows"]] == [0.0, 0.25, 0.5, 1.0, 2.5]
    for row in sweep["rows"]:
        kept = top(by_hand(m_ex, m_im, ids, row["alpha"])["map_z"], ids, k)
        assert (row["selected"], row["jaccard_with_run"]) == (k, pytest.approx(jaccard(kept, run_kept), abs=1e-12))
    assert sweep["rows"][2]["jaccard_with_run"] == 1.0  # the run's own alpha gives the run's own selection

    sets = {name: top(s, ids, k) for name, s in scores.items()}
    assert numbers["overlap"]["metrics"] == METRICS
    expected = [[jaccard(sets[a], sets[b]) for b in METRICS] for a in METRICS]
    assert np.array(numbers["overlap"]["jaccard"]) == pytest.approx(np.array(expected), abs=1e-12)
    assert [r["jaccard_with_run"] for r in numbers["overlap"]["rows"]] == pytest.approx(
        [jaccard(sets[m], run_kept) for m in METRICS], abs=1e-12)

    flip = swapped(ids)
    audit = numbers["noise_audit"]
    assert audit["swapped"] == flip.sum() > 10
    noisy = by_hand(np.where(flip, -m_ex, m_ex), np.where(flip, -m_im, m_im), ids, ALPHA)
    flipped_ids = {i for i, f in zip(ids, flip) if f}
    for row in audit["rows"]:
        kept = top(noisy[row["metric"]], ids, k)
        assert row["swapped_selected"] == len(kept & flipped_ids), row["metric"]
        assert row["share_swapped_selected"] == pytest.approx(len(kept & flipped_ids) / flip.sum(), abs=1e-12)
        # every score value of this small pool is a bin edge (sample = pool): the rank sum is exact
        assert (row["auc"], row["auc_error_bound"]) == (pytest.approx(auc_below(noisy[row["metric"]], flip),
                                                                      abs=1e-12), 0.0), row["metric"]
    by_metric = {r["metric"]: r for r in audit["rows"]}
    assert by_metric["map"]["auc"] == pytest.approx(auc_below(scores["map"], flip))  # map cannot see a swap


def test_report_breakdowns_match_a_direct_computation(output):
    out, frame, _ = output
    numbers = json.loads((out / "report" / "report.json").read_text())
    chosen = frame[frame["selected"]]
    diff = frame["chosen_tokens"] - frame["rejected_tokens"]
    bias = numbers["length_bias"]
    assert bias["chosen_tokens"] == {"pool": pytest.approx(frame["chosen_tokens"].mean()),
                                     "selected": pytest.approx(chosen["chosen_tokens"].mean())}
    assert bias["length_difference"]["selected"] == pytest.approx(diff[frame["selected"]].mean())
    groups = {g["value"]: g for g in numbers["by"]["groups"]}
    for name, rows in frame.groupby("domain"):
        assert (groups[name]["scored"], groups[name]["selected"]) == (len(rows), int(rows["selected"].sum()))
        assert groups[name]["mean_abs_implicit_margin"] == pytest.approx(rows["implicit_margin"].abs().mean())
    rejects = numbers["rejects"]
    assert rejects["by_code"] == [
        {"code": "empty_response", "stage": "normalize", "count": 2, "example": "empty chosen response"},
        {"code": "prompt_fills_max_length", "stage": "policy", "count": 1,
         "example": "the prompt alone fills max_length (900 >= 512 tokens)"}]
    assert rejects["by_file"] == [{"file": "a.jsonl", "count": 1}, {"file": "b.jsonl", "count": 2}]
    dist = numbers["distributions"]["explicit_margin"]
    assert sum(dist["pool"]) == N and sum(dist["selected"]) == int(N * RATIO)


def test_coarse_bins_give_the_same_selections_and_a_bounded_auc(output, monkeypatch):
    """Few bins from a small sample, and a bin past the collect limit sorted by Ray: the cut-offs stay exact (they
    come from the rows of the bin), the AUC moves by at most its reported bound."""
    from mapray.report import passes, summary

    out, _, _ = output
    exact = json.loads((out / "report" / "report.json").read_text())
    sorted_by_ray = []

    def sort_bin(ds, ctx, i, *args, **kwargs):
        sorted_by_ray.append(ctx.variants[i].metric)
        return real_sort_bin(ds, ctx, i, *args, **kwargs)

    real_sort_bin = passes.sort_bin
    monkeypatch.setattr(passes, "sort_bin", sort_bin)
    # bins of about 40 rows, but rank_disagreement's two values are two bins of about 150
    monkeypatch.setattr(histograms, "COLLECT_LIMIT", 100)
    coarse = summary(str(out), ReportSettings(rank_bins=8, sample_rows=60))
    # the run's pool, then the swapped one, then the reward-bias audit's three strengths of the length bias
    assert sorted_by_ray == ["rank_disagreement"] * 5
    for group in ("overlap", "alpha_sweep"):
        assert coarse[group]["rows"] == exact[group]["rows"]
    for a, b in zip(coarse["reward_audit"]["rows"], exact["reward_audit"]["rows"], strict=True):
        assert a == b | {"lambda": pytest.approx(b["lambda"], rel=1e-12)}
    bounds = []
    for a, b in zip(coarse["noise_audit"]["rows"], exact["noise_audit"]["rows"]):
        assert a["swapped_selected"] == b["swapped_selected"], a["metric"]
        assert abs(a["auc"] - b["auc"]) <= a["auc_error_bound"] + 1e-12, a["metric"]
        bounds.append(a["auc_error_bound"])
    assert max(bounds) > 0.01  # coarse bins mix values: the bound says so
    # the same cut-off row; its score to float rounding (sums over blocks that a shuffle may order differently)
    assert coarse["cutoff"] == exact["cutoff"] | {"score": pytest.approx(exact["cutoff"]["score"], rel=1e-12)}


def test_show_prints_the_headline_and_reuses_a_current_report(output, monkeypatch, capsys):
    import mapray.report
    from mapray.cli import main

    out, _, numbers = output

    def no_compute(*args):
        raise AssertionError("report.json of this run and these settings should have been reused")

    monkeypatch.setattr(mapray.report, "_compute", no_compute)
    assert main(["show", str(out)]) == 0  # no flags: the report of the published run, whatever its settings
    assert main(["show", str(out), "--by", "domain"]) == 0  # the settings it was made with
    text = capsys.readouterr().out
    assert f"303 input pairs -> 300 scored, 3 rejected, {int(N * RATIO)} selected" in text
    assert f"cut-off score {numbers['cutoff']['score']:.6g} (pair_id {numbers['cutoff']['pair_id']})" in text
    assert re.search(r"map_z\s+\S+\s+\S+", text) and "noise audit: 10% of pairs swapped" in text
    with pytest.raises(AssertionError, match="should have been reused"):  # other settings: computed afresh
        main(["show", str(out), "--noise-seed", "3"])


def test_an_output_with_nothing_scored_still_reports_its_rejects(local_ray, tmp_path, capsys):
    from mapray.cli import main

    out = tmp_path / "out"
    frame = write_output(out, n=0)
    assert frame.empty
    assert main(["report", str(out)]) == 0
    numbers = json.loads((out / "report" / "report.json").read_text())
    assert (numbers["scored"], numbers["selected"]) == (0, 0)
    assert [r["count"] for r in numbers["rejects"]["by_code"]] == [2, 1]
    assert not list((out / "report").glob("*.png"))
    assert "Nothing was scored." in (out / "report" / "index.html").read_text()
    assert "3 input pairs -> 0 scored, 3 rejected, 0 selected" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--noise-fraction", "1.5"], "--noise-fraction: must be in (0, 1), got 1.5"),
    (["--alphas", "0,-1"], "--alphas: every alpha must be a finite number >= 0, got [0.0, -1.0]"),
    (["--by", "nope"], "--by: scored/ has no column 'nope' (its columns: prompt, domain, pair_id, "),
])
def test_bad_report_flags_stop_before_any_pass(output, capsys, args, message):
    from mapray.cli import main

    out, _, _ = output
    assert main(["report", str(out), *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"mapray: error: {message}")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium on PATH: `bash scripts/install.sh --test` installs it (apt)")


def test_the_page_renders_every_figure_in_a_headless_browser(output, tmp_path):
    out, _, _ = output
    page = out / "report" / "index.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained: nothing to fetch
    figures = sorted(p.stem for p in (out / "report").glob("*.png"))
    assert figures == ["alpha_sweep", "by_group", "lengths", "margins", "noise_audit", "overlap", "scatter"]
    browser = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000"]
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert f'data-images="{len(figures)}"' in body and f'data-images-rendered="{len(figures)}"' in body, body
    assert "data-errors" not in body
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom.stdout)]
    assert len(widths) == len(figures) and min(widths) >= 400  # every figure decoded at its full size
    assert not re.findall(r":CONSOLE[^\n]*", dom.stderr)  # the page logs nothing: no console error
    shot = tmp_path / "page.png"
    subprocess.run([*browser, "--window-size=1360,2400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1360, 2400)
        assert len(image.convert("L").getcolors(1 << 16)) > 50  # drawn figures, not a blank page
