"""Structured PyTorch code: `model.py` that reads like a hand-written model.

The IR is lowered once to a torch.fx graph in which recognised layers (layers.py) are module
calls, each fx node tagged with the module path it came from. That graph is then cut into
regions: one per repeated block (`encoder.layer.3`, from the name scopes), and the rest. Each
block becomes the forward of an `nn.Module` class with its modules as attributes named after
their paths relative to the block (`self.attention.self.query`); blocks whose code is
identical share one class (MiniLM: one `BertLayer`, six instances in an `nn.ModuleList`),
and a chain of them is called in a loop. Values get names from what computes them (`query`,
`probs`, `batch`), scalar constants are written as literals, and fx's release lines
(`x = None`) are dropped.

A block that cannot be called as one unit (its inputs are computed after it starts) stays
inline in the forward around it: the structure falls back per region. Graphs with If/Loop/Scan
subgraphs are written in the flat fx style (`style=fx`).
"""

from __future__ import annotations

import ast
import collections
import operator
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import onnx_ir as ir
import torch
import torch.fx as fx
from torch import nn

from slimgraph.backends.pytorch.builder import Builder, identifier, lowerable
from slimgraph.backends.pytorch.codegen import companion, qualified_calls
from slimgraph.backends.pytorch.layers import CLASS_HIERARCHY_KEY, Layer, find_layers
from slimgraph.backends.pytorch.modules import Conv1D, MixtureOfExperts, QuantizedEmbedding, QuantizedLinear
from slimgraph.ir.edit import unique_name
from slimgraph.ir.graph import NAME_SCOPES_KEY, ensure_shapes
from slimgraph.ir.structure import blocks_from_scopes

# ops whose 0-D constant operand may be written as a Python number: ONNX gives both operands one
# dtype, and torch's type promotion treats a 0-D tensor and a number alike
SCALAR_OPERAND_OPS = {torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.where, torch.ge, torch.gt,
                      torch.le, torch.lt, torch.eq, torch.ne, torch.logical_and}
INFIX = {torch.add: operator.add, torch.sub: operator.sub, torch.mul: operator.mul, torch.div: operator.truediv}
NOT_TENSOR_METHODS = {"size", "tolist", "item", "dim", "numel"}


@dataclass
class Region:
    """The fx nodes of one block, what it reads from outside and what others read of it."""

    index: int
    nodes: list[fx.Node] = field(default_factory=list)
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)


@dataclass
class Emitted:
    """One generated class: its name, the lines of its __init__ and its forward."""

    name: str
    init: list[str]
    forward: str


@dataclass
class StructuredCode:
    source: str  # model.py
    weights: dict[str, torch.Tensor]  # what model.safetensors holds (state_dict names)
    sources: dict[str, tuple[str, bool]]  # initializer → (parameter, transposed): where a weight went


def generate(model: ir.Model, options: dict | None = None,
             make_builder: Callable[[ir.Model, dict[ir.Node, Layer]], Builder] | None = None) -> StructuredCode:
    """model.py for `model`; `make_builder(model, layers)` lowers it (the Triton backend's builder calls
    its kernels), else the PyTorch backend's Builder with `options`."""
    model = lowerable(model)
    ensure_shapes(model)  # (ranks and static sizes: what the layers are recognised by)
    layers = find_layers(model)
    builder = make_builder(model, layers) if make_builder else Builder(model, layers, options)
    module = builder.build()
    return _Generator(model, builder, module).run()


