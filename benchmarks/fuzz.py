"""Malformed-input fuzzing of the command line, at scale: at least 10,000 command runs on mutated models.

Every case mutates one of the seed models (the MLP of the tests, a model with subgraphs, one with
external data, light model-zoo CNNs, small models of the real-model corpus) and runs `inspect`,
`optimize -p cleanup`, `optimize` with a lossy pass, `diff` and `bench` on it, checking the
contract of `tests/cli/fuzzing.py` (exit 0/1/2, at most two lines on stderr, no traceback, no
partial output, the input untouched). Commands run in-process; `--subprocess N` also runs the
first N cases through `python -m slimgraph.cli` and checks the exit codes agree.

    .venv/bin/python benchmarks/fuzz.py                 # 2,000 cases × 5 commands, seed 0
    .venv/bin/python benchmarks/fuzz.py --cases 200 --seed 3 --jobs 2

Prints the count of cases and commands run, the exit codes per command, and every violation
(the case to reproduce it: `--only-case SEED/INDEX`). Exits 1 if there was any.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cli import fuzzing  # noqa: E402

CORPUS_SEEDS = ("dnsmos-p808", "silero-vad-v6", "ppocr-v2-cls")
LIGHT_SEEDS = ("squeezenet", "zfnet512")  # the smallest model-zoo CNNs (their weights are ConstantOfShape)
MEMORY_LIMIT_GB = 6  # a mutation that makes slimgraph allocate without bound fails here, not the machine


def seeds(with_corpus: bool) -> list[fuzzing.Seed]:
    found = fuzzing.small_seeds() + [fuzzing.light_seed(n) for n in LIGHT_SEEDS]
    if with_corpus:
        for name in CORPUS_SEEDS:
            try:
                found.append(fuzzing.corpus_seed(name))
            except Exception as exc:  # not cached and no network: run without it, and say so
                print(f"(seed {name} unavailable: {exc})", file=sys.stderr)
    return found


def run_chunk(args: tuple[int, list[int], bool, int]) -> fuzzing.Tally:
    seed, indices, with_corpus, subprocess_cases = args
    soft = MEMORY_LIMIT_GB << 30
    resource.setrlimit(resource.RLIMIT_AS, (soft, resource.getrlimit(resource.RLIMIT_AS)[1]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tally = fuzzing.Tally()
    chosen = seeds(with_corpus)
    with tempfile.TemporaryDirectory(prefix="slimgraph-fuzz-") as tmp, fuzzing.without_memory_children():
        for index in indices:
            if index < subprocess_cases:
                fuzzing.compare_runners(chosen, seed, index, Path(tmp), tally)
            else:
                fuzzing.run_case(chosen, seed, index, Path(tmp), tally)
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000, help="mutated models (5 commands each; default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--subprocess", type=int, default=20, help="cases also run as real processes (default 20)")
    parser.add_argument("--no-corpus", action="store_true", help="only the seeds that need no download")
    parser.add_argument("--only-case", help="SEED/INDEX: run one case and print its violations in full")
    parser.add_argument("--top-errors", type=int, default=30, help="how many distinct error lines to list")
    args = parser.parse_args()
    if args.only_case:
        seed, index = (int(x) for x in args.only_case.split("/"))
        tally = run_chunk((seed, [index], not args.no_corpus, 0))
        for violation in tally.violations:
            print(violation, "\n")
        print(f"{tally.commands} commands, exit codes {dict(tally.exit_codes)}, {len(tally.violations)} violations")
        return 1 if tally.violations else 0
    start = time.perf_counter()
    chunks = [(args.seed, list(range(j, args.cases, args.jobs)), not args.no_corpus,
               args.subprocess) for j in range(args.jobs)]
    if args.jobs == 1:
        tallies = [run_chunk(chunks[0])]
    else:
        with ProcessPoolExecutor(args.jobs) as pool:
            tallies = list(pool.map(run_chunk, chunks))
    total = fuzzing.Tally()
    for tally in tallies:
        total.cases += tally.cases
        total.commands += tally.commands
        total.exit_codes.update(tally.exit_codes)
        total.by_command.update(tally.by_command)
        total.violations += tally.violations
        total.errors.update(tally.errors)
    elapsed = time.perf_counter() - start
    print(f"seed models: {', '.join(s.name for s in seeds(not args.no_corpus))}")
    print(f"mutations: {', '.join(sorted(fuzzing.MUTATIONS))}")
    by_label: dict[str, Counter] = {}
    for (label, code), count in sorted(total.by_command.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        by_label.setdefault(label, Counter())[code] = count
    print(f"\n{'command':<28} {'runs':>7}  exit codes")
    for label, codes in by_label.items():
        shown = ", ".join(f"{code}: {count}" for code, count in sorted(codes.items(), key=lambda kv: str(kv[0])))
        print(f"{label:<28} {sum(codes.values()):>7}  {shown}")
    print(f"\nthe {min(args.top_errors, len(total.errors))} most frequent of {len(total.errors)} distinct errors "
          "(exit 2; paths and numbers masked):")
    for line, count in total.errors.most_common(args.top_errors):
        print(f"{count:>7}  {line}")
    problems = Counter(v.problem.split(":")[0] for v in total.violations)
    print(f"\n{total.cases} cases, {total.commands} command runs in {elapsed:.0f} s "
          f"({total.commands / elapsed:.1f} runs/s); violations: {len(total.violations)} {dict(problems)}")
    for violation in total.violations[:50]:
        print("\n" + str(violation)[:3000])
    return 1 if total.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
