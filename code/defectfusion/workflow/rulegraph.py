"""The pipeline's rule graph as a figure for the README and the book (Snakemake's
``--rulegraph``, laid out here)."""

from __future__ import annotations

from pathlib import Path

from defectfusion.core.errors import UserError
from defectfusion.core.fsutil import atomic_write_text
from defectfusion.workflow.jobs import run_command


def rulegraph_edges(dot: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Rule names and (upstream, downstream) edges of `snakemake --rulegraph`'s DOT."""
    import pydot

    graphs = pydot.graph_from_dot_data(dot)
    if not graphs:
        raise UserError("rulegraph: not a DOT graph")
    g = graphs[0]
    label = {}
    for n in g.get_nodes():
        name = n.get_name().strip('"')
        lab = (n.get_attributes().get("label") or "").strip('"')
        if name not in ("node", "edge", "graph") and lab:
            label[name] = lab
    edges = sorted(
        {
            (label[e.get_source().strip('"')], label[e.get_destination().strip('"')])
            for e in g.get_edges()
        }
    )
    return sorted(label.values()), edges


def draw_rulegraph(dot: str, out: str | Path) -> Path:
    """Draw the rule graph left to right by depth (graphviz, which would lay it out, is not a
    Python package). Direct dependencies are dark; ones also implied through another rule
    (data -> table, say) are faint, so the stages read in order and no edge is dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    nodes, edges = rulegraph_edges(dot)
    g = nx.DiGraph()
    g.add_nodes_from(nodes)
    g.add_edges_from(edges)
    direct = set(nx.transitive_reduction(g).edges())
    layers = list(nx.topological_generations(g))
    pos: dict[str, tuple[float, float]] = {}
    for x, layer in enumerate(layers):
        for i, name in enumerate(sorted(layer)):
            pos[name] = (x * 2.0, ((len(layer) - 1) / 2 - i) * 1.1)
    height = max(len(layer) for layer in layers)
    fig, ax = plt.subplots(figsize=(1.45 * len(layers) + 0.6, 0.75 * height + 0.9))
    for faint in (True, False):
        nx.draw_networkx_edges(
            g, pos, ax=ax,
            edgelist=[e for e in g.edges() if (e not in direct) == faint],
            arrows=True, arrowstyle="-|>", arrowsize=10, node_size=2300, node_shape="s",
            edge_color="#d0d0d0" if faint else "#555555", width=0.8 if faint else 1.4,
            connectionstyle="arc3,rad=0.08",
        )  # fmt: skip
    for name, (x, y) in pos.items():
        ax.text(
            x, y, name, ha="center", va="center", fontsize=8.5, zorder=3,
            bbox={"boxstyle": "round,pad=0.35", "fc": "#e8f0fa", "ec": "#3b6ea5"},
        )  # fmt: skip
    xs, ys = [x for x, _ in pos.values()], [y for _, y in pos.values()]
    ax.set_xlim(min(xs) - 0.9, max(xs) + 0.9)
    ax.set_ylim(min(ys) - 0.6, max(ys) + 0.6)
    ax.set_axis_off()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    return out


def write_rulegraph(out: str | Path, root: str | Path = ".") -> tuple[Path, Path]:
    """`snakemake --rulegraph` of the workflow in `root`: OUT.dot (the text) and OUT (drawn)."""
    r = run_command(["snakemake", "--cores", "1", "--rulegraph"], Path(root), "snakemake --rulegraph")
    dot = r.stdout[r.stdout.index("digraph") :]
    out = Path(out)
    dot_path = out.with_suffix(".dot")

    atomic_write_text(dot_path, dot)
    return dot_path, draw_rulegraph(dot, out)