class _Generator:
    def __init__(self, model: ir.Model, builder: Builder, module: fx.GraphModule) -> None:
        self.model, self.builder, self.module = model, builder, module
        self.graph = module.graph
        self.order = {node: i for i, node in enumerate(self.graph.nodes)}
        self.weights: dict[str, torch.Tensor] = {}
        self.helpers: set[type] = set()
        self.functions_used: dict[str, object] = {}
        self.class_bodies: dict[str, Emitted] = {}
        self.call_at: dict[int, int] = {}  # block → position in the graph after which it is called
        self._block_classes: dict[int, str] = {}

    # --- regions ----------------------------------------------------------------------------

    def run(self) -> StructuredCode:
        group = blocks_from_scopes(self.model)
        regions = self._regions(group.prefix) if group else {}
        blocks = {i: self._emit_block(group.prefix, region) for i, region in regions.items()}
        classes = self._classes(group.prefix if group else "", blocks)
        top = self._emit_top(group.prefix if group else "", regions, classes)
        self.ties = self._ties()
        saved = {name: t for name, t in self.weights.items() if name not in self.ties}
        return StructuredCode(self._source(top), saved, self._sources())

    def _regions(self, prefix: str) -> dict[int, Region]:
        pattern = re.compile(re.escape(prefix) + r"\.(\d+)(?:\.|$)")
        block_of: dict[fx.Node, int] = {}
        for node in self.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            match = pattern.match(node.meta.get("scope") or "")
            if match:
                block_of[node] = int(match.group(1))
        for node in self.graph.nodes:  # an unscoped node computed from one block's values belongs to it
            if node.op in ("call_function", "call_method") and node not in block_of and not node.meta.get("scope"):
                sources = {block_of.get(n) for n in node.all_input_nodes if n.op != "get_attr"}
                if len(sources) == 1 and None not in sources:
                    block_of[node] = sources.pop()
        _hoist_shared(block_of)
        regions: dict[int, Region] = {}
        for node in self.graph.nodes:
            if node in block_of:
                regions.setdefault(block_of[node], Region(block_of[node])).nodes.append(node)
        for region in regions.values():
            members = set(region.nodes)
            region.inputs = list(dict.fromkeys(
                n for node in region.nodes for n in node.all_input_nodes if n not in members and n.op != "get_attr"))
            region.outputs = [n for n in region.nodes if any(u not in members for u in n.users)]
        # a block is called once all it reads exists; nothing outside it may read its outputs before
        for i, region in sorted(regions.items(), key=lambda item: self.order[item[1].nodes[0]]):
            ready = [self.order[region.nodes[0]]]
            for value in region.inputs:
                source = block_of.get(value)
                ready.append(self.order[value] if source is None else self.call_at.get(source, len(self.order)))
            at = max(ready)  # (blocks that read this one's outputs are called after it: they wait for them)
            top_users = [u for out in region.outputs for u in out.users if u not in block_of]
            if at < len(self.order) and all(self.order[u] > at for u in top_users):
                self.call_at[i] = at
        if len(self.call_at) < len(regions):  # one block cannot be a call: all stay inline (one ModuleList or none)
            self.inline_reason = f"block {sorted(set(regions) - set(self.call_at))[0]} reads what is computed after it"
            return {}
        return dict(sorted(regions.items()))

    # --- naming -------------------------------------------------------------------------------

    def _name(self, node: fx.Node) -> str:
        """A variable name that says what the node holds."""
        if node.op == "call_module":
            return _snake(node.target.split(".")[-1])
        if node.op == "call_method" and node.target == "size" and node.args[0].op == "placeholder":
            dim = self._symbolic_dim(node.args[0], node.args[1] if len(node.args) > 1 else None)
            if dim:
                return dim
        if node.op == "call_function":
            if node.target in (torch.softmax, torch.nn.functional.softmax):
                return "probs"
            if node.target is getattr and isinstance(node.args[1], str):  # x.device, x.shape, x.dtype
                return node.args[1]
            softmax_inputs = [u for u in node.users if any(
                w.op == "call_function" and w.target in (torch.softmax, torch.nn.functional.softmax) for w in u.users)]
            if any(u.op == "call_function" and u.target in (torch.softmax, torch.nn.functional.softmax)
                   for u in node.users):
                return "scores"
            if node.target is torch.where and softmax_inputs:  # added to the scores: the attention mask
                return "mask"
        if node.op == "placeholder":
            return node.name
        return re.sub(r"_\d+$", "", node.name)  # (each class numbers its own values)

    def _symbolic_dim(self, placeholder: fx.Node, axis) -> str | None:
        inputs = {identifier(v.name, "input"): v for v in self.model.graph.inputs}
        value = inputs.get(placeholder.target)
        if value is None or value.shape is None or not isinstance(axis, int) or axis >= len(value.shape):
            return None
        dim = value.shape[axis]
        name = identifier(str(dim.value)) if not isinstance(dim, int) and dim.value else None
        return name if name and name.isidentifier() else None

    # --- copying regions into graphs of their own ----------------------------------------------------

    def _copy(self, nodes: list[fx.Node], graph: fx.Graph, env: dict[fx.Node, fx.Node], attribute) -> None:
        """Copy `nodes` into `graph`; `attribute(target)` → the target there (or None: keep it)."""
        def arg(node: fx.Node) -> fx.Node:
            if node not in env:  # a get_attr of another region: read it in this one
                env[node] = graph.get_attr(attribute(node.target))
            return env[node]

        for node in nodes:
            if node.op == "get_attr" and not any(u in set(nodes) for u in node.users):
                continue
            target = attribute(node.target) if node.op in ("get_attr", "call_module") else node.target
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), arg)
            env[node] = graph.create_node(node.op, target, args, kwargs, name=self._name(node))

    def _emit_block(self, prefix: str, region: Region) -> Emitted:
        own = f"{prefix}.{region.index}."
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        names = _input_names(region)
        taken: set[str] = set()
        for value in region.inputs:
            name = unique_name(taken, identifier(names.get(value) or self._name(value)), sep="_")
            taken.add(name)
            env[value] = graph.placeholder(name)
        outside: dict[str, str] = {}  # attribute outside the block that it reads → a copy of its own

        def attribute(target: str) -> str:
            if target.startswith(own):
                return target[len(own):]
            if target not in outside:
                outside[target] = unique_name(set(outside.values()), identifier(target.split(".")[-1]), sep="_")
            return outside[target]

        self._copy(region.nodes, graph, env, attribute)
        outputs = [env[n] for n in region.outputs]
        graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        source = {local: full for full, local in outside.items()}  # relative → where the tensor is now
        return self._emitted(graph, lambda target: (source.get(target, own + target), own + target))

    def _emit_top(self, prefix: str, regions: dict[int, Region], classes: dict[int, str]) -> Emitted:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        in_block = {node: i for i, r in regions.items() for node in r.nodes}
        calls_after = collections.defaultdict(list)
        for i, at in self.call_at.items():
            if i in regions:
                calls_after[at].append(i)
        loops = _loops(regions, classes)
        in_loop = {i for run in loops.values() for i in run[1:]}
        moved: dict[str, str] = {}  # a block's tensor read out here (one constant shared by all) → its path

        def attribute(target: str) -> str:
            if not regions or not target.startswith(prefix + "."):
                return target
            moved[identifier(target)] = target  # (the block list owns the path itself)
            return identifier(target)

        for node in self.graph.nodes:
            if node not in in_block:
                self._copy([node], graph, env, attribute)
            for i in sorted(calls_after[self.order[node]]):
                if i in in_loop:
                    continue
                run = loops.get(i, [i])
                region = regions[run[-1]]
                args = tuple(env[n] for n in regions[i].inputs)
                if len(run) > 1:
                    result = graph.create_node("call_function", _run_blocks, (prefix, run, *args), name="hidden")
                else:
                    result = graph.create_node("call_module", f"{prefix}.{i}", args,
                                               name="hidden" if len(region.outputs) == 1 else "outputs")
                if len(region.outputs) == 1:
                    env[region.outputs[0]] = result
                else:
                    for k, out in enumerate(region.outputs):
                        env[out] = graph.create_node("call_function", operator.getitem, (result, k),
                                                     name=self._name(out))
        return self._emitted(graph, lambda target: (moved.get(target, target), target), prefix, regions)

    # --- code ------------------------------------------------------------------------------------

    def _emitted(self, graph: fx.Graph, where, prefix: str = "", blocks: dict[int, Region] | None = None) -> Emitted:
        """The class body for `graph`: constructors for what it reads, and its forward.
        `where(target)` → (path of the tensor or module in the lowered module, path in the generated one)."""
        _inline_scalars(graph, self.module, lambda target: where(target)[0], self._source_parameters())
        _deduplicate(graph)
        _drop_index_wrapping(graph)
        _infix(graph)
        graph.eliminate_dead_code(is_impure_node=lambda node: node.op in ("placeholder", "output"))
        graph.lint()
        block_calls = {f"{prefix}.{i}" for i in blocks or ()}
        init: list[str] = []
        containers: set[str] = set()

        def container(path: str) -> None:
            parts = path.split(".")
            for k in range(1, len(parts)):
                above = ".".join(parts[:k])
                if above not in containers:
                    containers.add(above)
                    holder = "nn.ModuleDict()" if parts[k].isdigit() else "nn.Module()"
                    init.append(f"{_access(above)} = {holder}")

        for node in graph.nodes:
            if node.target in block_calls or node.target is _run_blocks:  # the blocks, where they are first used
                if prefix not in containers:
                    container(prefix)
                    containers.add(prefix)
                    init.append(f"{_access(prefix)} = {_block_list(sorted(blocks), self._block_classes)}")
                continue
            if node.op not in ("get_attr", "call_module") or node.target in containers:
                continue
            containers.add(node.target)
            container(node.target)
            init.append(self._constructor(node.target, *where(node.target)))
        code = graph.python_code(root_module="self")
        # tensors at numbered paths (paddle2onnx's `p2o.helper.constant.3`) are read with getattr: an
        # nn.ModuleDict's items are its modules
        tensors = {node.target for node in graph.nodes if node.op == "get_attr" and
                   node.target.rpartition(".")[2].isdigit() and not isinstance(_get(self.module, where(node.target)[0]),
                                                                              nn.Module)}
        text = _tidy(code.src, self._loop_source, prefix if blocks and self._numbered() else None, tensors)
        used = {name: value for name, value in code.globals.items() if re.search(rf"(?<![.\w]){name}(?![=\w])", text)}
        if "device" not in used:  # (fx keeps the name `device` for torch.device, which this code does not use)
            text = re.sub(r"\bdevice_1\b", "device", text)
        text = qualified_calls(text, used)
        self.functions_used.update(used)
        return Emitted("", init, text)

    def _constructor(self, target: str, source: str, saved: str) -> str:
        """`self.<target> = ...` for the module or tensor at `source`, whose weights are saved as `saved`."""
        value = self.module.get_submodule(source) if isinstance(_get(self.module, source), nn.Module) else \
            _get(self.module, source)
        if isinstance(value, nn.Module):
            self._record_module(saved, value)
            return f"{_access(target)} = {_module_constructor(value, self.helpers)}"
        self.weights[saved] = value.detach()
        kind, persistent = _kind(self.model, self.builder.initializer_at.get(source), value)
        empty = f"torch.empty({tuple(value.shape)!r}, dtype={value.dtype})"
        owner, _, leaf = target.rpartition(".")
        holder = _access(owner) if owner else "self"
        if kind == "parameter":  # (a numbered leaf sits in an nn.ModuleDict, which item assignment takes for a module)
            return f"{_access(target)} = nn.Parameter({empty})" if not leaf.isdigit() else \
                f"{holder}.register_parameter({leaf!r}, nn.Parameter({empty}))"
        flag = "" if persistent else ", persistent=False"
        return f"{holder}.register_buffer({leaf!r}, {empty}{flag})"

    def _source_parameters(self) -> set[str]:
        return {attribute for attribute, initializer in self.builder.initializer_at.items()
                if _kind(self.model, initializer, None)[0] == "parameter"}

    def _record_module(self, path: str, module: nn.Module) -> None:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor is not None:
                self.weights[f"{path}.{name}"] = tensor.detach()

    def _classes(self, prefix: str, blocks: dict[int, Emitted]) -> dict[int, str]:
        base = self._block_class_name(prefix)
        by_text: dict[tuple, str] = {}
        names: dict[int, str] = {}
        for i, emitted in blocks.items():
            key = (tuple(emitted.init), emitted.forward)
            if key not in by_text:
                by_text[key] = base if not by_text else f"{base}{len(by_text) + 1}"
                self.class_bodies[by_text[key]] = Emitted(by_text[key], emitted.init, emitted.forward)
            names[i] = by_text[key]
        self._block_classes = names
        return names

    def _block_class_name(self, prefix: str) -> str:
        for node in self.model.graph:
            try:
                scopes = ast.literal_eval(node.metadata_props.get(NAME_SCOPES_KEY, "[]"))
                classes = ast.literal_eval(node.metadata_props.get(CLASS_HIERARCHY_KEY, "[]"))
            except (ValueError, SyntaxError):
                continue
            for scope, cls in zip(scopes, classes):
                if re.fullmatch(re.escape(prefix) + r"\.\d+", scope):
                    return cls.rsplit(".", 1)[-1]
        return "Block"

    def _model_class_name(self) -> str:
        """The exported model's class (`BertModel`), else Model."""
        for node in self.model.graph:
            try:
                hierarchy = ast.literal_eval(node.metadata_props.get(CLASS_HIERARCHY_KEY, "[]"))
            except (ValueError, SyntaxError):
                continue
            if len(hierarchy) > 1 and not hierarchy[0].rsplit(".", 1)[-1].startswith("_"):
                return hierarchy[0].rsplit(".", 1)[-1]
        return "Model"

    def _numbered(self) -> bool:
        """The blocks are 0..n-1 (an nn.ModuleList), not what is left after dropping some (an nn.ModuleDict)."""
        return sorted(self._block_classes) == list(range(len(self._block_classes)))

    def _loop_source(self, indent: str, out: str, prefix: str, indices: list[int], args: list[str]) -> str:
        blocks = _access(prefix)
        if len(indices) == len(self._block_classes):
            collection = blocks if self._numbered() else f"{blocks}.values()"
        else:
            collection = "[" + ", ".join(f"{blocks}[{i if self._numbered() else repr(str(i))}]" for i in indices) + "]"
        start = f"{indent}{out} = {args[0]}\n" if out != args[0] else ""
        return (f"{start}{indent}for block in {collection}:\n"
                f"{indent}    {out} = block({', '.join([out, *args[1:]])})")

    def _source(self, top: Emitted) -> str:
        from slimgraph.backends.pytorch.codegen import structured_source

        top.name = self._model_class_name()
        used = {name: f for name, f in self.functions_used.items() if f is not _run_blocks}  # (a loop in the source)
        return structured_source(top.name, top, list(self.class_bodies.values()), used, self.helpers, self.ties)

    def _ties(self) -> dict[str, str]:
        """Parameters read from one initializer in one layout (a head tied to its embedding):
        one parameter, as in the source model. → tied parameter → the one it is."""
        owner: dict[tuple[str, bool], str] = {}
        ties = {}
        for attribute, layer in self.builder.layer_at.items():
            for parameter, source in layer.sources.items():
                path = f"{attribute}.{parameter}"
                if source in owner and self.weights[owner[source]].shape == self.weights[path].shape:
                    ties[path] = owner[source]
                else:
                    owner.setdefault(source, path)
        return ties

    def _sources(self) -> dict[str, tuple[str, bool]]:
        found = {}
        for attribute, layer in self.builder.layer_at.items():
            for parameter, (initializer, transposed) in layer.sources.items():
                found.setdefault(initializer, (f"{attribute}.{parameter}", transposed))
        return found


