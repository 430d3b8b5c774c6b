"""The `slimgraph` command: optimize, inspect, diff, bench, passes.

Exit codes: 0 success; 1 the fidelity budget was exceeded (or an exact pass changed the
outputs), or `diff` found differences; 2 user error (bad file, bad option, unsupported
model, an OS error such as a full disk), reported as one line on stderr without a traceback
unless --debug; with --json, also as `{"error": ...}` on stdout. Everything that can be
checked before work is: the output path, the options, the calibration file (its format
before the model is loaded, its arrays against the graph inputs right after), `exclude`
globs and size budgets (before any pass). Torch and transformers are imported only when a
command needs them, so `slimgraph --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import inspect
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from slimgraph.backends import backends
from slimgraph.errors import SlimgraphError
from slimgraph.measure.target import NAMES as TARGETS

if TYPE_CHECKING:
    import onnx_ir as ir

    from slimgraph.passes import Pipeline
    from slimgraph.passes._infra.checkpoints import Checkpoints

PROG = "slimgraph"


class UsageError(SlimgraphError):
    """A command line argparse (or our spelling check) refused."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a `UsageError` (one line on stderr, exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Make trained neural networks smaller and faster, verified at every step.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    optimize = sub.add_parser("optimize", help="run a pass pipeline on a model and write the result")
    optimize.add_argument("model", help=".onnx file, .pt2 file, .gguf file, or Hugging Face model folder")
    source = optimize.add_mutually_exclusive_group(required=True)
    source.add_argument("-p", "--pipeline", help="pipeline text, e.g. 'cleanup,quantize-weights{bits=4}'")
    source.add_argument("--recipe", help="YAML or TOML recipe file")
    source.add_argument("--goal", choices=["latency", "size", "balanced"],
                        help="try candidate pipelines, measure each (latency on this machine, size, fidelity) and "
                             "keep the best within --max-drop (default 0.01); writes the chosen recipe beside -o")
    optimize.add_argument("-o", "--output", required=True,
                          help="the output the backend writes (see --backend)")
    optimize.add_argument("--backend", default="onnxruntime", choices=list(backends()),
                          help="; ".join(f"{b.name}: writes {b.writes}" for b in backends().values()))
    optimize.add_argument("--style", choices=["structured", "fx"],
                          help="pytorch backend: model.py as modules per block with torch's layers (structured, "
                               "the default) or torch.fx's flat forward of every op (fx)")
    optimize.add_argument("--calib", help="calibration inputs: .npz of named arrays, a text file (one sample a "
                                          "line), or a folder of images ('photos/{size=[320,320],mean=[0.5],"
                                          "std=[0.5],order=bgr}'); with 4 samples or more, the last quarter is "
                                          "held out to verify on")
    optimize.add_argument("--target", default="auto", metavar="TARGET",
                          help="the machine the model will run on: auto (this one, the default), "
                               f"{', '.join(TARGETS)}, or ray:RESOURCE (the Ray node that has that resource, "
                               "with --workers ray; --goal times the candidates there); passes such as "
                               "quantize-dynamic choose their kernels for it")
    optimize.add_argument("--workers", default="local", metavar="WHERE",
                          help="where --goal's candidates and mixed-precision's per-layer measurements run: local "
                               "(one after another, the default), ray (a local Ray instance, or the cluster "
                               "RAY_ADDRESS names), or ray://HOST:PORT; needs the ray extra")
    optimize.add_argument("--max-drop", type=float, help="fail (exit 1) when 1 - cosine vs the original exceeds this")
    optimize.add_argument("--no-verify", action="store_true", help="skip verification against the original")
    optimize.add_argument("--resume", action="store_true",
                          help="block-wise passes (blockwise=true) keep a checkpoint beside the output (OUT.resume) "
                               "after each block, and a run of the same input, pipeline and calibration that was "
                               "interrupted resumes from it; removed once the output is written")
    optimize.add_argument("--external-data", action="store_true", help="store weights in a separate .data file (the default from 256 MB of weights, and for a decoder with a KV cache)")
    _kv_cache(optimize)
    _plugin(optimize)
    _common(optimize)

    inspect_ = sub.add_parser("inspect", help="show statistics and detected structures of a model")
    inspect_.add_argument("model")
    _kv_cache(inspect_)
    _common(inspect_)

    diff = sub.add_parser("diff", help="show what changed between two models (exit 1 when they differ)")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--weights", action="store_true",
                      help="also measure how much each differing weight changed (relative L2); weights are always "
                           "compared by fingerprint")
    diff.add_argument("--depth", type=int, default=2, help="group changes under this many module-path segments "
                                                          "(0: summary only; default 2)")
    diff.add_argument("--only", choices=["added", "removed", "changed"], help="show only these changes")
    _kv_cache(diff)
    _common(diff)

    bench = sub.add_parser("bench", help="ONNX Runtime latency, throughput, memory and size (two models: ratios)")
    bench.add_argument("models", nargs="+", metavar="MODEL", help="one model, or two to compare (B / A)")
    bench.add_argument("--batch", help="comma-separated batch sizes (default 1,8; with --new-tokens, 1); sizes a model "
                                                      "cannot take are listed as not run")
    bench.add_argument("--seq", type=int, default=128, help="length of symbolic sequence dims (default 128); with "
                                                            "--new-tokens, the prompt's length in tokens")
    bench.add_argument("--runs", type=int, help="timed runs per model and batch (default 30; with --new-tokens, 3 "
                                                "generations)")
    bench.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    bench.add_argument("--new-tokens", type=int, metavar="N",
                       help="decode mode: time greedy generation of N tokens of a causal LM (time to first token, "
                            "tokens/s); folders and .gguf files are exported with a KV cache")
    bench.add_argument("--prompt", help="with --new-tokens: the prompt text (tokenized with the model's tokenizer) "
                                        "instead of --seq random token ids")
    _kv_cache(bench)
    _common(bench)

    passes = sub.add_parser("passes", help="list passes, or show one pass's options")
    passes.add_argument("name", nargs="?")
    _plugin(passes)
    _common(passes)
    cache = sub.add_parser("cache", help="show what slimgraph's cache holds (exports, downloads), or clear it")
    cache.add_argument("action", nargs="?", choices=["info", "clear"], default="info")
    _common(cache)
    parser.commands = dict(sub.choices)  # type: ignore[attr-defined]
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document to stdout")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _kv_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache", action="store_true",
                        help="export a causal LM (folder or .gguf) with past/present key-value inputs and outputs, "
                             "for generation one token at a time")


