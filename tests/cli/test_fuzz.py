"""Malformed-input fuzzing of the command line (`tests/cli/fuzzing.py`), a fixed-seed slice of what
`benchmarks/fuzz.py` runs at scale: every command keeps the contract on every mutated model."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.cli import fuzzing

SEED = 7
CASES = 80  # × 5 commands


@pytest.fixture(scope="module")
def seeds() -> list[fuzzing.Seed]:
    return fuzzing.small_seeds()


@pytest.mark.slow
def test_every_command_keeps_the_contract_on_malformed_models(seeds, tmp_path):
    """Exit 0/1/2, at most two lines on stderr and no traceback, no partial output, the input untouched."""
    tally = fuzzing.Tally()
    with fuzzing.without_memory_children():
        for index in range(CASES):
            fuzzing.run_case(seeds, SEED, index, tmp_path, tally)
    assert not tally.violations, f"{len(tally.violations)} violations:\n\n" + "\n\n".join(
        str(v)[:2000] for v in tally.violations[:5])
    assert (tally.cases, tally.commands) == (CASES, 5 * CASES)
    print(f"{tally.cases} cases, {tally.commands} command runs, exit codes {dict(tally.exit_codes)}")
    # The mutations reach the commands: most are refused (exit 2), some still run (a shuffled graph is
    # sorted, a flipped bit in a weight changes numbers only) and some differ from the original (diff: 1).
    assert tally.exit_codes[2] > CASES and tally.exit_codes[0] > CASES // 4 and tally.exit_codes[1] > 0
    assert set(tally.exit_codes) <= {0, 1, 2}


@pytest.mark.slow
def test_in_process_runs_answer_as_a_real_process_does(seeds, tmp_path):
    """The in-process runner is faithful: as `python -m slimgraph.cli`, the same exit codes and error lines."""
    tally = fuzzing.Tally()
    for index in (0, 3):  # a damaged file and a graph that still runs
        fuzzing.compare_runners(seeds, SEED, index, tmp_path, tally)
    assert not tally.violations, "\n\n".join(str(v)[:2000] for v in tally.violations)
    assert tally.commands == 20


def test_the_cases_cover_every_mutation_and_seed(seeds):
    made = [fuzzing.make_case(seeds, SEED, index) for index in range(CASES)]
    used = Counter(name for _, applied, _ in made for name in applied.split("+"))
    assert set(used) == set(fuzzing.MUTATIONS)
    assert {seed for seed, _, _ in made} == {s.name for s in seeds}
    assert any("+" in applied for _, applied, _ in made)  # two mutations in a row


def test_cases_are_reproducible_and_leave_the_seeds_untouched(seeds):
    before = [s.proto.SerializeToString() for s in seeds]
    first = [fuzzing.make_case(seeds, SEED, index)[2].files for index in range(30)]
    again = [fuzzing.make_case(seeds, SEED, index)[2].files for index in range(30)]
    assert first == again
    assert [s.proto.SerializeToString() for s in seeds] == before  # saving with external data once rewrote them


def test_a_crash_and_a_noisy_stderr_are_caught(tmp_path, monkeypatch):
    """The checks can fail: a command that raises, or prints three lines, is a violation."""
    import slimgraph.cli

    def broken(args):
        raise KeyError("boom")

    monkeypatch.setitem(slimgraph.cli.COMMANDS, "inspect", broken)
    run = fuzzing.run_in_process(["inspect", "whatever.onnx"])
    assert run.crash is not None and run.crash.startswith("KeyError")
    found = fuzzing.check_run(run, "inspect", "case", tmp_path / "out.onnx", set(), tmp_path)
    assert [v.problem.split(":")[0] for v in found] == ["uncaught exception"]

    def noisy(args):
        import sys
        import warnings

        warnings.warn("a library's warning", UserWarning, stacklevel=1)  # hidden by the CLI
        sys.stderr.write("one\ntwo\nthree\n")
        return 2

    monkeypatch.setitem(slimgraph.cli.COMMANDS, "inspect", noisy)
    run = fuzzing.run_in_process(["inspect", "whatever.onnx"])
    assert run.stderr_lines == ["one", "two", "three"] and run.exit_code == 2
    assert "3 lines on stderr" in str(fuzzing.check_run(run, "inspect", "case", tmp_path / "o.onnx", set(), tmp_path))