# --- helpers ---------------------------------------------------------------------------------------


def _run_blocks(prefix, indices, *args):  # a placeholder the loop replaces in the source (never run)
    raise NotImplementedError


def _loops(regions: dict[int, Region], classes: dict[int, str]) -> dict[int, list[int]]:
    """Runs of consecutive blocks of one class, each reading the previous one's only output
    as its first input and the same other inputs: called as `for block in ...`."""
    loops: dict[int, list[int]] = {}
    order = sorted(regions)
    run: list[int] = []

    def chained(a: int, b: int) -> bool:
        ra, rb = regions[a], regions[b]
        return (classes[a] == classes[b] and len(ra.outputs) == 1 and len(rb.outputs) == 1
                and rb.inputs[:1] == ra.outputs and rb.inputs[1:] == ra.inputs[1:]
                and all(u in set(rb.nodes) for u in ra.outputs[0].users))

    for i in order:
        if run and chained(run[-1], i):
            run.append(i)
            continue
        if len(run) > 1:
            loops[run[0]] = run
        run = [i]
    if len(run) > 1:
        loops[run[0]] = run
    return loops


def _input_names(region: Region) -> dict[fx.Node, str]:
    """The block's residual stream is `hidden`."""
    if region.outputs and region.inputs:
        return {region.inputs[0]: "hidden"}
    return {}


