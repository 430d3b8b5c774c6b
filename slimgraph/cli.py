"""The `slimgraph` command: optimize, inspect, diff, bench, passes.

Exit codes: 0 success; 1 the fidelity budget was exceeded (or an exact pass changed the
outputs), or `diff` found differences; 2 user error (bad file, bad option, unsupported model), reported as one line on
stderr without a traceback unless --debug. Torch and transformers are imported only when a
command needs them, so `slimgraph --help` stays fast.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from slimgraph.backends import backends
from slimgraph.errors import SlimgraphError

PROG = "slimgraph"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Make trained neural networks smaller and faster, verified at every step.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    optimize = sub.add_parser("optimize", help="run a pass pipeline on a model and write the result")
    optimize.add_argument("model", help=".onnx file, .pt2 file, or Hugging Face model folder")
    source = optimize.add_mutually_exclusive_group(required=True)
    source.add_argument("-p", "--pipeline", help="pipeline text, e.g. 'cleanup,fold-constants'")
    source.add_argument("--recipe", help="YAML or TOML recipe file")
    optimize.add_argument("-o", "--output", required=True,
                          help="the output the backend writes (see --backend)")
    optimize.add_argument("--backend", default="onnxruntime", choices=list(backends()),
                          help="; ".join(f"{b.name}: writes {b.writes}" for b in backends().values()))
    optimize.add_argument("--calib", help="calibration inputs: .npz of named arrays, or a text file (one sample a line)")
    optimize.add_argument("--max-drop", type=float, help="fail (exit 1) when 1 - cosine vs the original exceeds this")
    optimize.add_argument("--no-verify", action="store_true", help="skip verification against the original")
    optimize.add_argument("--external-data", action="store_true", help="store weights in a separate .data file")
    _common(optimize)

    inspect = sub.add_parser("inspect", help="show statistics and detected structures of a model")
    inspect.add_argument("model")
    _common(inspect)

    diff = sub.add_parser("diff", help="show what changed between two models (exit 1 when they differ)")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--weights", action="store_true", help="also compare weight values (relative L2)")
    diff.add_argument("--depth", type=int, default=2, help="group changes under this many module-path segments "
                                                          "(0: summary only; default 2)")
    diff.add_argument("--only", choices=["added", "removed", "changed"], help="show only these changes")
    _common(diff)

    bench = sub.add_parser("bench", help="ONNX Runtime latency, throughput, memory and size (two models: ratios)")
    bench.add_argument("models", nargs="+", metavar="MODEL", help="one model, or two to compare (B / A)")
    bench.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    bench.add_argument("--seq", type=int, default=128, help="length of symbolic sequence dims (default 128)")
    bench.add_argument("--runs", type=int, default=30, help="timed runs per model and batch (default 30)")
    bench.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    _common(bench)

    passes = sub.add_parser("passes", help="list passes, or show one pass's options")
    passes.add_argument("name", nargs="?")
    _common(passes)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document to stdout")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _version() -> str:
    from slimgraph import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except SlimgraphError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


# --- commands -----------------------------------------------------------------------------


def cmd_optimize(args: argparse.Namespace) -> int:
    from slimgraph.backends import check_output, compile
    from slimgraph.frontend import load
    from slimgraph.passes import PassContext, Pipeline

    model_path = Path(args.model)
    output = Path(args.output)
    if output.exists() and model_path.exists() and output.resolve() == model_path.resolve():
        raise SlimgraphError("the output would overwrite the input model; choose another -o path")
    check_output(args.backend, output)
    if args.pipeline is not None:
        pipeline, settings = Pipeline.parse(args.pipeline), {}
    else:
        pipeline, settings = Pipeline.from_recipe(args.recipe)
    max_drop = args.max_drop if args.max_drop is not None else settings.get("max_drop")
    if max_drop is not None and not (isinstance(max_drop, (int, float)) and 0 <= max_drop <= 2):
        raise SlimgraphError(f"max_drop must be a number between 0 and 2, got {max_drop!r}")

    model = load(model_path)
    ctx = PassContext(max_drop=max_drop)
    calib = args.calib or settings.get("calib")
    if calib:
        from slimgraph.frontend.calibration import load_calibration

        ctx.inputs, ctx.inputs_source = load_calibration(Path(calib), model)
    with _progress(args, len(pipeline)) as instruments:
        report = pipeline.run(model, ctx, verify=not args.no_verify, instruments=instruments)
    for record in report.records:
        for warning in record.warnings:
            sys.stderr.write(f"{PROG}: warning: {warning}\n")
    options = {"external_data": args.external_data or None} if args.backend == "onnxruntime" else {}
    compile(model, backend=args.backend, **options).save(output)

    if args.json:
        _print_json(report.to_json() | {"output": str(output), "backend": args.backend})
    else:
        from slimgraph.report import print_renderable, render_pipeline_report

        print_renderable(render_pipeline_report(report, output=str(output)))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from slimgraph.api import inspect as inspect_model

    summary = inspect_model(Path(args.model))
    if args.json:
        _print_json(summary.to_json())
    else:
        from slimgraph.report import print_renderable, render_summary

        print_renderable(render_summary(summary))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from slimgraph.api import diff

    result = diff(Path(args.a), Path(args.b), weights=args.weights)
    if args.json:
        _print_json(result.to_json())
    else:
        from slimgraph.report import print_renderable, render_diff

        print_renderable(render_diff(result, depth=args.depth, only=args.only))
    return 0 if result.identical else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from slimgraph.bench import bench, to_json

    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise SlimgraphError(f"--batch {args.batch}: expected comma-separated integers, e.g. 1,8") from None
    results = bench([Path(m) for m in args.models], batches=batches, sequence=args.seq, runs=args.runs,
                    threads=args.threads)
    if args.json:
        sys.stdout.write(to_json(results) + "\n")
    else:
        from slimgraph.report import print_renderable, render_bench

        print_renderable(render_bench(results))
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from slimgraph.passes import all_pass_classes, get_pass_class
    from slimgraph.passes._infra.pipeline import pass_help

    if args.name:
        cls = get_pass_class(args.name)
        options = pass_help(cls)
        if args.json:
            _print_json({"name": cls.name, "exact": cls.exact, "summary": cls.summary(),
                         "doc": inspect.getdoc(sys.modules[cls.__module__]) or "",
                         "options": [{"name": n, "type": t, "default": d} for n, t, d in options]})
            return 0
        print(f"{cls.name} ({'exact' if cls.exact else 'lossy'}): {cls.summary()}")
        module_doc = inspect.getdoc(sys.modules[cls.__module__])  # the rewrite, in detail
        if module_doc:
            print("\n" + module_doc + "\n")
        print("options:" if options else "options: none")
        for name, type_text, default in options:
            print(f"  {name}: {type_text} = {default}")
        return 0
    classes = all_pass_classes()
    if args.json:
        _print_json([{"name": c.name, "exact": c.exact, "summary": c.summary()} for c in classes])
        return 0
    width = max(len(c.name) for c in classes)
    for cls in classes:
        print(f"{cls.name:<{width}}  {'exact' if cls.exact else 'lossy'}  {cls.summary()}")
    return 0


COMMANDS = {"optimize": cmd_optimize, "inspect": cmd_inspect, "diff": cmd_diff, "bench": cmd_bench,
            "passes": cmd_passes}


# --- helpers ------------------------------------------------------------------------------


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=_json_default)
    sys.stdout.write("\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "to_json"):
        return value.to_json()
    return str(value)


class _progress:
    """A rich progress bar over the passes on a terminal; nothing in a pipe or with --json."""

    def __init__(self, args: argparse.Namespace, total: int) -> None:
        self.enabled = sys.stderr.isatty() and not args.json
        self.total = total

    def __enter__(self) -> list:
        if not self.enabled:
            return []
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from slimgraph.passes import Instrument

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                 console=Console(stderr=True), transient=True)
        self.progress.start()
        task = self.progress.add_task("verifying the original", total=self.total)
        progress = self.progress

        class ProgressBar(Instrument):
            def before_pass(self, pass_, model, ctx):
                progress.update(task, description=f"pass {pass_.to_text()}")

            def after_pass(self, pass_, model, ctx, record):
                progress.advance(task)

        return [ProgressBar()]

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()


if __name__ == "__main__":
    raise SystemExit(main())
