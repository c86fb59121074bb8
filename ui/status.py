"""The Nodes tab: one row per node of the registry and a summary per model served.

Rendering is split from Gradio wiring: `nodes_frame` and `summary_html` are plain
functions of data (testable without a browser); `build_status_tab` only wires them to
components and a 1 s timer that runs while the tab is open."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from cluster.local_node import MasterNode
from cluster.registry import NodeInfo, NodeRegistry, NodeState
from inference.async_engine import AsyncEngine, EngineStats

# Most telling first: on a phone the first columns are what shows without scrolling.
COLUMNS = [
    "node",
    "state",
    "layers",
    "model",
    "backend / device",
    "memory used / free",
    "tok/s",
    "heartbeat",
    "RTT",
    "address",
]
DATATYPES = ["str", "html"] + ["str"] * (len(COLUMNS) - 2)  # state: a coloured dot (CSS)
REFRESH_S = 1.0  # the status page refreshes at most this often


def fmt_bytes(n: int) -> str:
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    if n < 2**30:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**30:.1f} GiB"


def fmt_layers(node: NodeInfo, total: int | None) -> str:
    """Decoder layers [start, end) as "start-end", with the model's layer count when known."""
    if node.num_layers == 0:  # a joining worker, or a pipeline master (embedding and head only)
        return "none yet" if node.state in (NodeState.JOINING, NodeState.LOADING) else "none"
    span = f"{node.layer_start}-{node.layer_end}"
    return f"{span} of {total}" if total else span


def nodes_frame(nodes: list[NodeInfo], now: float, total_layers: dict[str, int] | None = None) -> pd.DataFrame:
    """The node table; `now` is time.monotonic(), `total_layers` maps model -> layer count."""
    total_layers = total_layers or {}
    rows = [
        [
            n.node_id,
            f'<span class="node-state state-{n.state.value}">{n.state.value}</span>',
            fmt_layers(n, total_layers.get(n.model)),
            n.model,
            f"{n.backend} / {n.device}",
            f"{fmt_bytes(n.mem_used_bytes)} / {fmt_bytes(n.mem_free_bytes)}",
            "—" if n.tok_s is None else f"{n.tok_s:.1f}",
            f"{max(0.0, now - n.last_heartbeat):.1f} s ago",
            "—" if n.rtt_ms is None else f"{n.rtt_ms:.1f} ms",
            n.address,
        ]
        for n in nodes
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


@dataclass(slots=True)
class ModelSummary:
    model: str
    ready: bool
    waiting: int
    running: int
    kv_used: int
    kv_free: int
    prefix: str  # the prefix cache: hit rate, cached tokens, evictions ("off" when disabled)
    tok_s: float | None
    nodes: int
    vision: str = ""  # where the vision tower runs and its weights ("" for a text-only model)


def summarize(stats: EngineStats, nodes: list[NodeInfo], master_id: str | None) -> ModelSummary:
    """The served model's queue and cache from the engine; its rate from the master's row:
    every generated token passes through the master's LM head exactly once, so summing
    the rates of pipeline stages would count each token once per stage."""
    mine = [n for n in nodes if n.model == stats.model]
    master = next((n for n in mine if n.node_id == master_id), None)
    return ModelSummary(
        stats.model,
        stats.ready,
        stats.waiting,
        stats.running,
        stats.kv_blocks_used,
        stats.kv_blocks_free,
        prefix_summary(stats),
        master.tok_s if master is not None else None,
        len(mine),
    )


def prefix_summary(stats: EngineStats) -> str:
    p = stats.prefix_cache
    if p is None:
        return "off"
    return (
        f"{p.hit_rate:.0%} hit · {fmt_count(p.hit_tokens)} tokens reused · "
        f"{fmt_count(p.cached_tokens)} cached · {p.evicted_blocks} evicted"
    )


def fmt_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 10**6 else f"{n / 1e3:.1f}k" if n >= 10**4 else str(n)


def summary_html(summaries: list[ModelSummary]) -> str:
    cards = []
    for s in summaries:
        state = "ready" if s.ready else "loading…"
        rate = "—" if s.tok_s is None else f"{s.tok_s:.1f}"
        stats = [
            ("queued", s.waiting),
            ("running", s.running),
            ("KV blocks used / free", f"{s.kv_used} / {s.kv_free}"),
            ("prefix cache", s.prefix),
            ("tok/s", rate),
            ("nodes", s.nodes),
            *([("vision tower", s.vision)] if s.vision else []),
        ]
        cells = "".join(
            f'<div class="stat"><span class="stat-value">{html.escape(str(v))}</span>'
            f'<span class="stat-label">{html.escape(k)}</span></div>'
            for k, v in stats
        )
        cards.append(
            f'<section class="model-card"><header><strong>{html.escape(s.model)}</strong>'
            f'<span class="pill pill-{"ok" if s.ready else "wait"}">{state}</span></header>'
            f'<div class="stats">{cells}</div></section>'
        )
    return "".join(cards)


EMPTY_HELP = (
    "**No nodes yet.** The master lists itself here as soon as it starts; workers "
    "appear when they join with `python -m cluster.worker --master http://HOST:PORT`."
)


class StatusView:
    """One refresh of the tab: re-measure the master's own row, then read a snapshot."""

    def __init__(self, engine: AsyncEngine, registry: NodeRegistry, master: MasterNode | None):
        self.engine = engine
        self.registry = registry
        self.master = master

    def render(self) -> tuple[str, pd.DataFrame, str]:
        now = time.monotonic()
        if self.master is not None:
            self.master.refresh(self.registry, now)
        nodes = self.registry.snapshot()
        info = self.engine.info()
        totals = {self.engine.model_name: info.num_layers} if info is not None else {}
        summary = summarize(self.engine.stats(), nodes, self.master.node_id if self.master else None)
        if info is not None and info.vision_bytes:
            # Pictures are encoded where the embedding is: always this server (the master).
            where = self.master.node_id if self.master is not None else "this server"
            summary.vision = f"{where} · {fmt_bytes(info.vision_bytes)}"
        frame = nodes_frame(nodes, now, totals)
        return summary_html([summary]), frame, "" if nodes else EMPTY_HELP


def build_status_tab(view: StatusView, tab: gr.Tab) -> gr.Timer:
    """Components of the Nodes tab; call inside `with tab:`. The timer runs only while the
    tab is selected, so an idle chat page costs the server nothing. Returns the timer:
    the caller stops it (`stop_timer`) when another tab is selected."""
    summary = gr.HTML(elem_id="model-summary", js_on_load=None)
    empty = gr.Markdown(elem_id="nodes-empty")
    table = gr.Dataframe(
        headers=COLUMNS,
        datatype=DATATYPES,
        interactive=False,
        wrap=False,
        elem_id="nodes-table",
        label="Nodes",
        show_label=False,
        max_height=480,
    )
    gr.Markdown(
        "Layers are decoder layers `[start, end)`. Memory is the process / available "
        "RAM on CPU and used / free device memory on CUDA. Refreshes every second "
        "while this tab is open.",
        elem_classes=["muted"],
    )
    timer = gr.Timer(REFRESH_S, active=False)
    outputs = [summary, table, empty]
    timer.tick(view.render, outputs=outputs, show_progress="hidden", queue=False)
    tab.select(lambda: gr.Timer(active=True), outputs=timer, queue=False).then(
        view.render, outputs=outputs, show_progress="hidden", queue=False
    )
    return timer


def stop_timer() -> gr.Timer:
    return gr.Timer(active=False)