def _dotted(expression: str) -> str:
    """`a.b.3` for the expression `self.a.b[3]`."""
    return re.sub(r"\[(\d+)\]", r".\1", expression).removeprefix("self.")


def _access(path: str) -> str:
    """`self.a.b["3"].c` for the attribute at a dotted path (numbered children sit in an nn.ModuleDict)."""
    return "self" + "".join(f"[{part!r}]" if part.isdigit() else f".{part}" for part in path.split("."))


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _get(module: nn.Module, dotted: str) -> torch.Tensor:
    owner, _, leaf = dotted.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def _kind(model: ir.Model, initializer: str | None, value: torch.Tensor) -> tuple[str, bool]:
    """("parameter" | "buffer", persistent): as the exporter recorded it for the source model's
    tensors; otherwise float initializers are parameters and every other constant a buffer that
    the state_dict leaves out."""
    value_ir = model.graph.initializers.get(initializer) if initializer else None
    props = value_ir.metadata_props if value_ir is not None else {}
    kind = props.get("pkg.torch.export.graph_signature.InputSpec.kind")
    if kind == "PARAMETER":
        return "parameter", True
    if kind == "BUFFER":
        return "buffer", props.get("pkg.torch.export.graph_signature.InputSpec.persistent") == "True"
    if isinstance(value, nn.Parameter) and not kind:
        return "parameter", True
    return "buffer", False