def _plugin(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first, so that the passes it registers can be named (repeatable)")


def _version() -> str:
    from slimgraph import __version__

    return __version__


_NUMBER = re.compile(r"^-\d+(\.\d*)?([eE][-+]?\d+)?$|^-\.\d+$")


def check_option_spelling(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Refuse an unknown option before argparse does: argparse reports a missing required
    option first (`--pipline x` → "-p/--pipeline is required"), which hides the typo."""
    command = next((a for a in argv if not a.startswith("-")), None)
    sub = getattr(parser, "commands", {}).get(command)
    if sub is None:
        return
    known = [o for o in sub._option_string_actions if o.startswith("-")]
    long = [o for o in known if o.startswith("--")]
    for token in argv[argv.index(command) + 1:]:
        if token == "--":
            return
        if not token.startswith("-") or token == "-" or _NUMBER.match(token):
            continue
        name = token.split("=", 1)[0]
        if name in known or (name.startswith("--") and any(o.startswith(name) for o in long)):
            continue  # known, or an abbreviation argparse accepts
        if not name.startswith("--") and token[:2] in known:
            continue  # a short option with its value attached: -pcleanup
        close = difflib.get_close_matches(name, long if name.startswith("--") else known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(f"{command}: unknown option {name}{hint} (see {PROG} {command} --help)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    wants_json, debug = "--json" in argv, "--debug" in argv
    try:
        try:
            parser = build_parser()
            check_option_spelling(parser, argv)
            args = parser.parse_args(argv)
            if args.command is None:
                parser.print_help()
                return 2
            with _library_output_hidden(debug):
                return COMMANDS[args.command](args)
        except BrokenPipeError:
            raise
        except OSError as exc:  # a full disk, a permission refused: the user's to fix, one line
            if debug:
                raise
            where = f": {exc.filename}" if exc.filename else ""
            raise SlimgraphError(f"{exc.strerror or exc}{where}") from exc
    except SlimgraphError as exc:
        if debug:
            raise
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        if wants_json:
            _print_json({"error": str(exc), "exit_code": exc.exit_code})
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader went away (`slimgraph passes --json | head`): stop quietly, as a pipe
        # closed early by SIGPIPE would. Point stdout at devnull so that the final flush
        # at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


# --- commands -----------------------------------------------------------------------------


@contextlib.contextmanager
def _spill_for(model: ir.Model, output: Path, args: argparse.Namespace) -> Iterator[Callable[[], None] | None]:
    """For a large model written as a .onnx with external data: the pipeline writes new weights to
    the output's data file as they are made (`slimgraph.ir.spill`), rather than holding them all."""
    from slimgraph.backends.onnxruntime import EXTERNAL_DATA_BYTES
    from slimgraph.ir.spill import WeightSpill
    from slimgraph.measure.stats import weight_bytes

    if args.backend != "onnxruntime" or args.goal is not None or weight_bytes(model) < EXTERNAL_DATA_BYTES:
        yield None
        return
    spill = WeightSpill.beside(output)
    try:
        yield functools.partial(spill, model)
    finally:
        spill.close()


def _checkpoints(model_path: Path, output: Path, pipeline: Pipeline | None) -> Checkpoints:
    """`--resume`'s checkpoints, beside the output, keyed by the run: the input's files (their sizes
    and times) and the pipeline (each pass adds its options, graph and calibration inputs)."""
    from slimgraph.passes._infra.checkpoints import Checkpoints

    if pipeline is None or not any(getattr(p, "blockwise", False) for p in pipeline.passes):
        raise SlimgraphError("--resume resumes block-wise passes (e.g. quantize-weights{method=gptq,blockwise=true}); "
                             "this run has none")
    files = sorted(model_path.iterdir()) if model_path.is_dir() else [model_path]
    stamp = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file())
    return Checkpoints(output.with_name(output.name + ".resume"), f"{model_path.resolve()}|{stamp}|{pipeline.to_text()}")


def cmd_optimize(args: argparse.Namespace) -> int:
    from slimgraph.backends import check_output, compile
    from slimgraph.frontend import load
    from slimgraph.frontend.calibration import check_calibration_file
    from slimgraph.measure.process import ProcessCost
    from slimgraph.measure.target import parse as parse_target
    from slimgraph.passes import PassContext, Pipeline, load_plugin

    for module in args.plugin:
        load_plugin(module)
    model_path = Path(args.model)
    output = Path(args.output)
    if not model_path.exists():
        raise SlimgraphError(f"no such file or folder: {model_path}")
    if output.exists() and output.resolve() == model_path.resolve():
        raise SlimgraphError("the output would overwrite the input model; choose another -o path")
    check_output(args.backend, output)
    if args.style and args.backend != "pytorch":
        raise SlimgraphError(f"--style is an option of the pytorch backend, not of {args.backend}")
    if args.goal is not None:
        pipeline, recipe_drop, recipe_calib = None, None, None
    elif args.pipeline is not None:
        pipeline, recipe_drop, recipe_calib = Pipeline.parse(args.pipeline), None, None
    else:
        recipe = Pipeline.from_recipe(args.recipe)
        pipeline, recipe_drop, recipe_calib = recipe.pipeline, recipe.max_drop, recipe.calib
    for pass_ in pipeline.passes if pipeline is not None else ():
        if not pass_.runs_on(args.backend):
            raise SlimgraphError(f"{pass_.name} writes ops that only the {' and '.join(pass_.backends)} backend runs, "
                                 f"not {args.backend}")
    max_drop = args.max_drop if args.max_drop is not None else recipe_drop
    if max_drop is not None and args.no_verify:
        where = "--max-drop" if args.max_drop is not None else f"max_drop in {args.recipe}"
        raise SlimgraphError(f"--no-verify and {where} cannot go together: the budget is measured by verification")
    if args.goal is not None and args.no_verify:
        raise SlimgraphError("--goal compares candidates by their verified fidelity; it cannot go with --no-verify")
    checkpoints = _checkpoints(model_path, output, pipeline) if args.resume else None
    remote_target = args.target.startswith("ray:") and args.workers != "local"  # found once Ray is up
    if not remote_target:
        target = parse_target(args.target)
        if args.goal is not None:
            from slimgraph.search import check_goal

            check_goal(args.goal, target)
    calib = Path(args.calib) if args.calib else recipe_calib
    if calib is not None:
        check_calibration_file(calib, model_path)

    from slimgraph.report import TerminalProgress
    from slimgraph.workers import parse as parse_workers

    with TerminalProgress(enabled=_show_progress(args)) as progress, parse_workers(args.workers) as workers:
        if remote_target:
            with progress.stage(f"finding {args.target}"):
                target = parse_target(args.target, workers)
        with progress.stage(_loading(model_path)) as say:
            model = load(model_path, stage=say, **_load_options(args))
        if args.goal is not None:
            from slimgraph.search import search

            found = search(model, args.goal, max_drop=max_drop, calib=calib, target=target, backend=args.backend,
                           progress=progress.step, workers=workers)
            model, report = found.chosen.model, found.chosen.report
        else:
            found = None
        with _spill_for(model, output, args) as spill:
            if found is None:
                report = pipeline.run(model, PassContext(target=target, spill=spill, workers=workers,
                                                         checkpoints=checkpoints),
                                      verify=not args.no_verify,
                                      max_drop=max_drop, calib=calib, progress=progress.step,
                                      instruments=progress.passes(len(pipeline)))
            options = {"external_data": args.external_data or None} if args.backend == "onnxruntime" else {}
            if args.style:
                options["style"] = args.style
            with progress.stage(f"writing {output}"):
                artifact = compile(model, backend=args.backend, **options)
                artifact.save(output)
            if checkpoints is not None:
                checkpoints.remove()
        if found is not None:
            from slimgraph.search import write_recipe

            recipe = write_recipe(found, output, calib, target)
    cost = ProcessCost.now()
    for warning in report.warnings:
        _warn(warning)
    if getattr(artifact, "requested_style", None) == "structured" and artifact.style == "fx":
        _warn("model.py is written in the flat fx style: the structured style does not cover If/Loop/Scan subgraphs")
    lowering = getattr(artifact, "report", None)  # (the triton backend: which ops run as kernels, which do not)

    if args.json:
        _print_json(report.to_json() | {"output": str(output), "backend": args.backend, "process": cost.to_json()}
                    | ({"lowering": lowering.to_json()} if lowering is not None else {})
                    | ({"search": found.to_json() | {"recipe": str(recipe)}} if found is not None else {}))
    else:
        from slimgraph.report import print_renderable, render_lowering, render_pipeline_report, render_search

        if found is not None:
            print_renderable(render_search(found))
            print(f"chosen recipe written to {recipe}\n")
        print_renderable(render_pipeline_report(report, output=str(output), cost=cost))
        if lowering is not None:
            print_renderable(render_lowering(lowering))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from slimgraph.api import inspect as inspect_model
    from slimgraph.frontend import load
    from slimgraph.report import TerminalProgress

    with TerminalProgress(enabled=_show_progress(args)) as progress:
        with progress.stage(_loading(Path(args.model))) as say:
            model = load(Path(args.model), stage=say, **_load_options(args))
        with progress.stage("finding structures"):
            summary = inspect_model(model)
    if args.json:
        _print_json(summary.to_json())
    else:
        from slimgraph.report import print_renderable, render_summary

        print_renderable(render_summary(summary))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from slimgraph.api import diff
    from slimgraph.frontend import load
    from slimgraph.report import TerminalProgress

    with TerminalProgress(enabled=_show_progress(args)) as progress:
        models = []
        for path in (Path(args.a), Path(args.b)):
            with progress.stage(_loading(path)) as say:
                models.append(load(path, stage=say, **_load_options(args)))
        with progress.stage("matching nodes and comparing weights"):
            result = diff(*models, weights=args.weights, a_name=args.a, b_name=args.b)
    if args.json:
        _print_json(result.to_json())
    else:
        from slimgraph.report import print_renderable, render_diff

        print_renderable(render_diff(result, depth=args.depth, only=args.only))
    return 0 if result.identical else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from slimgraph.bench import bench, bench_decode, to_json
    from slimgraph.report import TerminalProgress

    batch_text = args.batch or ("1" if args.new_tokens is not None else "1,8")
    try:
        batches = tuple(int(b) for b in batch_text.split(","))
    except ValueError:
        raise SlimgraphError(f"--batch {args.batch}: expected comma-separated integers, e.g. 1,8") from None
    if args.prompt is not None and args.new_tokens is None:
        raise SlimgraphError("--prompt goes with --new-tokens (decode mode)")
    paths = [Path(m) for m in args.models]
    with TerminalProgress(enabled=_show_progress(args)) as progress:
        if args.new_tokens is not None:
            results = bench_decode(paths, new_tokens=args.new_tokens, prompt=args.prompt, prompt_tokens=args.seq,
                                   batches=batches, runs=args.runs or 3, threads=args.threads, progress=progress.step,
                                   loading=progress.stage)
        else:
            results = bench(paths, batches=batches, sequence=args.seq, runs=args.runs or 30, threads=args.threads,
                            progress=progress.step, kv_cache=args.kv_cache, loading=progress.stage)
    if args.json:
        sys.stdout.write(to_json(results) + "\n")
    else:
        from slimgraph.report import print_renderable, render_bench

        print_renderable(render_bench(results))
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from slimgraph.passes import all_pass_classes, get_pass_class, load_plugin
    from slimgraph.passes._infra.pipeline import pass_help

    for module in args.plugin:
        load_plugin(module)
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
    from slimgraph.report import print_renderable, render_pass_list

    print_renderable(render_pass_list(classes))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from slimgraph.frontend import cache
    from slimgraph.measure.stats import human_bytes

    if args.action == "clear":
        freed = cache.clear()
        if args.json:
            _print_json({"cleared": str(cache.cache_root()), "bytes_freed": freed})
        else:
            print(f"cleared {cache.cache_root()}: {human_bytes(freed)} freed")
        return 0
    held = cache.usage()
    if args.json:
        _print_json({"root": str(cache.cache_root()), "enabled": cache.enabled(),
                     "folders": {name: {"entries": n, "bytes": size} for name, (n, size) in held.items()}})
        return 0
    total = sum(size for _, size in held.values())
    state = "" if cache.enabled() else " (off: SLIMGRAPH_NO_CACHE)"
    print(f"{cache.cache_root()}{state}: {human_bytes(total)}")
    for name, (entries, size) in held.items():
        print(f"  {name}: {entries} entr{'y' if entries == 1 else 'ies'}, {human_bytes(size)}")
    print("`slimgraph cache clear` removes it all; exports are made again when next needed")
    return 0


COMMANDS = {"optimize": cmd_optimize, "inspect": cmd_inspect, "diff": cmd_diff, "bench": cmd_bench,
            "passes": cmd_passes, "cache": cmd_cache}


# --- helpers ------------------------------------------------------------------------------


@contextlib.contextmanager
def _library_output_hidden(debug: bool) -> Iterator[None]:
    """Libraries' Python warnings and log records (onnx_ir's "The model is invalid but we will
    still…", a shape-inference traceback, numpy's overflow notes) are not for the user, who gets
    slimgraph's one line instead; `--debug` shows them. Found by fuzzing malformed models."""
    if debug:
        yield
        return
    root, handler = logging.getLogger(), logging.NullHandler()  # a handler on root: no last-resort printing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root.addHandler(handler)
        try:
            yield
        finally:
            root.removeHandler(handler)



def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=_json_default)
    sys.stdout.write("\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "to_json"):
        return value.to_json()
    return str(value)


def _show_progress(args: argparse.Namespace) -> bool:
    """Progress goes to stderr on a terminal only: never into a pipe, a log, or next to --json."""
    return sys.stderr.isatty() and not args.json


def _load_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"kv_cache": True} if getattr(args, "kv_cache", False) else {}


def _loading(path: Path) -> str:
    return f"loading {path.name or path}"


def _warn(message: str) -> None:
    if sys.stderr.isatty():
        from rich.console import Console

        Console(stderr=True).print(f"{PROG}: warning: {message}", style="bold red" if message.startswith("LOW")
                                   else "yellow", markup=False, highlight=False)
    else:
        sys.stderr.write(f"{PROG}: warning: {message}\n")


if __name__ == "__main__":
    raise SystemExit(main())
