"""Host µs per call of the pieces of a small gemmbridge call (fp32 64³), to see where time goes."""

import torch
from cuda.bindings import driver
from host_overhead_ab import per_call  # this folder: the timing loop both scripts use

import gemmbridge as gb
from gemmbridge.arrays import BY_TYPE
from gemmbridge.backends.cuda import bindings, workspace
from gemmbridge.backends.cuda import graphs as graphs_mod
from gemmbridge.plan import PLANS, call_key
from gemmbridge.problem import Operands

a = torch.randn(64, 64, device="cuda")
b = torch.randn(64, 64, device="cuda")
d = torch.empty(64, 64, device="cuda")
for _ in range(3):
    gb.matmul(a, b, out=d)  # the second sighting of these pointers captures a graph
view = BY_TYPE[torch.Tensor]
plan = next(iter(PLANS.plans.values()))
lt_plan, graphs, _ = next(iter(plan.state.plans.values()))
ctx = view.context(0, a)
graph = next(iter(graphs.execs.values()))
ws = workspace.pointer(view, ctx)[1]
ptrs = Operands(a.data_ptr(), b.data_ptr(), d.data_ptr(), d.data_ptr(), 0, 0, 0)
options = (False, False, "none", None)
explicit = gb.Plan(a, b, out=d)
rows = {
    "gb.matmul": lambda: gb.matmul(a, b),
    "torch.matmul": lambda: torch.matmul(a, b),
    "torch.mm(out=)": lambda: torch.mm(a, b, out=d),
    "gb.matmul(out=)": lambda: gb.matmul(a, b, out=d),
    "gb.Plan.run(out=)": lambda: explicit.run(a, b, out=d),
    "cublasLtMatmul (vendor floor)": lambda: bindings.launch(lt_plan, ptrs, 1.0, 0.0, ws, ctx.stream),
    "cuGraphLaunch (classic bindings)": lambda: driver.cuGraphLaunch(graph[0], ctx.stream),
    "graphs._launch (used)": lambda: graphs_mod._launch(graph, ctx.stream),
    "torch.empty": lambda: ctx.empty((64, 64), "float32"),
    "view.key x2": lambda: (view.key(a), view.key(b)),
    "key+lookup": lambda: PLANS.plans.get(call_key(view, a, b, None, None, None, None, None, options)),
    "context (stream, capture state)": lambda: view.context(0, a),
    "current_device": lambda: view.current_device(),
    "tf32 policy": lambda: ctx.tf32(),
    "workspace": lambda: workspace.pointer(view, ctx),
    "data_ptr x3": lambda: (a.data_ptr(), b.data_ptr(), d.data_ptr()),
}
for name, fn in rows.items():
    print(f"{name:34} {per_call(fn):7.2f} us")