def _module_constructor(module: nn.Module, helpers: set[type]) -> str:
    """Source that makes an empty `module` of the same configuration."""
    if isinstance(module, nn.Linear):
        return f"nn.Linear({module.in_features}, {module.out_features}{'' if module.bias is not None else ', bias=False'})"
    if isinstance(module, nn.Embedding):
        return f"nn.Embedding({module.num_embeddings}, {module.embedding_dim})"
    if isinstance(module, nn.LayerNorm):
        shape = module.normalized_shape[0] if len(module.normalized_shape) == 1 else list(module.normalized_shape)
        flags = ("" if module.elementwise_affine else ", elementwise_affine=False") + \
            ("" if module.bias is not None or not module.elementwise_affine else ", bias=False")
        return f"nn.LayerNorm({shape}, eps={_short(module.eps)!r}{flags})"
    if isinstance(module, nn.RMSNorm):
        shape = module.normalized_shape[0] if len(module.normalized_shape) == 1 else list(module.normalized_shape)
        return f"nn.RMSNorm({shape}, eps={_short(module.eps)!r})"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        spatial = len(module.kernel_size)
        options = [f"{name}={_single(getattr(module, name))}" for name, default in
                   (("stride", (1,) * spatial), ("padding", (0,) * spatial), ("dilation", (1,) * spatial))
                   if tuple(getattr(module, name)) != default]
        options += [f"groups={module.groups}"] * (module.groups != 1) + ["bias=False"] * (module.bias is None)
        return (f"nn.{type(module).__name__}({module.in_channels}, {module.out_channels}, "
                f"{_single(module.kernel_size)}{''.join(', ' + o for o in options)})")
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return f"nn.{type(module).__name__}({module.num_features}, eps={_short(module.eps)!r}, momentum={_short(module.momentum)!r})"
    if isinstance(module, Conv1D):
        helpers.add(Conv1D)
        return f"Conv1D({module.nf}, {module.weight.shape[0]})"
    if isinstance(module, QuantizedLinear):
        helpers.add(QuantizedLinear)
        zero = None if module.zero_points is None else "packed" if module.zero_points_packed else "float"
        return (f"QuantizedLinear({module.in_features}, {module.out_features}, bits={module.bits}, "
                f"block_size={module.block_size}, bias={module.bias is not None}, zero_points={zero!r})")
    if isinstance(module, MixtureOfExperts):
        helpers.add(MixtureOfExperts)
        experts, hidden, inner = module.fc2.shape
        options = "".join(f", {name}={_short(getattr(module, name))!r}" for name, default in
                          (("alpha", 1.0), ("beta", 0.0), ("limit", float("inf"))) if getattr(module, name) != default)
        return (f"MixtureOfExperts({experts}, {hidden}, {inner}, k={module.k}, activation={module.activation!r}, "
                f"normalize_routing={module.normalize_routing}, bias={module.fc1_bias is not None}{options})")
    if isinstance(module, QuantizedEmbedding):
        helpers.add(QuantizedEmbedding)
        return (f"QuantizedEmbedding({module.num_embeddings}, {module.embedding_dim}, bits={module.bits}, "
                f"block_size={module.block_size}, signed={module.signed}, zero_points={module.zero_points is not None})")
    raise TypeError(f"no constructor for {type(module).__name__}")


