"""Jobs find each other: with their defaults, score, report and sweep read what fit_factors,
build_index, score and pipeline wrote into the same run directory, and the job log holds the job's log."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from jobs import build_index, fit_factors, report, score
from jobs.wiring import built_prefilter_settings, prefilter_settings, stored_factor_settings
from tests.jobs.helpers import JOBS, ROOT, overrides, run_job, tiny_inputs

SHARED = ("fit_factors", "build_index", "score", "pipeline", "report")


def composed(name: str, *extra: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(extra))


def test_the_jobs_that_build_on_each_other_share_one_run_directory():
    assert {composed(name).output_dir for name in SHARED} == {"outputs"}
    # The sweep keeps its own folder but reads the store that fit_factors writes by default.
    sweep = composed("sweep")
    assert (sweep.output_dir, sweep.factors.path) == ("outputs/sweep", "outputs/factors")
    assert Path(composed("fit_factors").output_dir) / "factors" == Path(sweep.factors.path)
    # build_index writes where score looks.
    index = prefilter_settings(composed("build_index")).index_path("outputs")
    assert index == prefilter_settings(composed("score", "prefilter.kind=bm25")).index_path("outputs")
    assert all(composed(name).debug is False for name in JOBS)


def test_fit_then_score_then_report_with_nothing_but_the_run_directory(tmp_path, capsys):
    inputs = tiny_inputs(tmp_path / "inputs")
    run = f"output_dir={tmp_path / 'run'}"
    fit_factors.main.__wrapped__(composed("fit_factors", *overrides(inputs, run, "progress=false", job="fit_factors")))
    build_index.main.__wrapped__(composed("build_index", *overrides(inputs, run, "prefilter.kind=tfidf", job="build_index")))
    cfg = composed("score", *overrides(inputs, run, "score.progress=false", "prefilter.kind=tfidf", "prefilter.top_m=3"))
    assert stored_factor_settings(cfg).path == str(tmp_path / "run" / "factors")
    assert built_prefilter_settings(cfg).path == str(tmp_path / "run" / "prefilter" / "tfidf")
    score.main.__wrapped__(cfg)
    report.main.__wrapped__(composed("report", f"output_dir={tmp_path / 'run'}"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fitted factors on 10 sequences") and "added 2 shard(s)" in lines[1]
    assert lines[2].startswith("scored ") and lines[4].startswith("run record: ")
    # 10 rows asked for, 3 candidates per query: the console says so.
    assert lines[3] == "note: score.top_k=10 is more than the 3 documents each query is ranked against: every document is kept"
    run_id = Path(lines[4].removeprefix("run record: ")).stem
    page = tmp_path / "run" / "reports" / f"{run_id}.html"
    assert lines[5].endswith(str(page))
    # Each query was ranked among its 3 prefilter candidates, and the report says so.
    payloads = [json.loads(block) for block in re.findall(r'<script type="application/json" id="q\d+">(.*?)</script>',
                                                            page.read_text(), re.S)]
    assert [p["scored"] for p in payloads] == [3, 3]


def test_a_missing_prefilter_index_names_the_key_to_set(tmp_path):
    from attribution.prefilter.manifest import PrefilterError

    with pytest.raises(PrefilterError, match=r"^prefilter.path=.*/prefilter/bm25: no bm25 index there; build one with "
                                             r"`python -m jobs.build_index prefilter.kind=bm25 output_dir="):
        built_prefilter_settings(composed("score", f"output_dir={tmp_path}", "prefilter.kind=bm25"))


def test_the_job_log_holds_the_summary_with_times(tmp_path):
    inputs = tiny_inputs(tmp_path / "inputs")
    result, _ = run_job("build_index", *overrides(inputs, f"output_dir={tmp_path / 'run'}", "prefilter.kind=tfidf",
                                                   job="build_index"))
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert "added 2 shard(s), 10 documents" in summary
    log = (tmp_path / "run" / "build_index.log").read_text().splitlines()
    assert log[-1].endswith(f"INFO jobs: {summary}")
    assert log[-1][:4].isdigit()  # a timestamp first
    assert (tmp_path / "run" / ".hydra" / "build_index" / "config.yaml").is_file()
