"""Terminal rendering (rich) of pipeline reports, model summaries, diffs, bench results and
the pass list, laid out for the width they are printed at; and the progress shown on stderr
while slimgraph works.

Every `render_*` returns a renderable that builds its tables when rich asks for it, with the
width of the console it goes to: long pipeline text wraps at pass and option boundaries
(never inside `method=awq`), long names are shortened from the left (the end of a module
path is the part that tells layers apart). Golden renders at 80 and 120 columns pin this.
"""

from __future__ import annotations

import collections
import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from slimgraph.measure.diff import fold
from slimgraph.measure.fidelity import LEGEND, Fidelity
from slimgraph.measure.process import ProcessCost
from slimgraph.measure.stats import human_bytes, human_count
from slimgraph.measure.summary import ModelSummary
from slimgraph.passes import Instrument, PassRecord, PipelineReport
from slimgraph.passes._infra.options import split_top_level


class _Fit:
    """A renderable built for the width it is printed at."""

    def __init__(self, build: Callable[[int], RenderableType]) -> None:
        self.build = build

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.build(options.max_width)


def _row(table: Table, *cells) -> None:
    """Add a row; strings are plain text (model data like `[batch×8]` is not rich markup)."""
    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells))


def _grid() -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    return grid


def _table(title: str, **options) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, **options)


def shorten_left(text: str, width: int) -> str:
    """`…layer.0.attention.self.query.weight`: the end of a long name is what tells it apart."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def wrap_pipeline(text: str, width: int) -> str:
    """Pipeline or pass text in lines of at most `width`, broken after a pass's `,` or `{` or
    an option's `,`; continuation lines of a pass are indented by two."""
    lines: list[str] = []
    passes = [p.strip() for p in split_top_level(text, ",") if p.strip()]
    for i, pass_text in enumerate(passes):
        pieces = [pass_text + ("," if i < len(passes) - 1 else "")]
        name, brace, body = pass_text.partition("{")
        if brace:
            options = split_top_level(body[:-1], ",")
            pieces = [name + "{"] + [o + "," for o in options[:-1]] + [options[-1] + "}"]
            pieces[-1] += "," if i < len(passes) - 1 else ""
        line = ""
        for piece in pieces:
            if line and len(line) + len(piece) > width:
                lines.append(line)
                line = "  " + piece
            else:
                line += piece
        lines.append(line)
    return "\n".join(lines)


def _change(before: float, after: float, fmt) -> str:
    if before == after:
        return f"{fmt(before)}"
    ratio = f" ({after / before:.2f}x)" if before else ""
    return f"{fmt(before)} → {fmt(after)}{ratio}"


# --- optimize -----------------------------------------------------------------------------


def _fidelity_cell(record) -> Text:
    fidelity: Fidelity | None = record.fidelity
    if fidelity is None:
        return Text("not verified", style="dim")
    if record.exact:
        check = record.exact_check or fidelity
        text = Text(f"exact: {check.max_rel_error:.1e}")
        if check is not fidelity:  # held to the outputs before it; say where it stands overall
            text.append(f"\ncos {fidelity.cosine:.5f} overall", style="dim")
        return text
    worst = fidelity.worst_cosine_output()
    lines = [f"cos {fidelity.cosine:.5f}", f"rel L2 {fidelity.rel_l2:.2e}"]
    if fidelity.top1 is not None:
        lines.append(f"top-1 {fidelity.top1:.1%}")
    if len(fidelity.outputs) > 1:
        lines.append(f"worst: {worst.name}")
    if worst.view:
        lines.append(worst.view)
    return Text("\n".join(lines), style="bold red" if fidelity.cosine < 0.9 else "")


def _verified_on(report: PipelineReport) -> Text:
    if not report.verified:
        return Text("not verified (--no-verify)", style="bold red")
    text = Text(report.verify_source or report.inputs_source)
    if report.shared_inputs:
        text.append("\nthe samples the passes calibrated on: the fidelity is optimistic "
                    "(give --calib with 4 or more samples to hold some out)", style="yellow")
    return text


