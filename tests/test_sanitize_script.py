"""scripts/sanitize.py's reading of compute-sanitizer output (CPU): reports are attributed to the
case whose markers surround them, and both tools' summary lines are read (memcheck's "ERROR
SUMMARY", racecheck's "RACECHECK SUMMARY"), so a clean racecheck run is not taken for a failed
one. The lines below are the shapes compute-sanitizer printed on the H100."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import sanitize  # noqa: E402

CASES = ["plain", "causal"]


def test_clean_runs_of_both_tools():
    memcheck = ("@@ case plain start\n@@ case plain done\n@@ case causal start\n"
                "@@ case causal done\n========= ERROR SUMMARY: 0 errors\n")
    racecheck = ("========= COMPUTE-SANITIZER\n@@ case plain start\n@@ case plain done\n"
                 "@@ case causal start\n@@ case causal done\n"
                 "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    for output in (memcheck, racecheck):
        per_case, outside, summary, finished = sanitize.parse(output, CASES)
        assert summary == 0 and finished == CASES and outside == []
        assert per_case == {"plain": [], "causal": []}
        result = dict(returncode=0, error_summary=summary, per_case=per_case,
                      outside_cases=outside, unfinished=[])
        assert not sanitize.failed(result)


def test_reports_are_attributed_to_their_case():
    output = ("@@ case plain start\n@@ case plain done\n@@ case causal start\n"
              "========= Invalid __global__ read of size 2 bytes\n"
              "=========     at _attn_fwd+0x1a0\n"
              "@@ case causal done\n"
              "========= Error: Race reported between Write access at _attn_bwd_dq+0x40\n"
              "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n")
    per_case, outside, summary, finished = sanitize.parse(output, CASES)
    assert summary == 2
    assert per_case["plain"] == []
    assert per_case["causal"] == ["Invalid __global__ read of size 2 bytes"]
    assert outside == ["Error: Race reported between Write access at _attn_bwd_dq+0x40"]
    result = dict(returncode=86, error_summary=summary, per_case=per_case,
                  outside_cases=outside, unfinished=[])
    assert sanitize.failed(result)


def test_a_missing_summary_is_a_failure():
    per_case, outside, summary, finished = sanitize.parse("@@ case plain start\n", CASES)
    assert summary is None and finished == []
    result = dict(returncode=0, error_summary=summary, per_case=per_case,
                  outside_cases=outside, unfinished=["plain", "causal"])
    assert sanitize.failed(result)
