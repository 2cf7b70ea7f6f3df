"""`loraplex serve` (the OpenAI-compatible server) and `loraplex generate` (a quick try of the
engine from the command line)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from registry.console import TrackingUri, user_errors


def generate(
    prompt: Annotated[str, typer.Argument(help="The user message (chat template applied).")],
    adapter: Annotated[
        str | None,
        typer.Option(help="Registry REF (name, name/3, name@champion) or a PEFT folder."),
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="Embedded name or HF folder.")] = None,
    quantization: Annotated[str, typer.Option(help="nf4, fp4 or none.")] = "nf4",
    max_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option(help="In (0, 1].")] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, no template.")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Generate one answer with the base model or an adapter."""
    from registry.home import setup_environment

    with user_errors(tracking_uri):
        setup_environment()
        from serve import SamplingParams

        _check_quantization(quantization)
        params = SamplingParams(  # a bad value: UsageError naming it, before the model loads
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
        _check_adapters([adapter] if adapter else [], tracking_uri)
        llm = _make_llm(base_model, quantization, tracking_uri)
        name = None
        if adapter:
            name = "adapter"
            llm.load_adapter(name, adapter)
        if raw:
            [output] = llm.generate([prompt], params, adapters=[name])
        else:
            [output] = llm.chat([{"role": "user", "content": prompt}], params, adapters=[name])
    print(output.text)


def serve(
    config: Annotated[
        Path | None, typer.Argument(help="Serve YAML, e.g. configs/serve/X.yaml (optional).")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="KEY=VALUE overrides of the YAML, e.g. engine.max_num_seqs=64."),
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="Embedded name or HF folder.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port to listen on (default 8000).")
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(help="NAME=REF to load at start (REF: registry reference or folder)."),
    ] = None,
    adapter_dir: Annotated[
        Path | None,
        typer.Option(help="Folder of adapter folders, each loaded when a request names it."),
    ] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Serve the base model and adapters over an OpenAI-compatible REST API.

    Settings come from the YAML (see configs/serve/); KEY=VALUE items and the options override it.
    """
    from registry.home import setup_environment

    with user_errors(tracking_uri):
        setup_environment()
        from serve.serve_config import serve_settings

        settings = serve_settings(
            config,
            overrides or [],
            adapter or [],
            base_model=base_model,
            host=host,
            port=port,
            adapter_dir=adapter_dir,
            tracking_uri=tracking_uri,
        )
    with user_errors(settings.tracking_uri):  # the YAML's or an override's, named in errors
        _serve(settings)


def _serve(settings) -> None:
    import uvicorn

    from registry.errors import UsageError
    from registry.home import Home
    from serve import LLM
    from serve.api_keys import ApiKeys
    from serve.async_engine import AsyncLLM
    from serve.audit import AuditLog
    from serve.server import create_app

    # Before the minute the base model takes to load:
    _check_port_free(settings.host, settings.port)
    _check_adapters(settings.adapters.values(), settings.tracking_uri)
    if settings.adapter_dir is not None and not settings.adapter_dir.is_dir():
        raise UsageError(f"adapter_dir: {str(settings.adapter_dir)!r} is not a folder")
    ApiKeys(settings.api_keys)  # each key's variable is set
    AuditLog(settings.audit_path(Home.from_env())).close()  # the log can be written
    llm = LLM(**settings.engine_config().model_dump())
    for name, source in settings.adapters.items():
        llm.load_adapter(name, source)
    base_name = llm.engine.base.path.name  # a folder by its own name (`.` too)
    engine = AsyncLLM(llm.engine, settings.max_waiting)
    app = create_app(engine, base_name, settings)
    in_dir = f" (and those in {settings.adapter_dir} when asked)" if settings.adapter_dir else ""
    print(
        f"serving {base_name} and {len(settings.adapters)} "
        f"adapter{'' if len(settings.adapters) == 1 else 's'}{in_dir} on "
        f"http://{settings.host}:{settings.port}/v1",
        flush=True,
    )
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            timeout_graceful_shutdown=settings.shutdown_timeout_s,
        )
    finally:  # however uvicorn ended (a second Ctrl-C skips its shutdown): a step left running
        engine.shutdown()  # in a thread as the interpreter exits aborts the process


def _check_port_free(host: str, port: int) -> None:
    import socket

    from registry.errors import UsageError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn binds it
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as error:
        raise UsageError(f"port {port}: cannot listen on {host}:{port}: {error.strerror}") from None


def _check_adapters(sources, tracking_uri: str | None) -> None:
    """Each REF names a registered version and each folder holds an adapter (fetched once now).

    Whether it was trained on this base is checked when it loads, after the base.
    """
    from registry.resolve import resolve_adapter

    for source in sources:
        resolve_adapter(source, tracking_uri=tracking_uri)


def _check_quantization(quantization: str) -> None:
    from registry.errors import UsageError

    if quantization not in ("nf4", "fp4", "none"):
        raise UsageError(f"--quantization must be nf4, fp4 or none (got {quantization!r})")


def _make_llm(base_model: str | None, quantization: str, tracking_uri: str | None):
    from serve import LLM

    args = {"tracking_uri": tracking_uri}
    if base_model:
        args["base_model"] = base_model
    return LLM(quantization=quantization, **args)