def render_pipeline_report(report: PipelineReport, output: str | None = None, cost: ProcessCost | None = None) -> _Fit:
    """The summary panel, one row per pass (time, fidelity, what it did), a legend, and the
    changes each pass made by module path; `cost`: the command's peak memory and I/O."""

    def build(width: int) -> Group:
        before, after = report.before, report.after
        value_width = max(width - 20, 20)  # the panel's borders and the label column
        summary = _grid()
        _row(summary, "pipeline", wrap_pipeline(report.pipeline, value_width))
        _row(summary, "size", _change(before.bytes, after.bytes, human_bytes))
        _row(summary, "nodes", _change(before.nodes, after.nodes, lambda n: f"{n:,}"))
        _row(summary, "parameters", _change(before.parameters, after.parameters, human_count))
        _row(summary, "FLOPs (est.)", _change(before.flops, after.flops, human_count))
        if report.records and any(r.calibrated for r in report.records):
            _row(summary, "calibrated on", report.inputs_source)
        _row(summary, "verified on", _verified_on(report))
        if report.target:
            _row(summary, "target", report.target)
        if output:
            data = Path(f"{output}.data")  # (large weights: slimgraph.backends.onnxruntime.EXTERNAL_DATA_BYTES)
            _row(summary, "written", f"{output} (+ {data.name})" if data.is_file() else output)
        if cost is not None:
            _row(summary, "peak memory", f"{human_bytes(cost.peak_rss)} RSS" + (
                f" (export, a child process: {human_bytes(cost.child_peak_rss)})" if cost.child_peak_rss else ""))
            if cost.read is not None:
                _row(summary, "disk I/O", f"{human_bytes(cost.read)} read, {human_bytes(cost.written)} written")

        longest = max((len(r.text) for r in report.records), default=8)
        pass_width = min(max(longest, 12), max(16, width // 4))
        passes = _table("passes")
        passes.add_column("pass", no_wrap=True, min_width=pass_width, max_width=pass_width)
        passes.add_column("time", justify="right", no_wrap=True)
        passes.add_column("fidelity", no_wrap=True)
        passes.add_column("what it did", overflow="fold", ratio=1)
        for record in report.records:
            seconds = f"{record.seconds:.2f} s" if record.seconds is not None else "-"
            did = Text("\n".join(f"{k}: {v}" for k, v in record.stats.items()) if record.modified
                       else "nothing to change")
            for warning in record.warnings:
                if did.plain:
                    did.append("\n")
                did.append(f"warning: {_warning_head(warning, record)}",
                           style="bold red" if warning.startswith("LOW") else "yellow")
            _row(passes, wrap_pipeline(record.text, pass_width), seconds, _fidelity_cell(record), did)
        parts: list = [Panel(summary, title="slimgraph optimize", expand=False), passes]
        if report.verified:
            parts.append(Text(LEGEND, style="dim"))
        for record in report.records:
            if record.changes and record.changes.nodes:
                label = record.text if len(record.text) + 16 <= width else record.name
                parts.append(render_change_tree(fold(record.changes.nodes), 2, f"changes made by {label}", width))
        return Group(*parts)

    return _Fit(build)


# --- inspect ------------------------------------------------------------------------------

OPS_SHOWN = 12
TENSORS_SHOWN = 8


def _notes(summary: ModelSummary) -> list[str]:
    stats = summary.stats
    notes = []
    if stats.generated_tensors:
        notes.append(
            f"{stats.generated_tensors} tensors ({human_count(stats.generated_values)} values) are built at run time by "
            "ConstantOfShape: parameters and size count only what the file stores, and layers whose weights "
            "are built this way are not counted as linear layers"
        )
    if stats.flops_unknown_nodes:
        notes.append(f"FLOPs leave out {stats.flops_unknown_nodes} MatMul/Gemm/Conv nodes of unknown shape")
    return notes


def render_summary(summary: ModelSummary) -> _Fit:
    """`slimgraph inspect`: the model's statistics, structures found, ops and largest tensors."""

    def build(width: int) -> Group:
        stats, found = summary.stats, summary.structures
        head = _grid()
        _row(head, "producer", summary.producer or "-")
        _row(head, "opset", ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in summary.opset.items()))
        _row(head, "inputs", ", ".join(f"{k}: {v}" for k, v in stats.inputs.items()))
        _row(head, "outputs", ", ".join(f"{k}: {v}" for k, v in stats.outputs.items()))
        _row(head, "parameters", f"{human_count(stats.parameters)} ({human_bytes(stats.bytes)})")
        _row(head, "by dtype", ", ".join(f"{k} {human_bytes(v)}" for k, v in stats.bytes_by_dtype.items()) or "-")
        _row(head, "nodes", f"{stats.nodes:,}")
        bound = ", ".join(f"{name} = {value}" for name, value in stats.symbolic_dims.items())
        _row(head, "FLOPs (est.)", human_count(stats.flops) + (f" (at {bound})" if bound else ""))
        for note in _notes(summary):
            _row(head, "note", Text(note, style="yellow"))

        # One section per kind of thing found; dependency groups are a section of their own.
        structures = _table("structures")
        structures.add_column("kind", no_wrap=True)
        structures.add_column("found", overflow="fold")
        if found.blocks:
            where = f" '{found.blocks.prefix}'" if found.blocks.prefix else ""
            _row(structures, "blocks", f"{found.blocks.count}{where} (from {found.blocks.source})")
        unseen = " (weights built by ConstantOfShape are not seen; see the note)" if stats.generated_tensors else ""
        _row(structures, "linear layers", f"{len(found.linears)}{unseen}")
        for emb in found.embeddings:
            _row(structures, "embedding", f"{emb.name}: {emb.num_embeddings} × {emb.dim}")
        _add_grouped(structures, "attention", [
            f"{a.heads} heads × {a.head_dim}"
            + (f", {a.kv_heads} KV heads ({a.kv_groups} per group)" if a.kv_groups > 1 else "")
            for a in found.attention
        ])
        _add_grouped(structures, "FFN", [
            f"{f.hidden}→{f.inner}→{f.hidden} {f.activation}" + (" gated" if f.gate else "") for f in found.ffns
        ])
        _add_grouped(structures, "MoE", [
            f"{m.experts} × ({m.hidden}→{m.expert_inner}) {m.activation}, top-{m.top_k}"
            + (f" + shared {m.shared}" if m.shared else "") + f" ({m.form})" for m in found.moes
        ])
        for head_linear in found.lm_heads:
            _row(structures, "LM head", f"{head_linear.name}: {head_linear.in_features}→{head_linear.out_features}")
        if found.blocks and found.blocks.blocks:
            _row(structures, "block handles", f"{len(found.blocks.blocks)} (residual stream in and out)")

        groups = _table("dependency groups")
        groups.add_column("kind", no_wrap=True)
        groups.add_column("found", overflow="fold")
        for kind in dict.fromkeys(g.kind for g in found.groups):
            members = found.groups_of(kind)
            sizes = collections.Counter(g.size for g in members)
            shown = ", ".join(f"{n} × {size}" if n > 1 else str(size) for size, n in sizes.items())
            _row(groups, kind, f"{len(members)} ({shown} {members[0].unit})")
        if found.not_prunable:
            _row(groups, "none", f"{len(found.not_prunable)}, e.g. {found.not_prunable[0]}")

        ops = _table("ops")
        ops.add_column("op", no_wrap=True)
        ops.add_column("count", justify="right")
        histogram = list(stats.op_histogram.items())
        for op, count in histogram[:OPS_SHOWN]:
            _row(ops, op, str(count))
        rest = histogram[OPS_SHOWN:]
        if rest:
            _row(ops, Text(f"+{len(rest)} more", style="dim"), Text(str(sum(c for _, c in rest)), style="dim"))

        tensors = _table("largest tensors")
        shapes = [f"{t.dtype}[{'×'.join(map(str, t.shape))}]" for t in summary.largest_tensors[:TENSORS_SHOWN]]
        name_width = max(16, width - max((len(s) for s in shapes), default=8) - 14)
        tensors.add_column("name", no_wrap=True, max_width=name_width)
        tensors.add_column("shape", no_wrap=True)
        tensors.add_column("size", justify="right", no_wrap=True)
        for t, shape in zip(summary.largest_tensors[:TENSORS_SHOWN], shapes):
            _row(tensors, shorten_left(t.name, name_width), shape, human_bytes(t.bytes))
        sections = [Panel(head, title="slimgraph inspect", expand=False), structures]
        if found.groups or found.not_prunable:
            sections.append(groups)
        return Group(*sections, ops, tensors)

    return _Fit(build)


def _add_grouped(table: Table, kind: str, descriptions: list[str]) -> None:
    """One row per distinct description, with its count ('6 × 12 heads × 32')."""
    counts: dict[str, int] = {}
    for d in descriptions:
        counts[d] = counts.get(d, 0) + 1
    for description, count in counts.items():
        _row(table, kind, f"{count} × {description}" if count > 1 else description)


def print_renderable(renderable, console: Console | None = None) -> None:
    (console or Console()).print(renderable)


# --- --goal's candidates --------------------------------------------------------------------


def _packed_pipeline(text: str, width: int) -> str:
    """`wrap_pipeline`, with whole passes joined on one line while they fit."""
    lines: list[str] = []
    for line in wrap_pipeline(text, width).splitlines():
        if lines and lines[-1].endswith(",") and not line.startswith(" ") and len(lines[-1]) + len(line) <= width:
            lines[-1] += line
        else:
            lines.append(line)
    return "\n".join(lines)


def render_search(result) -> _Fit:
    """`--goal`: one row per candidate pipeline (wrapped to the width), the chosen one marked; a
    candidate left out says why under its pipeline."""

    def build(width: int) -> Group:
        batches = sorted({b for c in result.candidates for b in c.latency})
        title = Text(f"--goal {result.goal}: {len(result.candidates)} candidates, budget 1 − cosine ≤ "
                     f"{result.max_drop}; latency as a ratio to the original (runs alternating)")
        figures = 7 + 17 + 8 * len(batches)  # cosine, size (with its ratio), one column per batch
        pipeline_width = max(24, width - figures - 2 - 2 * (3 + len(batches)))
        table = _table("", collapse_padding=True)
        table.add_column("", no_wrap=True, width=1)
        table.add_column("pipeline", max_width=pipeline_width, overflow="fold")
        for column in ["cosine", "size", *(f"b{b}" for b in batches)]:
            table.add_column(column, justify="right", no_wrap=True)
        for c in result.candidates:
            mark = "→" if c is result.chosen else ""
            pipeline = Text(_packed_pipeline(c.pipeline, pipeline_width), style="bold" if mark else "")
            if c.status != "ok":
                pipeline.append("\n" + c.status, style="dim")
                _row(table, mark, pipeline, *([""] * (2 + len(batches))))
                continue
            size = f"{human_bytes(c.bytes)} ({c.bytes / result.original_bytes:.2f}x)"
            _row(table, mark, pipeline, f"{c.cosine:.4f}", size, *(f"{c.latency[b]:.2f}x" for b in batches))
        return Group(title, table)

    return _Fit(build)


# --- the Triton backend's lowering ----------------------------------------------------------


def render_lowering(report) -> Group:
    """`--backend triton`: which nodes run as Triton kernels and which on PyTorch, wrapped to the
    width; the nodes left to PyTorch folded by op and reason (a few names each)."""
    lines = [Text(line) for line in report.summary()]
    left: dict[tuple[str, str], list[str]] = {}
    for op, node, why in report.left:
        left.setdefault((op, why), []).append(node)
    for (op, why), nodes in left.items():
        named = ", ".join(nodes[:3]) + (f", … ({len(nodes)} in all)" if len(nodes) > 3 else "")
        lines.append(Text(f"left to PyTorch: {op} ×{len(nodes)}: {why} ({named})" if len(nodes) > 1
                          else f"left to PyTorch: {op} {nodes[0]}: {why}", style="dim"))
    return Group(*lines)


# --- pass list ----------------------------------------------------------------------------


def render_pass_list(classes) -> _Fit:
    """`slimgraph passes`: name, exact or lossy, and the rewrite, wrapped to the width."""

    def build(width: int) -> Table:
        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        table.add_column("pass", no_wrap=True)
        table.add_column("kind", no_wrap=True)
        table.add_column("rewrite", overflow="fold", ratio=1)
        for cls in classes:
            _row(table, cls.name, "exact" if cls.exact else "lossy", cls.summary())
        return table

    return _Fit(build)


# --- diff ---------------------------------------------------------------------------------


def _delta(a: float, b: float, fmt) -> str:
    if a == b:
        return fmt(a)
    sign = "+" if b > a else "-"
    ratio = f", {b / a:.2f}x" if a else ""
    return f"{fmt(a)} → {fmt(b)} ({sign}{fmt(abs(b - a))}{ratio})"


def _segments(module: str) -> list[str]:
    """Module path segments, a block index kept with its parent: encoder.layer.0–5.x → [encoder, layer.0–5, x]."""
    parts: list[str] = []
    for part in module.split("."):
        if parts and (part[:1].isdigit() or part.startswith("{")):
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return parts


_KIND_STYLE = {"added": "green", "removed": "red", "replaced": "yellow", "changed": "cyan"}


MAX_TREE_LINES = 40  # about a screenful; --json has every change


def render_change_tree(changes, depth: int, title: str, width: int | None = None):
    """Changes grouped under the first `depth` segments of their module path, at most `MAX_TREE_LINES`
    lines, then how many more there are."""
    from rich.tree import Tree

    tree = Tree(Text(title, style="bold"))
    groups: dict[str, list] = {}
    for change in changes:
        segments = _segments(change.module)
        head, rest = ".".join(segments[:depth]), ".".join(segments[depth:])
        groups.setdefault(head, []).append((rest, change))
    lines = 0
    for number, (head, members) in enumerate(groups.items()):
        if lines + 1 + len(members) > MAX_TREE_LINES and lines:
            left = sum(len(m) for m in list(groups.values())[number:])
            tree.add(Text(f"{left} more change{'s' if left > 1 else ''} (--json for all)", style="dim"))
            break
        lines += 1 + len(members)
        branch = tree.add(Text(shorten_left(head, width - 8) if width else head or "(root)", style="bold"))
        for rest, change in members:
            line = Text()
            line.append(f"{change.kind:<8} ", style=_KIND_STYLE[change.kind])
            if rest:
                line.append(f"{rest}: ")
            line.append(change.describe())
            if change.count > 1:
                line.append(f"  ×{change.count}", style="bold")
            branch.add(line)
    return tree


def _weights_cell(result) -> Text:
    if not result.weights:
        how = "values" if result.values_compared else "fingerprints"
        return Text(f"equal ({result.weights_compared} tensors, by {how})")
    kinds: dict[str, int] = {}
    for w in result.weights:
        kinds[w.kind] = kinds.get(w.kind, 0) + 1
    text = Text(f"differ in {len(result.weights)} tensor{'s' if len(result.weights) > 1 else ''}", style="bold")
    text.append(" (" + ", ".join(f"{n} {kind}" for kind, n in kinds.items()) + ")")
    if not result.values_compared and kinds.get("changed"):
        text.append("; --weights for the relative L2 of each", style="dim")
    return text


def _fold_weights(weights) -> list[tuple[str, str, str, int]]:
    """(kind, name, what, count) lines, names that differ only in block indices folded."""
    from slimgraph.measure.diff import _INDEX, _ranges

    groups: dict[tuple, list] = {}
    for w in weights:
        groups.setdefault((_INDEX.sub("#", w.name), w.kind, w.detail), []).append(w)
    lines = []
    for (template, kind, detail), members in groups.items():
        name = members[0].name
        if len(members) > 1:
            columns = list(zip(*([int(i) for i in _INDEX.findall(m.name)] for m in members)))
            parts = iter(_ranges(list(c)) if len(set(c)) > 1 else str(c[0]) for c in columns)
            name = re.sub("#", lambda _: next(parts), template)
        values = [m.rel_l2 for m in members if m.rel_l2 is not None]
        what = detail or "×".join(map(str, members[0].shape))
        if values:
            low, high = min(values), max(values)
            what += f", rel L2 {low:.3e}" if low == high else f", rel L2 {low:.2e}–{high:.2e}"
        lines.append((kind, name, what, len(members)))
    return lines


def render_weight_tree(weights, title: str = "weights that differ"):
    from rich.tree import Tree

    tree = Tree(Text(title, style="bold"))
    for kind, name, what, count in _fold_weights(weights):
        line = Text()
        line.append(f"{kind:<8} ", style=_KIND_STYLE[kind])
        line.append(f"{name}: {what}")
        if count > 1:
            line.append(f"  ×{count}", style="bold")
        tree.add(line)
    return tree


def render_diff(result, depth: int = 2, only=None) -> _Fit:
    """`slimgraph diff`: the summary, op counts, changes by module, rewiring, inputs and
    outputs, and the weights that differ."""

    def build(width: int) -> Group:
        a, b = result.a_stats, result.b_stats
        value_width = max(width - 20, 20)
        head = _grid()
        _row(head, "A", shorten_left(result.a_name, value_width))
        _row(head, "B", shorten_left(result.b_name, value_width))
        _row(head, "parameters", _delta(a.parameters, b.parameters, human_count))
        _row(head, "size", _delta(a.bytes, b.bytes, human_bytes))
        _row(head, "nodes", _delta(a.nodes, b.nodes, lambda n: f"{n:,}"))
        _row(head, "FLOPs (est.)", _delta(a.flops, b.flops, human_count))
        m = result.matched
        _row(head, "matched", f"{sum(m.get(k, 0) for k in ('name', 'signature', 'structure'))} of {m['a_nodes']} / "
                                f"{m['b_nodes']} nodes (name {m['name']}, signature {m['signature']}, "
                                f"structure {m['structure']})")
        _row(head, "weights", _weights_cell(result))
        _row(head, "verdict", Text("identical", style="green") if result.identical else Text("different", style="bold"))
        parts: list = [Panel(head, title="slimgraph diff", expand=False)]
        if depth <= 0:
            return Group(*parts)

        delta = result.op_delta()
        if delta:
            ops = _table("op counts")
            ops.add_column("op", no_wrap=True)
            ops.add_column("A", justify="right")
            ops.add_column("B", justify="right")
            ops.add_column("Δ", justify="right")
            for op, (ca, cb) in delta.items():
                style = "green" if cb > ca else "red"
                _row(ops, op, str(ca), str(cb), Text(f"{cb - ca:+d}", style=style))
            parts.append(ops)
        changes = result.folded(only)
        if changes:
            parts.append(render_change_tree(changes, depth, "changes by module", width))
        if result.rewired and only in (None, "changed"):
            parts.append(render_change_tree(fold(result.rewired), depth, "rewired inputs", width))
        for title, lines in (("inputs", result.inputs), ("outputs", result.outputs)):
            if lines:
                table = _table(title, show_header=False)
                table.add_column(overflow="fold")
                for line in lines:
                    _row(table, line)
                parts.append(table)
        if result.weights and only in (None, "changed"):
            parts.append(render_weight_tree(result.weights))
        return Group(*parts)

    return _Fit(build)


# --- bench --------------------------------------------------------------------------------

# How each B / A ratio reads: its label and whether a value below 1 is better.
_RATIO_LABELS = {
    "file_bytes": ("file size", "smaller", "larger"),
    "peak_rss_mb": ("peak memory", "less", "more"),
    "p50": ("latency p50", "faster", "slower"),
    "throughput": ("throughput", "slower", "faster"),  # above 1 is better
    "first_token": ("time to first token", "faster", "slower"),
    "tokens_per_s": ("decode tokens/s", "slower", "faster"),  # above 1 is better
}


def ratio_label(key: str, value: float, interval: tuple[float, float] | None = None) -> tuple[str, str]:
    """(`latency p50, batch 1`, `1.17x (slower, 1.12–1.22)`) for a `ratios` key, its B / A value and
    its 95% interval; a timing whose interval holds 1.0 is `within noise`, whichever way it leans."""
    measure, _, batch = key.partition("_batch")
    label, below, above = _RATIO_LABELS[measure]
    if batch:
        label += f", batch {batch}"
    spread = f", {interval[0]:.2f}–{interval[1]:.2f}" if interval else ""
    if interval and interval[0] <= 1 <= interval[1]:
        return label, f"{value:.2f}x (within noise{spread})"
    if abs(value - 1) < 0.005:
        return label, f"{value:.2f}x (same{spread})"
    return label, f"{value:.2f}x ({below if value < 1 else above}{spread})"


def render_bench(results) -> _Fit:
    """`slimgraph bench`: latency, throughput, size and memory per model and batch; with two
    models, B / A ratios labelled with the direction."""
    from slimgraph.bench import ratio_intervals, ratios

    def build(width: int) -> Group:
        name_width = max(12, width - 60)  # what the six figure columns leave
        if any(result.decode for result in results):
            return finish(_decode_table(results, name_width))
        table = _table("ONNX Runtime (CPU)", collapse_padding=True)
        table.add_column("model", no_wrap=True, min_width=min(name_width, 12), max_width=name_width)
        for column in ("batch", "p50", "p90", "samples/s", "file", "peak RSS"):
            table.add_column(column, justify="right", no_wrap=True)
        for result in results:
            name = shorten_left(Path(result.name).name, name_width)
            rows = [(lat.batch, f"{lat.p50_ms:.2f} ms", f"{lat.p90_ms:.2f} ms", f"{lat.throughput:,.1f}")
                    for lat in result.latency]
            rows += [(batch, Text("not run", style="yellow"), "", "") for batch in result.skipped]
            rows.sort(key=lambda r: r[0])
            for i, (batch, p50, p90, throughput) in enumerate(rows):
                first = i == 0
                _row(table, name if first else "", str(batch), p50, p90, throughput,
                     human_bytes(result.file_bytes) if first else "",
                     f"{result.peak_rss_mb:.1f} MB" if first and result.peak_rss_mb is not None else "")
        return finish(table)

    def finish(table: Table) -> Group:
        parts: list = [table]
        skipped = {(batch, reason) for r in results for batch, reason in r.skipped.items()}
        for batch, reason in sorted(skipped):
            parts.append(Text(f"batch {batch} not run: {reason}", style="yellow"))
        ratio = ratios(results)
        if ratio:
            b_name, a_name = Path(results[1].name).name, Path(results[0].name).name
            parts.append(Text(f"\nB / A: B = {b_name}, A = {a_name} (runs alternate)", style="bold"))
            grid = Table(box=None, pad_edge=False, show_header=False)
            grid.add_column("measure", no_wrap=True)
            grid.add_column("B / A", no_wrap=True)
            intervals = ratio_intervals(results)
            for key, value in ratio.items():
                _row(grid, *ratio_label(key, value, intervals.get(key)))
            parts.append(grid)
        return Group(*parts)

    return _Fit(build)


def _decode_table(results, name_width: int) -> Table:
    """`bench --new-tokens`: greedy generation per model and batch size."""
    table = _table("ONNX Runtime (CPU), greedy generation", collapse_padding=True)
    table.add_column("model", no_wrap=True, min_width=min(name_width, 12), max_width=name_width)
    for column in ("batch", "prompt", "new", "first token", "tokens/s", "KV cache", "file"):
        table.add_column(column, justify="right", no_wrap=True)
    for result in results:
        name = shorten_left(Path(result.name).name, name_width)
        for i, speed in enumerate(result.decode):
            _row(table, name if i == 0 else "", str(speed.batch), str(speed.prompt_tokens), str(speed.new_tokens),
                 f"{speed.first_token_ms:.1f} ms", f"{speed.tokens_per_s:,.1f}", "yes" if speed.kv_cache else "no",
                 human_bytes(result.file_bytes) if i == 0 else "")
    return table


def _warning_head(warning: str, record: PassRecord) -> str:
    """A warning as the passes table shows it: what it is about (`LOW FIDELITY`), without the pass it
    names (the row does) or its detail. The whole text is on stderr, above the tables, and in --json."""
    text = warning.removeprefix(f"{record.name}: ").replace(f" after '{record.text}'", "")
    return text.split("; ")[0].split(": ")[0] + " (see the warning above)"


# --- progress -----------------------------------------------------------------------------


class TerminalProgress:
    """What slimgraph is doing, on stderr: a line per stage (loading, writing), a bar over the
    passes, and one over the layers of a pass that reports them (`PassContext.track`).

    Draws nothing when disabled (stderr is not a terminal, or --json); every method is then
    a no-op, so callers need no conditions (`stage` then yields None, which `load` takes).
    """

    def __init__(self, enabled: bool, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console
        self._progress = None
        self._layer_task = None

    def __enter__(self) -> TerminalProgress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
            from rich.table import Column

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}", markup=False,  # paths and options the user typed: `[/abs/path]`
                           table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                BarColumn(bar_width=20),
                TextColumn("{task.fields[count]}", table_column=Column(no_wrap=True, min_width=7)),
                TimeElapsedColumn(),
                console=self.console or Console(stderr=True),
                transient=True,
                expand=True,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    @contextlib.contextmanager
    def stage(self, what: str) -> Iterator[Callable[[str], None] | None]:
        """An open-ended step (loading a model, writing it): a spinner and the time it takes. It yields
        a function that says which part of the step is running (`loading x: from the export cache`),
        or None when nothing is drawn (`load(stage=None)` then exports in this process)."""
        if self._progress is None:
            yield None
            return
        progress = self._progress
        task = progress.add_task(what, total=None, count="")
        progress.refresh()

        def say(detail: str) -> None:
            progress.update(task, description=f"{what}: {detail}")
            progress.refresh()

        try:
            yield say
        finally:
            progress.remove_task(task)

    def step(self, what: str, done: int, total: int) -> None:
        """A `ProgressHook`: the layers of a pass, the runs of a benchmark."""
        if self._progress is None:
            return
        if self._layer_task is None:
            self._layer_task = self._progress.add_task(what, total=total, count="")
        self._progress.update(self._layer_task, description=f"  {what}", completed=done, total=total,
                              count=f"{done}/{total}")
        if done >= total:
            self._progress.remove_task(self._layer_task)
            self._layer_task = None
        self._progress.refresh()

    def passes(self, total: int) -> list[Instrument]:
        """The instrument that moves the bar over the passes (none when disabled)."""
        if self._progress is None:
            return []
        progress = self._progress
        task = progress.add_task("running the original model (for verification)", total=total, count=f"0/{total}")

        class PassBar(Instrument):
            done = 0

            def before_pass(self, pass_, model, ctx):
                progress.update(task, description=f"pass {pass_.to_text()}")
                progress.refresh()

            def after_pass(self, pass_, model, ctx, record):
                self.done += 1
                progress.update(task, completed=self.done, count=f"{self.done}/{total}")

            def after_pipeline(self, model, ctx, report):
                progress.remove_task(task)

        return [PassBar()]