def _short(number: float) -> float:
    """The shortest decimal that is the same float32 (0.42044821, not 0.4204482138156891)."""
    import numpy as np

    short = float(str(np.float32(number))) if np.isfinite(number) else number
    return short if abs(short) <= float(np.finfo(np.float32).max) else number  # (torch refuses -3.4028235e+38)


def _single(sizes) -> str:
    sizes = tuple(sizes)
    return str(sizes[0]) if len(set(sizes)) == 1 else str(sizes)


def _block_list(indices: list[int], classes: dict[int, str]) -> str:
    if indices == list(range(len(indices))):
        kinds = {classes[i] for i in indices}
        if len(kinds) == 1:
            return f"nn.ModuleList([{kinds.pop()}() for _ in range({len(indices)})])"
        return f"nn.ModuleList([{', '.join(classes[i] + '()' for i in indices)}])"
    return "nn.ModuleDict({" + ", ".join(f"'{i}': {classes[i]}()" for i in indices) + "})"


def _inline_scalars(graph: fx.Graph, root: nn.Module, source, trainable: set[str]) -> None:
    """A 0-D constant that is an operand of an elementwise op becomes a number in the code
    (not a source model's parameter: that stays one)."""
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        value = _get(root, source(node.target))
        if not isinstance(value, torch.Tensor) or value.dim() != 0 or source(node.target) in trainable \
                or value.dtype not in (torch.float32, torch.int64, torch.bool):
            continue
        users = list(node.users)
        if not all(u.op == "call_function" and u.target in SCALAR_OPERAND_OPS and not u.kwargs
                   and any(isinstance(a, fx.Node) and a is not node for a in u.args) for u in users):
            continue
        number = _short(value.item()) if value.dtype == torch.float32 else value.item()
        for user in users:
            user.args = tuple(number if a is node else a for a in user.args)
    for node in list(graph.nodes):  # torch.logical_and(True, x) → x (exporters mask with a constant True)
        if node.op == "call_function" and node.target is torch.logical_and and node.args[0] is True \
                and isinstance(node.args[1], fx.Node):
            node.replace_all_uses_with(node.args[1])
            graph.erase_node(node)


