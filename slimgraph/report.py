"""Terminal rendering (rich) of pipeline reports, model summaries and the pass list."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from slimgraph.ir.diff import fold
from slimgraph.ir.fidelity import Fidelity
from slimgraph.ir.stats import human_bytes, human_count
from slimgraph.ir.summary import ModelSummary
from slimgraph.passes import PipelineReport


def _row(table: Table, *cells) -> None:
    """Add a row; strings are plain text (model data like `[batch×8]` is not rich markup)."""
    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells))


def _change(before: float, after: float, fmt) -> str:
    if before == after:
        return f"{fmt(before)}"
    ratio = f" ({after / before:.2f}x)" if before else ""
    return f"{fmt(before)} → {fmt(after)}{ratio}"


def _fidelity_cell(fidelity: Fidelity | None, exact: bool) -> str:
    if fidelity is None:
        return "not verified"
    if exact:
        return f"exact (max rel err {fidelity.max_rel_error:.1e})"
    text = f"cos {fidelity.cosine:.5f} · rel L2 {fidelity.rel_l2:.2e}"
    if fidelity.top1 is not None:
        text += f" · top-1 {fidelity.top1:.1%}"
    return text


def render_pipeline_report(report: PipelineReport, output: str | None = None) -> Group:
    before, after = report.before, report.after
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    _row(summary, "pipeline", report.pipeline)
    _row(summary, "size", _change(before.bytes, after.bytes, human_bytes))
    _row(summary, "nodes", _change(before.nodes, after.nodes, lambda n: f"{n:,}"))
    _row(summary, "parameters", _change(before.parameters, after.parameters, human_count))
    _row(summary, "FLOPs (est.)", _change(before.flops, after.flops, human_count))
    _row(summary, "verified on", report.inputs_source if report.verified else "not verified (--no-verify)")
    if output:
        _row(summary, "written", output)

    passes = Table(title="passes", title_justify="left", expand=False)
    passes.add_column("pass", overflow="fold")
    passes.add_column("time", justify="right")
    passes.add_column("fidelity vs original")
    passes.add_column("what it did", overflow="fold")
    for record in report.records:
        seconds = f"{record.seconds:.2f} s" if record.seconds is not None else "-"
        did = "\n".join(f"{k}: {v}" for k, v in record.stats.items()) if record.modified else "nothing to change"
        did += "".join(f"\nwarning: {w}" for w in record.warnings)
        _row(passes, record.text, seconds, _fidelity_cell(record.fidelity, record.exact), did)
    parts = [Panel(summary, title="slimgraph optimize", expand=False), passes]
    for record in report.records:
        if record.changes and record.changes.nodes:
            parts.append(render_change_tree(fold(record.changes.nodes), 2, f"changes made by {record.text}"))
    return Group(*parts)


def render_summary(summary: ModelSummary) -> Group:
    stats, found = summary.stats, summary.structures
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    _row(head, "producer", summary.producer or "-")
    _row(head, "opset", ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in summary.opset.items()))
    _row(head, "inputs", ", ".join(f"{k}: {v}" for k, v in stats.inputs.items()))
    _row(head, "outputs", ", ".join(f"{k}: {v}" for k, v in stats.outputs.items()))
    _row(head, "parameters", f"{human_count(stats.parameters)} ({human_bytes(stats.bytes)})")
    _row(head, "by dtype", ", ".join(f"{k} {human_bytes(v)}" for k, v in stats.bytes_by_dtype.items()) or "-")
    _row(head, "nodes", f"{stats.nodes:,}")
    _row(head, "FLOPs (est.)", f"{human_count(stats.flops)} (symbolic dims: batch 1, sequence 128)")

    structures = Table(title="structures", title_justify="left")
    structures.add_column("kind")
    structures.add_column("found")
    if found.blocks:
        where = f" '{found.blocks.prefix}'" if found.blocks.prefix else ""
        _row(structures, "blocks", f"{found.blocks.count}{where} (from {found.blocks.source})")
    _row(structures, "linear layers", str(len(found.linears)))
    for emb in found.embeddings:
        _row(structures, "embedding", f"{emb.name}: {emb.num_embeddings} × {emb.dim}")
    _add_grouped(structures, "attention", [
        f"{a.heads} heads × {a.head_dim}" + (f", {a.kv_heads} KV heads ({a.kv_groups} per group)" if a.kv_groups > 1 else "")
        for a in found.attention
    ])
    _add_grouped(structures, "FFN", [
        f"{f.hidden}→{f.inner}→{f.hidden} {f.activation}" + (" gated" if f.gate else "") for f in found.ffns
    ])
    for head_linear in found.lm_heads:
        _row(structures, "LM head", f"{head_linear.name}: {head_linear.in_features}→{head_linear.out_features}")

    ops = Table(title="ops", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in list(stats.op_histogram.items())[:12]:
        _row(ops, op, str(count))

    tensors = Table(title="largest tensors", title_justify="left")
    tensors.add_column("name")
    tensors.add_column("shape")
    tensors.add_column("size", justify="right")
    for t in summary.largest_tensors[:8]:
        _row(tensors, t.name, f"{t.dtype}[{'×'.join(map(str, t.shape))}]", human_bytes(t.bytes))
    return Group(Panel(head, title="slimgraph inspect", expand=False), structures, ops, tensors)


def _add_grouped(table: Table, kind: str, descriptions: list[str]) -> None:
    """One row per distinct description, with its count ('6 × 12 heads × 32')."""
    counts: dict[str, int] = {}
    for d in descriptions:
        counts[d] = counts.get(d, 0) + 1
    for description, count in counts.items():
        _row(table, kind, f"{count} × {description}" if count > 1 else description)


def print_renderable(renderable, console: Console | None = None) -> None:
    (console or Console()).print(renderable)


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


def render_change_tree(changes, depth: int, title: str):
    """Changes grouped under the first `depth` segments of their module path."""
    from rich.tree import Tree

    tree = Tree(Text(title, style="bold"))
    groups: dict[str, list] = {}
    for change in changes:
        segments = _segments(change.module)
        head, rest = ".".join(segments[:depth]), ".".join(segments[depth:])
        groups.setdefault(head, []).append((rest, change))
    for head, members in groups.items():
        branch = tree.add(Text(head or "(root)", style="bold"))
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


def render_diff(result, depth: int = 2, only=None) -> Group:
    a, b = result.a_stats, result.b_stats
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    _row(head, "A", result.a_name)
    _row(head, "B", result.b_name)
    _row(head, "parameters", _delta(a.parameters, b.parameters, human_count))
    _row(head, "size", _delta(a.bytes, b.bytes, human_bytes))
    _row(head, "nodes", _delta(a.nodes, b.nodes, lambda n: f"{n:,}"))
    _row(head, "FLOPs (est.)", _delta(a.flops, b.flops, human_count))
    m = result.matched
    _row(head, "matched", f"{sum(m.get(k, 0) for k in ('name', 'signature', 'structure'))} of {m['a_nodes']} / "
                            f"{m['b_nodes']} nodes (name {m['name']}, signature {m['signature']}, "
                            f"structure {m['structure']})")
    _row(head, "weights", "not compared (use --weights)" if result.weights is None else
                 f"{len(result.weights)} changed" if result.weights else "equal")
    _row(head, "verdict", "identical" if result.identical else "different")
    parts: list = [Panel(head, title="slimgraph diff", expand=False)]
    if depth <= 0:
        return Group(*parts)

    delta = result.op_delta()
    if delta:
        ops = Table(title="op counts", title_justify="left")
        ops.add_column("op")
        ops.add_column("A", justify="right")
        ops.add_column("B", justify="right")
        ops.add_column("Δ", justify="right")
        for op, (ca, cb) in delta.items():
            style = "green" if cb > ca else "red"
            _row(ops, op, str(ca), str(cb), Text(f"{cb - ca:+d}", style=style))
        parts.append(ops)
    changes = result.folded(only)
    if changes:
        parts.append(render_change_tree(changes, depth, "changes by module"))
    if result.rewired and only in (None, "changed"):
        parts.append(render_change_tree(fold(result.rewired), depth, "rewired inputs"))
    for title, lines in (("inputs", result.inputs), ("outputs", result.outputs)):
        if lines:
            table = Table(title=title, title_justify="left", show_header=False)
            table.add_column()
            for line in lines:
                _row(table, line)
            parts.append(table)
    if result.weights:
        weights = Table(title="weights changed", title_justify="left")
        weights.add_column("initializer")
        weights.add_column("shape")
        weights.add_column("rel L2", justify="right")
        for w in result.weights:
            _row(weights, w.name, "×".join(map(str, w.shape)), f"{w.rel_l2:.3e}")
        parts.append(weights)
    return Group(*parts)


# --- bench --------------------------------------------------------------------------------


def render_bench(results) -> Group:
    from slimgraph.bench import ratios

    table = Table(title="ONNX Runtime (CPU)", title_justify="left")
    table.add_column("model")
    table.add_column("batch", justify="right")
    table.add_column("p50", justify="right")
    table.add_column("p90", justify="right")
    table.add_column("samples/s", justify="right")
    table.add_column("file", justify="right")
    table.add_column("peak RSS", justify="right")
    for result in results:
        for i, lat in enumerate(result.latency):
            first = i == 0
            _row(
                table,
                Path(result.name).name if first else "",
                str(lat.batch),
                f"{lat.p50_ms:.2f} ms",
                f"{lat.p90_ms:.2f} ms",
                f"{lat.throughput:,.1f}",
                human_bytes(result.file_bytes) if first else "",
                f"{result.peak_rss_mb:.1f} MB" if first and result.peak_rss_mb is not None else "",
            )
    parts: list = [table]
    ratio = ratios(results)
    if ratio:
        grid = Table(title="B / A (runs alternate)", title_justify="left")
        grid.add_column("measure")
        grid.add_column("ratio", justify="right")
        for key, value in ratio.items():
            _row(grid, key, f"{value:.2f}x")
        parts.append(grid)
    return Group(*parts)
