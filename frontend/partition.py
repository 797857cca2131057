"""Partitioning: rules and markers → segments → ``split_module`` → a :class:`SegmentedModule`.

The pass runs in five steps, each a function:
1. :func:`assign_regions` walks the nodes in order and gives each a region (marker, rule match or glue);
2. :func:`rematerialize_sizes` copies size computations (``x.size(0) * 4``) into every region that uses
   them, so no symbolic int crosses a segment boundary (each nano-batch recomputes its own sizes);
3. the batch analysis (:mod:`.batching`) decides each region's kind: split, barrier or shared;
4. :func:`cut` calls ``torch.fx.passes.split_module`` with ``keep_original_order=True`` — in-place ops
   (KV-cache writes) would change meaning if the splitter reordered nodes;
5. the root graph is read back into segment calls and boundary values.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from dynaflow.errors import BatchCouplingError, PartitionError, did_you_mean, node_context
from dynaflow.ir import Resource, Segment, SegmentKind
from dynaflow.segmented import OutRef, SegmentCall, SegmentedModule, Value, ValueKind
from dynaflow.frontend.collectives import check_waits, functionalize_inplace, hoist_waits, is_wait
from dynaflow.frontend.collectives import describe as describe_collectives
from dynaflow.frontend.batching import SYM, BatchAnalysis, analyze, candidate_symbols, find_batch_symbol, meta_val
from dynaflow.frontend.effects import effect_pairs
from dynaflow.frontend.index_constants import lift_index_lists
from dynaflow.frontend.markers import is_marker, marker_args
from dynaflow.frontend.rules import Rule, Seq, as_rule, default_rules, module_stack, op_name, op_short_name
from dynaflow.frontend.stale_copies import stale_copies, written_storage_users

__all__ = ["Region", "assign_regions", "rematerialize_sizes", "whole_where_written", "main_split_where_written",
           "partition", "fetch_attr"]

log = logging.getLogger(__name__)

_COMPUTE_OPS = ("linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "conv", "grouped_mm", "_scaled_mm")


@dataclass
class Region:
    """A group of consecutive nodes that will become one segment."""

    label: str
    rule: str
    tags: tuple[str, ...] = ()
    nodes: list[torch.fx.Node] = field(default_factory=list)
    name: str = ""


def _compute_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


def _is_size_node(node: torch.fx.Node) -> bool:
    """Nodes whose value is a (symbolic) int or a torch.Size: cheap, recomputed wherever needed."""
    val = meta_val(node)
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, torch.Size)):
        return True
    if isinstance(val, (int, float, bool)) and not isinstance(val, torch.Tensor):
        return node.op != "call_module"
    return False


def assign_regions(gm: torch.fx.GraphModule, rules: Sequence[Rule]) -> tuple[list[Region], dict[Rule, int]]:
    """Give every compute node a region; returns the regions in order and each rule's match count."""
    nodes = [n for n in _compute_nodes(gm)]
    matches: Counter[Rule] = Counter()
    seq_key: dict[torch.fx.Node, Any] = {}
    for rule in rules:
        if isinstance(rule, Seq):
            plain = [n for n in nodes if not is_marker(n)]
            for start, stop in rule.find(plain):
                matches[rule] += 1
                for n in plain[start:stop]:
                    seq_key.setdefault(n, (rule, start))
    regions: list[Region] = []
    current_key: Any = object()
    marker: tuple[str, tuple[str, ...]] | None = None
    for node in nodes:
        if is_marker(node):
            marker = marker_args(node)
            regions.append(Region(marker[0], "mark", marker[1], [node]))
            current_key = ("mark", len(regions))
            continue
        if _is_tuple_unpack(node):
            _region_of(regions, node.args[0]).nodes.append(node)  # keep tuple unpacking with its producer
            continue
        key, rule = seq_key.get(node), None
        if key is not None:
            rule = key[0]
        else:
            for r in rules:
                if isinstance(r, Seq):
                    continue
                k = r.match(node)
                if k is not None:
                    key, rule = k, r
                    break
        if key is None:
            key = ("glue", marker[0] if marker else None)
        if key != current_key or not regions:
            if rule is not None:
                matches[rule] += 1 if not isinstance(rule, Seq) else 0
                regions.append(Region(rule.label, repr(rule), tuple(rule.tags)))
            elif marker is not None:
                regions.append(Region(marker[0], "mark", marker[1]))
            else:
                regions.append(Region("glue", "glue"))
            current_key = key
        regions[-1].nodes.append(node)
    regions = [r for r in regions if any(not is_marker(n) for n in r.nodes)]
    _name_regions(regions)
    return regions, dict(matches)