def _is_tensor(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op in ("call_module", "get_attr"):
        return True
    if node.op == "call_method":
        return node.target not in NOT_TENSOR_METHODS
    if node.op == "call_function" and node.target in INFIX.values():
        return any(_is_tensor(a) for a in node.args)
    return node.op == "call_function" and getattr(node.target, "__module__", "").startswith("torch") \
        and node.target is not getattr


def _infix(graph: fx.Graph) -> None:
    """torch.add(a, b) → a + b (printed as an operator) where an operand is a tensor."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target in INFIX and len(node.args) == 2 and not node.kwargs \
                and any(_is_tensor(a) for a in node.args):
            node.target = INFIX[node.target]


def _tidy(code: str, loop_source, block_list: str | None, tensors: set[str] = frozenset()) -> str:
    """fx's forward, for people: no release lines, attributes read where they are used, indexing
    for numbered submodules (not for the `tensors` at numbered paths), the block loop written out."""
    def index(match: re.Match) -> str:
        path, number = match.group(1), match.group(2)
        if f"{_dotted(path)}.{number}" in tensors:
            return match.group(0)
        return f"{path}[{number if path == f'self.{block_list}' else repr(number)}]"

    lines = []
    for line in code.strip("\n").splitlines():
        line = _format_line(re.sub(r";\s+(?:\w+ = )+None$", "", line))
        while (indexed := re.sub(r'getattr\((self(?:\.\w+|\[\d+\])*), "(\d+)"\)', index, line)) != line:
            line = indexed  # (again: a numbered child of a numbered child)
        lines.append(line)
    text = "\n".join(lines)
    for match in list(re.finditer(r"^    (\w+) = (\w+)\.size\((-?\d+)\)$", text, re.M)):  # a size read once
        uses = re.findall(rf"(?<![.\w]){match.group(1)}(?!\w)", text)
        if len(uses) == 2:
            text = text.replace(match.group(0) + "\n", "", 1)
            text = re.sub(rf"(?<![.\w]){match.group(1)}(?!\w)", f"{match.group(2)}.shape[{match.group(3)}]", text)
    attribute = r"self(?:\.\w+|\[[\d']+\])+"
    for name in re.findall(rf"^    (\w+) = {attribute}$", text, re.M):
        match = re.search(rf"^    {name} = ({attribute})\n", text, re.M)
        text = text[:match.start()] + text[match.end():]
        # the variable: not an attribute of the same name (`self.constant_2`), a keyword or a string
        text = re.sub(rf"(?<![.'\"\w]){name}(?![\w'\"]|=[^=])", lambda _, read=match.group(1): read, text)
    def loop(match: re.Match) -> str:
        indent, out, call = match.group(1), match.group(2), match.group(3)
        parts = [p.strip() for p in _split_args(call)]
        prefix = ast.literal_eval(parts[0])
        indices = ast.literal_eval(parts[1])
        return loop_source(indent, out, prefix, indices, parts[2:])
    text = re.sub(r"^( +)(\w+) = \w*_run_blocks\((.*)\)$", loop, text, flags=re.M)
    return textwrap.indent(text, "    ")


def _split_args(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _hoist_shared(block_of: dict[fx.Node, int]) -> None:
    """Values a block computes for the blocks after it without its layers (modules, or the Triton
    backend's kernels) or what those compute (the attention mask Hugging Face models build inside
    their first layer) move to the top forward."""
    by_block = collections.defaultdict(list)
    for node, i in block_of.items():
        by_block[i].append(node)
    for i, nodes in by_block.items():
        depends: set[fx.Node] = set()
        for node in nodes:
            if node.op == "call_module" or companion(node.target) or any(
                    n in depends or block_of.get(n, i) != i for n in node.all_input_nodes if n.op != "get_attr"):
                depends.add(node)
        pending = [n for n in nodes if n not in depends and any(block_of.get(u) != i for u in n.users)]
        while pending:
            node = pending.pop()
            if block_of.get(node) == i and node not in depends:
                del block_of[node]
                pending.extend(node.all_input_nodes)


IMPURE = re.compile(r"rand|bernoulli|multinomial|normal|uniform|dropout|empty|_$")


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return "slice", _hashable(value.start), _hashable(value.stop), _hashable(value.step)
    return value


def _deduplicate(graph: fx.Graph) -> None:
    """One node per distinct computation: lowerings repeat reads (`index[..., 0]` three times)."""
    seen: dict = {}
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method", "get_attr"):
            continue
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if IMPURE.search(name):
            continue
        key = (node.op, node.target, _hashable(node.args), _hashable(node.kwargs))
        try:
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node


SHAPE_PRESERVING = {"unsqueeze", "expand", "reshape", "view", "flatten", "permute", "transpose", "contiguous",
                    "squeeze"}


def _non_negative(value, depth: int = 0) -> bool:
    """Whether `value` provably holds no negative number (aranges from 0 and what reshapes them)."""
    if isinstance(value, bool) or depth > 32:
        return False
    if isinstance(value, int):
        return value >= 0
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method":
        if value.target == "size":
            return True
        return value.target in SHAPE_PRESERVING and _non_negative(value.args[0], depth + 1)
    if value.op != "call_function":
        return False
    if value.target is torch.arange:
        start, step = (value.args[0], value.args[2] if len(value.args) > 2 else 1) if len(value.args) > 1 else (0, 1)
        return _non_negative(start, depth + 1) and isinstance(step, int) and step > 0
    if value.target in (operator.getitem, torch.unsqueeze, torch.reshape, torch.flatten):
        return _non_negative(value.args[0], depth + 1)
    if value.target is torch.cat:
        return all(_non_negative(v, depth + 1) for v in value.args[0])
    return False


def _drop_index_wrapping(graph: fx.Graph) -> None:
    """torch.where(i < 0, i + n, i) → i, where i is provably not negative (ONNX's negative indices)."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.where or len(node.args) != 3:
            continue
        test, wrapped, index = node.args
        if (isinstance(test, fx.Node) and test.target in (operator.lt, torch.lt) and test.args == (index, 0)
                and isinstance(wrapped, fx.Node) and wrapped.target in (operator.add, torch.add)
                and wrapped.args[0] is index and _non_negative(index)):
            node.replace_all_uses_with(index)
            graph.erase_node(node)
            for dead in (wrapped, test):
                if not dead.users:
                    graph.erase_node(dead)


def _format_line(line: str) -> str:
    """fx's spelling → the usual one: F.gelu, keyword=value, x[:, 1:n], `...`."""
    line = re.sub(r"torch\._C\._nn\.(\w+)|torch\.nn\.functional\.(\w+)", lambda m: f"F.{m.group(1) or m.group(2)}", line)
    head, sep, rest = line.partition(" = ")
    rest = re.sub(r"([(,]\s*)(\w+) = ", r"\1\2=", rest)
    line = head + sep + rest if sep else re.sub(r"([(,]\s*)(\w+) = ", r"\1\2=", line)

    def piece(text: str) -> str:
        return "" if text == "None" else text

    # `a:b` only inside brackets (fx writes slices only as subscripts or assigned to a name); elsewhere a
    # slice stays an object
    def subscript(m: re.Match) -> str:
        if line.count("[", 0, m.start()) <= line.count("]", 0, m.start()):
            return m.group(0)
        return f"{piece(m.group(1))}:{piece(m.group(2))}" + (f":{m.group(3)}" if m.group(3) not in ("None", "1") else "")

    line = re.sub(r"slice\(([^(),]+), ([^(),]+), ([^(),]+)\)", subscript, line)
    line = line.replace("Ellipsis", "...")
    return re.sub(r"\[\(([^()]*)\)\]", r"[\1]", line)


def instantiate(code: StructuredCode, companions: dict[str, ModuleType] | None = None) -> nn.Module:
    """Run the generated model.py's source and build its model with the weights: the module the
    artifact calls is the code that is saved. `companions`: the modules model.py imports from beside
    it (the Triton backend's `kernels`), lent to its import while it runs."""
    import sys

    namespace: dict = {"__name__": "slimgraph_generated_model", "__file__": "model.py"}
    companions = companions or {}
    held = {name: sys.modules.get(name) for name in companions}  # (a `kernels` imported before: put back after)
    sys.modules.update(companions)
    try:
        exec(compile(code.source, "<slimgraph model.py>", "exec"), namespace)  # noqa: S102 - our own generated code
    finally:
        for name, module in held.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module
    return namespace["build"](dict(code.weights))
