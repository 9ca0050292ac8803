"""The code-sandbox benchmark at minimal size: shared JSON schema, both arms score the batch identically (its
built-in check), every spread well formed. No timing assertions."""

from erpd_megatron.bench import code_sandbox
from erpd_megatron.bench.run_all import BENCHMARKS
from tests.test_bench import _check_schema, _check_spread
from tests.test_sandbox_hostile import _need_bwrap


def test_code_sandbox_minimal(tmp_path):
    _need_bwrap()
    assert code_sandbox.main(["--samples", "6", "--repeats", "1", "--startup-repeats", "2", "--out", str(tmp_path)]) == 0
    doc = _check_schema(tmp_path / "code_sandbox.json", "code_sandbox")
    r = doc["results"]
    for arm in ("bwrap", "plain"):
        _check_spread(r[arm]["samples_per_s"])
        _check_spread(r[arm]["test_programs_per_s"])
    _check_spread(r["overhead_ratio_bwrap_over_plain"])
    _check_spread(r["startup"]["ratio"])
    assert r["mean_reward"] == 0.5  # half of the batch is right by construction
    assert "code_sandbox" in BENCHMARKS