def _region_of(regions: list[Region], node: torch.fx.Node) -> Region:
    for r in reversed(regions):
        if node in r.nodes:
            return r
    raise PartitionError(f"internal: producer {node} has no region")


def _name_regions(regions: list[Region]) -> None:
    counts: Counter[str] = Counter()
    for r in regions:
        label = "".join(c if c.isalnum() or c == "_" else "_" for c in r.label) or "seg"
        r.name = f"{label}_{counts[label]}"
        counts[label] += 1


def isolate_barriers(regions: list[Region], ba: BatchAnalysis) -> list[Region]:
    """Shrink barriers: cut a region holding coupled nodes into [before | first..last coupled | after].

    Example: a glue region ``[arange(B), mask ops, rmsnorm, q/k/v proj]`` becomes a barrier
    ``[arange(B) .. last node using it]`` and a split region with the norm and projections.
    Batch-free nodes right before the first coupled one join the barrier: a static cache's
    ``pos = arange(n) + counter; counter.add_(n)`` then reads the counter where it writes it, so the barrier
    waits for no nano-batch of the split part before it (and ``pos`` is computed once, not per nano-batch).
    Regions tagged ``barrier`` or ``batch-local`` are left whole.
    """
    out: list[Region] = []
    for r in regions:
        hints = _tags(r)[1]
        idx = [i for i, n in enumerate(r.nodes) if n in ba.coupling]
        if not idx or hints & {"barrier", "batch-local"} or r.rule == "mark":
            out.append(r)
            continue
        first, last = idx[0], idx[-1]
        while first > 0 and _batch_free(r.nodes[first - 1], ba):
            first -= 1
        while last + 1 < len(r.nodes) and (_is_unpack_of(r.nodes[last + 1], r.nodes[first:last + 1])
                                           or _is_wait_of(r.nodes[last + 1], r.nodes[first:last + 1])):
            last += 1
        parts = [(r.nodes[:first], r.label, r.rule), (r.nodes[first:last + 1], r.label, r.rule),
                 (r.nodes[last + 1:], r.label, r.rule)]
        out.extend(Region(label, rule, r.tags, nodes) for nodes, label, rule in parts if nodes)
    _name_regions(out)
    return out


def _batch_free(node: torch.fx.Node, ba: BatchAnalysis) -> bool:
    """A node that touches no batch data and is not a tuple's unpacking (which stays with its producer)."""
    return node not in ba.touches and node not in ba.coupling and not is_marker(node) and not _is_tuple_unpack(node)


def _is_tuple_unpack(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node)
            and isinstance(meta_val(node.args[0]), (tuple, list)))


def _is_wait_of(node: torch.fx.Node, producers: list[torch.fx.Node]) -> bool:
    """A collective's ``wait_tensor`` stays in the barrier that issues the collective."""
    return is_wait(node) and node.args[0] in producers


def _is_unpack_of(node: torch.fx.Node, producers: list[torch.fx.Node]) -> bool:
    return node.op == "call_function" and node.target is operator.getitem and node.args[0] in producers


