"""Whether a step can be captured whole — what CUDA graphs and a compiled step need: one graph
(``fullgraph=True``: a graph break, e.g. branching on a value read from the device, is an error),
static shapes, no shape that depends on the data (``nonzero``, ``masked_select``), no value read
on the host (``.item()``). Traced with ``torch.compile``'s ``aot_eager`` backend: forward and
backward are captured and run with the eager kernels, on any device."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch._dynamo.backends.debugging import aot_eager
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

HOST_READS = ("item", "tolist", torch.ops.aten._local_scalar_dense.default)


def traced(fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, list[torch.fx.GraphModule]]:
    """``fn(*args, **kwargs)`` compiled whole with static shapes, and the graphs it was given."""
    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=keep)(*args, **kwargs), graphs


def host_reads(graphs: list[torch.fx.GraphModule]) -> list[str]:
    """The graph nodes that read a tensor's value on the host."""
    return [f"{node.op} {node.target}" for gm in graphs for node in gm.graph.nodes if node.target in HOST_READS]


def data_dependent_shapes(graphs: list[torch.fx.GraphModule]) -> list[str]:
    """The graph nodes whose shape depends on the data (an unbacked size)."""
    return [f"{node.op} {node.target}" for gm in graphs for node in gm.graph.nodes
            if isinstance(node.meta.get("example_value"), torch.Tensor)
            and free_unbacked_symbols(node.meta["example_value"])]


def trace_report(fn: Callable, *args: Any, **kwargs: Any) -> dict:
    """``{"whole", "graphs", "data_dependent", "host_reads", "error"}`` of ``fn``'s capture;
    ``whole``: one graph, neither of the two, no error."""
    try:
        _, graphs = traced(fn, *args, **kwargs)
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as err:
        return {"whole": False, "graphs": None, "data_dependent": [], "host_reads": [],
                "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    found = {"data_dependent": data_dependent_shapes(graphs), "host_reads": host_reads(graphs)}
    return {"whole": len(graphs) == 1 and not any(found.values()), "graphs": len(graphs), **found, "error": None}
