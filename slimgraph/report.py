"""Terminal rendering (rich) of pipeline reports, model summaries and the pass list."""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

from slimgraph.ir.fidelity import Fidelity
from slimgraph.ir.stats import human_bytes, human_count
from slimgraph.ir.summary import ModelSummary
from slimgraph.passes._infra.pipeline import PipelineReport


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
    summary.add_row("pipeline", report.pipeline)
    summary.add_row("size", _change(before.bytes, after.bytes, human_bytes))
    summary.add_row("nodes", _change(before.nodes, after.nodes, lambda n: f"{n:,}"))
    summary.add_row("parameters", _change(before.parameters, after.parameters, human_count))
    summary.add_row("FLOPs (est.)", _change(before.flops, after.flops, human_count))
    summary.add_row("verified on", report.inputs_source if report.verified else "not verified (--no-verify)")
    if output:
        summary.add_row("written", output)

    passes = Table(title="passes", title_justify="left", expand=False)
    passes.add_column("pass")
    passes.add_column("time", justify="right")
    passes.add_column("changed")
    passes.add_column("fidelity vs original")
    passes.add_column("stats")
    for record in report.records:
        seconds = f"{record.seconds:.2f} s" if record.seconds is not None else "-"
        stats = ", ".join(f"{k}: {v}" for k, v in record.stats.items())
        passes.add_row(
            record.text, seconds, "yes" if record.modified else "no", _fidelity_cell(record.fidelity, record.exact), stats
        )
    return Group(Panel(summary, title="slimgraph optimize", expand=False), passes)


def render_summary(summary: ModelSummary) -> Group:
    stats, found = summary.stats, summary.structures
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("producer", summary.producer or "-")
    head.add_row("opset", ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in summary.opset.items()))
    head.add_row("inputs", ", ".join(f"{k}: {v}" for k, v in stats.inputs.items()))
    head.add_row("outputs", ", ".join(f"{k}: {v}" for k, v in stats.outputs.items()))
    head.add_row("parameters", f"{human_count(stats.parameters)} ({human_bytes(stats.bytes)})")
    head.add_row("by dtype", ", ".join(f"{k} {human_bytes(v)}" for k, v in stats.bytes_by_dtype.items()) or "-")
    head.add_row("nodes", f"{stats.nodes:,}")
    head.add_row("FLOPs (est.)", f"{human_count(stats.flops)} (symbolic dims: batch 1, sequence 128)")

    structures = Table(title="structures", title_justify="left")
    structures.add_column("kind")
    structures.add_column("found")
    if found.blocks:
        where = f" '{found.blocks.prefix}'" if found.blocks.prefix else ""
        structures.add_row("blocks", f"{found.blocks.count}{where} (from {found.blocks.source})")
    structures.add_row("linear layers", str(len(found.linears)))
    for emb in found.embeddings:
        structures.add_row("embedding", f"{emb.name}: {emb.num_embeddings} × {emb.dim}")
    _add_grouped(structures, "attention", [
        f"{a.heads} heads × {a.head_dim}" + (f", {a.kv_heads} KV heads ({a.kv_groups} per group)" if a.kv_groups > 1 else "")
        for a in found.attention
    ])
    _add_grouped(structures, "FFN", [
        f"{f.hidden}→{f.inner}→{f.hidden} {f.activation}" + (" gated" if f.gate else "") for f in found.ffns
    ])
    for head_linear in found.lm_heads:
        structures.add_row("LM head", f"{head_linear.name}: {head_linear.in_features}→{head_linear.out_features}")

    ops = Table(title="ops", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in list(stats.op_histogram.items())[:12]:
        ops.add_row(op, str(count))

    tensors = Table(title="largest tensors", title_justify="left")
    tensors.add_column("name")
    tensors.add_column("shape")
    tensors.add_column("size", justify="right")
    for t in summary.largest_tensors[:8]:
        tensors.add_row(t.name, f"{t.dtype}[{'×'.join(map(str, t.shape))}]", human_bytes(t.bytes))
    return Group(Panel(head, title="slimgraph inspect", expand=False), structures, ops, tensors)


def _add_grouped(table: Table, kind: str, descriptions: list[str]) -> None:
    """One row per distinct description, with its count ('6 × 12 heads × 32')."""
    counts: dict[str, int] = {}
    for d in descriptions:
        counts[d] = counts.get(d, 0) + 1
    for description, count in counts.items():
        table.add_row(kind, f"{count} × {description}" if count > 1 else description)


def print_renderable(renderable, console: Console | None = None) -> None:
    (console or Console()).print(renderable)