def rematerialize_sizes(gm: torch.fx.GraphModule, regions: list[Region]) -> None:
    """Copy size nodes into every other region that uses them, so sizes never cross a boundary.

    Example: ``n = x.size(0)`` in region A and ``y.view(n, -1)`` in region B gives B its own ``n' = x.size(0)``;
    for a nano-batch, ``n'`` is then that nano-batch's size, not the full batch's.
    """
    region_of = {n: i for i, r in enumerate(regions) for n in r.nodes}
    for node in reversed(_compute_nodes(gm)):
        if node not in region_of or not _is_size_node(node):
            continue
        home = region_of[node]
        by_region: dict[int, list[torch.fx.Node]] = defaultdict(list)
        for user in node.users:
            if user.op != "output" and region_of.get(user, home) != home:
                by_region[region_of[user]].append(user)
        for ri, users in by_region.items():
            first = min(users, key=lambda u: regions[ri].nodes.index(u))
            with gm.graph.inserting_before(first):
                copy = gm.graph.node_copy(node)
            copy.meta = dict(node.meta)
            for u in users:
                u.replace_input_with(node, copy)
            regions[ri].nodes.insert(regions[ri].nodes.index(first), copy)
            region_of[copy] = ri


def _resource(region: Region, rule_resource: Resource | None) -> Resource:
    if rule_resource is not None:
        return rule_resource
    names = [op_short_name(n) for n in region.nodes]
    if any(any(k in n for k in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")) for n in names):
        return Resource.NETWORK
    if any(n in _COMPUTE_OPS or n.startswith("conv") for n in names):
        return Resource.COMPUTE
    return Resource.MEMORY


def _tags(region: Region) -> tuple[Resource | None, frozenset[str]]:
    from dynaflow.frontend.rules import _split_tags

    return _split_tags(region.tags, f"segment {region.name!r}")


def _kind(region: Region, hints: frozenset[str], ba: BatchAnalysis, strict: bool) -> tuple[SegmentKind, str]:
    if ba.batch is None:
        return SegmentKind.SPLIT, "static batch: one nano-batch only"
    if "barrier" in hints:
        return SegmentKind.BARRIER, "tagged 'barrier'"
    if ba.whole_graph is not None:
        return SegmentKind.BARRIER, ba.whole_graph
    coupled = ba.reasons(region.nodes)
    if coupled and "batch-local" not in hints:
        node, why = coupled[0]
        if strict:
            raise BatchCouplingError(
                f"Segment {region.name!r} couples the batch: node {node.name!r} cannot run on nano-batch slices "
                f"because {why}.\n{node_context(node)}\nFix: remove the cross-batch dependency, tag the segment "
                "'batch-local' if it is in fact row-separable, or drop strict=True to run it as a barrier."
            )
        return SegmentKind.BARRIER, f"{node.name}: {why}"
    if not any(n in ba.touches for n in region.nodes):
        return SegmentKind.SHARED, "touches no batch data"
    return SegmentKind.SPLIT, "row-separable"


def _check_rules(user_rules: Sequence[Rule], matches: dict[Rule, int], gm: torch.fx.GraphModule) -> None:
    for rule in user_rules:
        if matches.get(rule, 0):
            continue
        classes = sorted({(c.__name__ if isinstance(c, type) else str(c).rsplit(".", 1)[-1])
                          for n in gm.graph.nodes for _, c in module_stack(n)})
        ops = sorted({op_name(n) for n in _compute_nodes(gm)})
        target = getattr(rule, "target", getattr(rule, "pattern", None))
        hint = did_you_mean(target.__name__ if isinstance(target, type) else str(target), classes + ops) if target else ""
        raise PartitionError(
            f"Split rule {rule!r} matches no node of the captured graph.{hint} Module classes in the model: "
            f"{', '.join(classes[:12]) or 'none'}; ops: {', '.join(ops[:12])}{' ...' if len(ops) > 12 else ''}. "
            "Fix the rule's target or drop the rule."
        )


def partition(
    gm: torch.fx.GraphModule,
    *,
    batch_dim: int = 0,
    rules: Sequence[Any] | None = None,
    strict: bool = False,
) -> SegmentedModule:
    """Cut ``gm`` into tagged segments and describe its boundary values for the backend."""
    graph_text = gm.print_readable(print_output=False) if hasattr(gm, "print_readable") else str(gm.graph)
    user_rules = [as_rule(r) for r in rules] if rules is not None else []
    hoist_waits(gm)  # a collective and its wait_tensor stay in one segment
    lift_index_lists(gm)  # x[..., [-2], :]: no host-to-device copy of the list per call (nor in a graph capture)
    functionalize_inplace(gm)  # in-place dist.all_reduce: later readers depend on the collective
    has_markers = any(is_marker(n) for n in gm.graph.nodes)
    active = user_rules if rules is not None else ([] if has_markers else default_rules())
    regions, matches = assign_regions(gm, active)
    _check_rules(user_rules, matches, gm)
    batch = find_batch_symbol(gm, batch_dim)
    others = candidate_symbols(gm, batch_dim)
    verdicts: dict[Any, Any] = {}
    regions = isolate_barriers(regions, analyze(gm, batch, verdicts, others))
    rematerialize_sizes(gm, regions)
    ba = analyze(gm, batch, verdicts, others)
    segments = []
    for i, region in enumerate(regions):
        resource, hints = _tags(region)
        kind, reason = _kind(region, hints, ba, strict)
        segments.append(Segment(
            name=region.name, index=i, resource=_resource(region, resource), kind=kind, hints=hints,
            rule=region.rule, reason=reason, num_nodes=sum(1 for n in region.nodes if not is_marker(n)),
            collectives=describe_collectives(region.nodes),
        ))
    for node in [n for n in gm.graph.nodes if is_marker(n)]:  # markers did their job: cut points
        gm.graph.erase_node(node)
    region_index = {n: i for i, r in enumerate(regions) for n in r.nodes if not is_marker(n)}
    if ba.batch is not None:
        segments = whole_where_written(gm, region_index, segments, strict, lambda n: _has_rows(ba, n))
        segments = main_split_where_written(gm, region_index, segments)
    check_waits(region_index, segments)
    effects = _effect_deps(gm, region_index, segments)
    split = cut(gm, region_index)
    return dataclasses.replace(read_back(split, segments, ba, graph_text), effect_deps=effects)


def _has_rows(ba: BatchAnalysis, node: torch.fx.Node) -> bool:
    """Whether ``node``'s value (every tensor of it) holds the batch as a dim: a nano-batch sees its rows."""
    dims, _ = ba.classify(meta_val(node))
    parts = dims if isinstance(dims, tuple) else (dims,)
    return bool(parts) and all(isinstance(d, int) and not isinstance(d, bool) for d in parts)


def whole_where_written(gm: torch.fx.GraphModule, region_index: dict[torch.fx.Node, int],
                        segments: list[Segment], strict: bool,
                        has_rows: Callable[[torch.fx.Node], bool] = lambda n: True) -> list[Segment]:
    """Run whole every split segment whose output an in-place write would reach in one copy while a later
    access reads another (:func:`~dynaflow.frontend.stale_copies.stale_copies`), until none is left: a segment made
    whole reads its split-made inputs as whole-batch copies, which may need the same."""
    segments = list(segments)
    while True:
        split = {i for i, s in enumerate(segments) if s.kind is SegmentKind.SPLIT}
        trusted = {i for i, s in enumerate(segments) if s.hints & {"batch-local", "nano-context"}}
        stale = stale_copies(gm, region_index, split, has_rows, trusted)
        if not stale:
            return segments
        for i, copy in sorted(stale.items()):
            why = copy.describe()
            if strict:
                raise BatchCouplingError(
                    f"Segment {segments[i].name!r} cannot run on nano-batch slices: {why}.\n"
                    f"{node_context(copy.writer)}\nFix: write a copy (x = x.clone() before the in-place op), write it "
                    "in the segment that makes it, or drop strict=True to run it as a barrier."
                )
            segments[i] = dataclasses.replace(segments[i], kind=SegmentKind.BARRIER, reason=why)
            log.debug("%s runs whole: %s", segments[i].name, why)


def main_split_where_written(gm: torch.fx.GraphModule, region_index: dict[torch.fx.Node, int],
                             segments: list[Segment]) -> list[Segment]:
    """Mark ``main_split`` the split segments that share a tensor written in place with a split segment of
    another resource: a per-resource re-split would give them other rows of it, and a write through one row
    range would miss the copy another range reads."""
    segments = list(segments)
    for group in written_storage_users(gm, region_index):
        split = [i for i in group if segments[i].kind is SegmentKind.SPLIT]
        if len({segments[i].resource for i in split}) > 1:
            for i in split:
                segments[i] = dataclasses.replace(segments[i], main_split=True)
    return segments


def _effect_deps(gm: torch.fx.GraphModule, region_index: dict[torch.fx.Node, int],
                 segments: list[Segment]) -> tuple[tuple[str, str], ...]:
    """Segment pairs that in-place writes order (see :mod:`dynaflow.frontend.effects`)."""
    deps = set()
    for first, then in effect_pairs(gm):
        a, b = region_index.get(first), region_index.get(then)
        if a is not None and b is not None and a != b:
            deps.add((segments[a].name, segments[b].name))
    return tuple(sorted(deps))


def cut(gm: torch.fx.GraphModule, region_index: dict[torch.fx.Node, int]) -> torch.fx.GraphModule:
    """``split_module`` with original order kept (in-place ops must not move)."""
    def callback(node: torch.fx.Node) -> int:
        if node not in region_index:
            raise PartitionError(f"internal: node {node.format_node()} was not assigned to a segment")
        return region_index[node]

    renamed = [n for n in gm.graph.nodes if n.name == "self"]
    for n in renamed:  # kept as a segment's placeholder name, ``self`` would be its forward's own first parameter
        n._rename("self_")  # (torch's reduce_scatter_tensor with scatter_dim != 0 names a node so; so may a model)
    if renamed:
        gm.recompile()
    return split_module(gm, None, callback, keep_original_order=True, keep_original_node_name=True)


def read_back(split: torch.fx.GraphModule, segments: list[Segment], ba: BatchAnalysis, graph_text: str) -> SegmentedModule:
    """Turn ``split_module``'s root graph into segment calls and classified boundary values."""
    values: dict[str, Value] = {}
    name_of: dict[torch.fx.Node, str] = {}
    placeholders = list(split.graph.find_nodes(op="placeholder"))
    for i, ph in enumerate(placeholders):
        values[ph.name] = _classify(ph.name, ba, meta_val(ph), "input", i)
        name_of[ph] = ph.name
    calls: list[SegmentCall] = []
    constants: dict[str, Any] = {}
    by_index = {s.index: s for s in segments}
    for node in split.graph.nodes:
        if node.op == "get_attr":  # weights of a GraphModule (export, symbolic_trace) used by several segments
            constants[node.name] = fetch_attr(split, str(node.target))
            values[node.name] = Value(node.name, ValueKind.FREE, None, "const", 0)
            name_of[node] = node.name
            continue
        if node.op != "call_module":
            continue
        seg = by_index[int(str(node.target).rsplit("_", 1)[-1])]
        sub: torch.fx.GraphModule = getattr(split, node.target)
        if getattr(sub, "_needs_recompile", lambda: False)():
            sub.real_recompile()  # a lazy GraphModule's bound forward would recompile-check on every launch
        outs = sub.graph.output_node().args[0]
        multi = isinstance(outs, (tuple, list))
        out_nodes = list(outs) if multi else [outs]
        names = []
        for j, out in enumerate(out_nodes):
            vname = f"{seg.name}.{out.name if isinstance(out, torch.fx.Node) else j}"
            values[vname] = _classify(vname, ba, meta_val(out) if isinstance(out, torch.fx.Node) else out, seg.name, j,
                                      whole=seg.kind is SegmentKind.BARRIER)
            names.append(vname)
        if multi:
            for user in node.users:
                if user.op == "call_function" and user.target is operator.getitem:
                    name_of[user] = names[user.args[1]]
        else:
            name_of[node] = names[0]
        args = []
        for a in node.args:
            if not isinstance(a, torch.fx.Node) or a not in name_of:
                raise PartitionError(f"internal: segment {seg.name} takes an unexpected argument {a!r}")
            args.append(name_of[a])
        calls.append(SegmentCall(seg, sub.forward, tuple(args), tuple(names), multi))
    out_arg = split.graph.output_node().args[0]
    tree = torch.fx.node.map_aggregate(out_arg, lambda a: OutRef(name_of[a]) if isinstance(a, torch.fx.Node) else a)
    return SegmentedModule(
        calls=tuple(calls), values=values, num_inputs=len(placeholders), output_tree=tree,
        output_is_tuple=isinstance(out_arg, (tuple, list)), batch_symbol=str(ba.batch) if ba.batch is not None else None,
        graph_text=graph_text, constants=constants,
    )


def dim_order(val: Any) -> tuple[int, ...] | None:
    """The dims of a dense tensor from outermost to innermost in memory, from its strides at trace time;
    ``None`` when it is row-major (or its strides are unknown or not a permutation of a dense layout)."""
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return None
    try:
        sizes = [int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
        strides = [int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in val.stride()]
    except (TypeError, AttributeError):  # an unbacked size: no hint
        return None
    order = dense_order(sizes, strides)
    return None if order is None or order == tuple(range(len(sizes))) else order


def dense_order(sizes: Sequence[int], strides: Sequence[int]) -> tuple[int, ...] | None:
    """The dims from outermost to innermost in memory when the elements fill one block without gaps or overlaps
    (each dim's stride is the product of the sizes inside it; size-1 dims are free), else ``None``."""
    order = tuple(sorted(range(len(sizes)), key=lambda d: (-strides[d], -d)))
    expect = 1
    for d in reversed(order):
        if sizes[d] != 1 and strides[d] != expect:
            return None
        expect *= sizes[d]
    return order


def fetch_attr(root: torch.nn.Module, target: str) -> Any:
    """The attribute ``target`` (a dotted path, as a ``get_attr`` node names it) of ``root``."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _classify(name: str, ba: BatchAnalysis, val: Any, source: str, index: int, whole: bool = False) -> Value:
    """What a boundary value is; ``whole``: its producer runs once on the whole batch (a barrier)."""
    dims, _ = ba.classify(val)
    if isinstance(dims, int) and not isinstance(dims, bool):
        return Value(name, ValueKind.BATCH, dims, source, index, dim_order(val))
    if dims == SYM:
        if isinstance(val, torch.SymInt) and val.node.expr == ba.batch:
            return Value(name, ValueKind.BATCH_SIZE, None, source, index)
        if whole:  # computed from the whole batch's size: the value eager has, the same for every reader
            return Value(name, ValueKind.FREE, None, source, index)
        raise PartitionError(
            f"Boundary value {name!r} is an int derived from the batch size ({val}) that crosses a segment boundary; "
            "dynaflow cannot split it. Compute it inside the segment that uses it."
        )
    if isinstance(dims, tuple) and any(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise PartitionError(f"Boundary value {name!r} is a tuple holding batch tensors; unpack it inside the segment.")
    return Value(name, ValueKind.FREE, None, source, index)
