"""Host µs per call of the pieces of a small gemmbridge call (fp32 64³), to see where time goes."""

import torch
from cuda.bindings import driver
from host_overhead_ab import per_call  # this folder: the timing loop both scripts use

import gemmbridge as gb
from gemmbridge import ops
from gemmbridge.arrays import BY_TYPE
from gemmbridge.backends.cuda import bindings, workspace
from gemmbridge.backends.cuda import graphs as graphs_mod

a = torch.randn(64, 64, device="cuda")
b = torch.randn(64, 64, device="cuda")
d = torch.empty(64, 64, device="cuda")
for _ in range(3):
    gb.matmul(a, b, out=d)  # the second sighting of these pointers captures a graph
fw = BY_TYPE[torch.Tensor]
entry = next(iter(ops._cache().values()))
plan, graphs = next(iter(entry.plans.plans.values()))
stream = fw.stream(0)
graph = next(iter(graphs.execs.values()))
graph_obj = graph[0]
ws = workspace.pointer(fw, 0, stream, a)
ap, bp, dp = a.data_ptr(), b.data_ptr(), d.data_ptr()
key = ("torch", fw.key(a), fw.key(b), None, None, None, False, False, "none")
rows = {
    "gb.matmul": lambda: gb.matmul(a, b),
    "torch.matmul": lambda: torch.matmul(a, b),
    "torch.mm(out=)": lambda: torch.mm(a, b, out=d),
    "gb.matmul(out=)": lambda: gb.matmul(a, b, out=d),
    "cublasLtMatmul (vendor floor)": lambda: bindings.launch(
        plan, entry.problem, ap, bp, dp, dp, 0, 1.0, 0.0, ws, stream
    ),
    "cuGraphLaunch (classic bindings)": lambda: driver.cuGraphLaunch(graph_obj, stream),
    "graphs._launch (used)": lambda: graphs_mod._launch(graph, stream),
    "new_empty": lambda: a.new_empty((64, 64)),
    "fw.key x2": lambda: (fw.key(a), fw.key(b)),
    "key+lookup": lambda: ops._cache().get(("torch", fw.key(a), fw.key(b), None, None, None, False, False, "none")),
    "stream": lambda: fw.stream(0),
    "capturing": lambda: fw.capturing(0),
    "current_device": lambda: fw.current_device(),
    "tf32 flag": lambda: fw.default_allow_tf32(),
    "workspace": lambda: workspace.pointer(fw, 0, stream, a),
    "data_ptr x3": lambda: (a.data_ptr(), b.data_ptr(), d.data_ptr()),
}
for name, fn in rows.items():
    print(f"{name:34} {per_call(fn):7.2f} us")
