"""A short, deterministic fuzz run of the whole convert path (issue 6).

The generators and the rules every input must obey are in caffe2metal/fuzz.py
(``make fuzz`` runs them for minutes with fresh seeds).  Here hypothesis drives
them with ``derandomize=True``: the same few hundred inputs on every run, a few
seconds each kind.  A failing input is also saved under build/fuzz/crashes/
(replay: ``python -m tools.fuzz --replay build/fuzz/crashes/<id>``).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tools import fuzz

CRASHES = Path(__file__).resolve().parents[1] / "build" / "fuzz" / "crashes"
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
RUNS = {"proto": 0, "model": 0}


@pytest.fixture(scope="module")
def seeds():
    return fuzz.corpus()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def check(kind, proto: bytes, model: bytes, workdir, threads: bool = False) -> str:
    try:
        return fuzz.run_one(proto, model, workdir, seconds=30, threads=threads)
    except fuzz.Failure as f:
        saved = fuzz.save_crash(CRASHES, proto, model, f"{kind}: {f}")
        pytest.fail(f"{kind} input (saved as {saved}.*): {f}", pytrace=False)


@pytest.mark.slow
def test_seed_corpus_converts(seeds, workdir):
    """Unmutated seeds: the built-in nets must convert (real nets may lack weights)."""
    assert len(seeds) >= 4
    results = {s.name: check("seed", s.prototxt, s.caffemodel, workdir) for s in seeds}
    for name in ("example", "tiny", "tiny_v1", "tiny_input_layer"):
        assert results[name] == "ok", name
    threaded = {s.name: check("seed", s.prototxt, s.caffemodel, workdir, threads=True)
                for s in seeds}
    assert threaded == results


@pytest.mark.slow
@settings(max_examples=100, **SETTINGS)
@given(rnd=st.randoms(use_true_random=False))
def test_fuzz_prototxt_mutations(seeds, workdir, rnd):
    kind, proto, model = fuzz.generate(rnd, seeds, "proto")
    check(kind, proto, model, workdir)


@pytest.mark.slow
@settings(max_examples=60, **SETTINGS)
@given(rnd=st.randoms(use_true_random=False))
def test_fuzz_consistent_edits(seeds, workdir, rnd):
    """Syntax-preserving edits with weights made to match: these reach fold and the writers."""
    kind, proto, model = fuzz.generate(rnd, seeds, "valid")
    check(kind, proto, model, workdir, threads=rnd.random() < 0.5)


@pytest.mark.slow
@settings(max_examples=80, **SETTINGS)
@given(rnd=st.randoms(use_true_random=False))
def test_fuzz_caffemodel_mutations(seeds, workdir, rnd):
    kind, proto, model = fuzz.generate(rnd, seeds, rnd.choice(["model", "both"]))
    check(kind, proto, model, workdir, threads=rnd.random() < 0.5)


@pytest.mark.slow
@settings(max_examples=40, **SETTINGS)
@given(rnd=st.randoms(use_true_random=False))
def test_fuzz_bad_values(seeds, workdir, rnd):
    kind, proto, model = fuzz.generate(rnd, seeds, "values")
    check(kind, proto, model, workdir)


@pytest.mark.slow
@settings(max_examples=80, **SETTINGS)
@given(rnd=st.randoms(use_true_random=False),
       kind=st.sampled_from(["special", "swap", "random"]))
def test_fuzz_hostile_shapes_and_files(seeds, workdir, rnd, kind):
    kind, proto, model = fuzz.generate(rnd, seeds, kind)
    check(kind, proto, model, workdir)


@settings(max_examples=40, **SETTINGS)
@given(proto=st.binary(max_size=400), model=st.binary(max_size=400))
def test_fuzz_raw_bytes(workdir, proto, model):
    check("bytes", proto, model, workdir)


@pytest.mark.slow
def test_fuzz_loop_reports_counts(tmp_path):
    """The `make fuzz` driver: counts inputs, finds nothing on a short run."""
    lines = []
    stats = fuzz.fuzz(seconds=60, seed=1234, crashes=tmp_path / "crashes", max_inputs=10,
                      log=lines.append)
    assert stats["inputs"] == 10
    assert stats["ok"] + stats["error"] == 10, lines
    assert stats["failures"] == 0 and not (tmp_path / "crashes").exists()


def test_hostile_manifests_through_verify_and_compare(tmp_path):
    """tools/fuzz.py's manifest generator, bounded: verify, compare and run end in a
    result or one error line, nothing written."""
    import json
    import random
    rnd = random.Random(7)
    base = tmp_path / "base"
    manifest = json.loads((fuzz._base_output(str(base))[2] / "manifest.json").read_text())
    results = {fuzz.run_manifest(fuzz.mutate_manifest(rnd, manifest), tmp_path / "w", base)
               for _ in range(25)}
    assert "error" in results


def test_hostile_plans_through_run(tmp_path):
    """tools/fuzz.py's plan generator, bounded (tiny and the example, 40 plans): ``run``
    exits 0, or 2 with one error line; never a traceback, a hang, a huge allocation."""
    import collections
    import random
    rnd = random.Random(11)
    results: collections.Counter = collections.Counter()
    for _ in range(40):
        manifest, files, base, argv = fuzz.hostile_plan(rnd, tmp_path / "bases")
        try:
            results[fuzz.run_plan_manifest(manifest, files, tmp_path / "w", base, argv)] += 1
        except fuzz.Failure as f:
            saved = fuzz.save_crash(CRASHES, b"", manifest, f"plan: {f}\nfiles {files}")
            pytest.fail(f"hostile plan (saved as {saved}.caffemodel, the manifest): {f}",
                        pytrace=False)
    assert results["error"] > 10 and results["ok"] > 0, results


@pytest.mark.parametrize("kind", ["link_at_name", "file", "nested"])
def test_hostile_example_targets(tmp_path, kind, monkeypatch):
    import random

    class Pick(random.Random):
        def choice(self, seq):
            return kind if seq is fuzz.EXAMPLE_TARGETS else seq[0]
    assert fuzz.run_example(Pick(0), tmp_path / "w") in ("ok", "error")
