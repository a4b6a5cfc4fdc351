"""The ``serve`` command: flags → a Registry and a Starlette app, run by uvicorn."""

from __future__ import annotations

import signal

import click

from ..errors import EdgeFSLMError
from ..units import fmt_bytes

DEFAULT_PORT = 8080  # llama-server's


def _require_server_extra() -> None:
    missing = []
    for mod in ("starlette", "uvicorn"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise EdgeFSLMError(f"edge-fslm serve needs {', '.join(missing)} — pip install 'edge-fslm[server]'")


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without a key, unless told so explicitly."""
    local = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    if not local and not api_key and not insecure:
        raise EdgeFSLMError(
            f"--host {host} would let anyone on the network use this server — set --api-key"
            " (or EDGE_FSLM_API_KEY), or pass --insecure to accept that")


@click.command()
@click.option("--stack", "-s", "stacks", multiple=True,
              help="A stack to serve (name, manifest or folder); repeat for several. Default: fslm-smollm2.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--api-key", envvar="EDGE_FSLM_API_KEY", help="Require 'Authorization: Bearer KEY' (env EDGE_FSLM_API_KEY).")
@click.option("--insecure", is_flag=True, help="Allow a non-local --host without --api-key.")
@click.option("--budget", "-b", help="Peak-RSS budget for all stacks together: 400MB, 1.5GiB, or 40% of available RAM.")
@click.option("--ctx-size", "-c", type=int, help="Context size in tokens for every stack.")
@click.option("--threads", "-t", type=int, help="CPU threads (default: physical cores).")
@click.option("--parallel", "-np", "parallel", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Requests for the same stack decoded together (llama-server's -np).")
@click.option("--parallel-idle", type=click.FloatRange(0), default=30.0, show_default=True,
              help="Seconds an empty queue keeps the --parallel context open for the next group.")
@click.option("--queue", "queue_size", type=click.IntRange(1, 100000), default=64, show_default=True,
              help="Requests that may wait; beyond this the server answers 429 with Retry-After.")
@click.option("--max-body", type=click.IntRange(1024, 1 << 30), default=1 << 20, show_default=True,
              help="Largest request body in bytes (413 above).")
@click.option("--preload", is_flag=True, help="Load every stack's models before accepting requests.")
@click.option("--grace", type=float, default=30.0, show_default=True,
              help="Seconds SIGTERM waits for requests in flight before exiting.")
@click.option("--offline/--online", default=None, help="Never touch the network for hf:// models (HF_HUB_OFFLINE).")
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
def serve(stacks, host, port, api_key, insecure, budget, ctx_size, threads, parallel, parallel_idle, queue_size,
          max_body, preload, grace, offline, verbose):
    """Serve stacks over an OpenAI-compatible API (/v1/chat/completions) and a page at /."""
    _require_server_extra()
    check_exposure(host, api_key, insecure)
    import uvicorn

    from .app import ServeSettings, create_app
    from .registry import Registry

    registry = Registry.open(list(stacks) or ["fslm-smollm2"], budget=budget, ctx_size=ctx_size, threads=threads,
                             offline=offline)
    if preload:
        registry.preload()
    settings = ServeSettings(api_key=api_key or None, max_body_bytes=max_body, queue_size=queue_size,
                             parallel=parallel, parallel_idle=parallel_idle, grace_seconds=grace)
    app = create_app(registry, settings)
    names = ", ".join(registry.names)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"edge-fslm serve: {names} on http://{shown}:{port}/v1 (page at /) · budget "
               f"{'none' if registry.budget is None else fmt_bytes(registry.budget)} · parallel {parallel}",
               err=True)
    # uvicorn re-raises the signal that stopped it once it has drained; a handler that only
    # returns makes that a clean exit 0 instead of death by SIGTERM
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning",
                timeout_graceful_shutdown=grace, access_log=verbose)
    click.echo("edge-fslm serve: stopped", err=True)
