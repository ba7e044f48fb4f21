"""MCP (the Model Context Protocol): every program the gateway serves as a tool that agent hosts call.

A tool per served name (each name and alias of a multi-model gateway, as /v1/models lists them):

- its `name` is the served name with every character but letters, digits, `_` and `-` written as `_`
  (`dspy-qa@champion` -> `dspy-qa_champion`; hosts such as Claude's and OpenAI's accept no other), and its
  `title` the served name itself;
- its input schema is /predict's: the program's input fields by name, typed (predict/shape.py);
- its output schema the program's output fields, and a call's result holds them in `structuredContent`,
  typed as /predict's `data`, with their JSON as a text content too;
- its description is the program's own: the docstring of a module class of the user's (not DSPy's), else
  the instructions of its signature (the last predictor's, the one that writes the answer).

A tool call is a /predict request in all but its wire (`McpTools.call`): the program looked up by name
(the split's variant, the version an alias names now), the arguments validated as /predict's body is (a bad
one is a tool error naming the field, `isError: true`, that the calling model can read and fix), one slot
of --max-in-flight, the run within --request-timeout, its trace (tagged route `/mcp`), its metrics and log
line (route `/mcp`, the tool's name as the model, the status /predict would have answered). An unknown tool
is a JSON-RPC error (`-32602`).

Two transports, one set of tools:

- **Streamable HTTP at `/mcp`** in the gateway (`McpTools.serve`, called by the road after the Host, the key
  and the body have passed admission, as for every route): stateless and answered as JSON, so each POST is
  self-contained and any worker can take it. A tool call carried by a POST fills that request's context
  (one request, one log line, one trace). A browser's `Origin` must be one of --allow-origin (MCP's guard
  against DNS rebinding).
- **stdio** (`serve_stdio`, `mlflow-dspy mcp -m URI`): the gateway without HTTP, for desktop hosts that
  start a server as a child process; stdout carries the protocol alone, everything else goes to stderr.

Both speak every protocol revision of the `mcp` SDK: the 2025 handshake (`initialize`) that hosts use
today, and the 2026-07-28 per-request envelope that the SDK's own client tries first.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import re
import signal
import sys
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import dspy
import mcp_types as types
from fastapi.encoders import jsonable_encoder
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import MCPError
from starlette.responses import Response

from mlflow_dspy import __version__
from mlflow_dspy.gateway.config import GatewayConfig
from mlflow_dspy.gateway.context import CONTEXT_KEY, RequestContext
from mlflow_dspy.gateway.errors import GatewayError
from mlflow_dspy.gateway.predict.shape import PredictShape
from mlflow_dspy.program.work import tracking_thread_work
from mlflow_dspy.runtime.host import ProgramHost
from mlflow_dspy.runtime.run import Failed

if TYPE_CHECKING:
    from mlflow_dspy.gateway.app import Gateway

log = logging.getLogger("mlflow_dspy.gateway")

MCP_PATH = "/mcp"
# The headers MCP clients send besides the usual ones (a browser asks first whether it may, with CORS on).
MCP_HEADERS = ("Mcp-Protocol-Version", "Mcp-Method", "Mcp-Name")
# Where a tool call carried by HTTP leaves its status for the request's metrics and log line (the HTTP
# answer itself is a 200 holding the tool's result, error or not).
TOOL_STATUS = "mlflow_dspy.mcp.tool_status"
INSTRUCTIONS = ("Each tool runs a DSPy program: call it with the program's input fields as arguments; its result "
                "holds the program's output fields.")
_NOT_A_TOOL_NAME = re.compile(r"[^A-Za-z0-9_-]")


def tool_name(served: str) -> str:
    """The tool's name for a served name: what hosts accept (letters, digits, `_`, `-`), other characters as `_`."""
    return _NOT_A_TOOL_NAME.sub("_", served)


def description(module: dspy.Module) -> str:
    """What a program does, as its tool's description: the docstring of a module class of the user's own,
    else the instructions of the signature of its last predictor (the step that writes the answer)."""
    cls = type(module)
    own = vars(cls).get("__doc__")
    if own and not cls.__module__.startswith("dspy."):
        return inspect.cleandoc(own)
    predictors = module.predictors()
    return predictors[-1].signature.instructions if predictors else ""


@dataclass(frozen=True)
class ToolShape:
    """One loaded program as a tool (built once per loaded version; the name is the served one's)."""

    shape: PredictShape
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]


class McpTools:
    """The gateway's programs as MCP tools, over Streamable HTTP (`serve`) and stdio (`serve_stdio`)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.server = Server("mlflow-dspy", version=__version__, instructions=INSTRUCTIONS,
                             on_list_tools=self._list_tools, on_call_tool=self._call_tool,
                             get_tool_input_schema=self._input_schema)
        # The SDK's OpenTelemetry span per message: the gateway records its own traces.
        self.server.middleware = []
        self._shapes: weakref.WeakKeyDictionary[ProgramHost, ToolShape] = weakref.WeakKeyDictionary()
        self._manager: StreamableHTTPSessionManager | None = None

    # -- the tools -----------------------------------------------------------------------
    def served(self) -> dict[str, str]:
        """Tool name -> served name, for every name served now (aliases that moved included). Two served
        names that would make the same tool name: the first keeps it."""
        tools: dict[str, str] = {}
        for served in self.gateway.models.router.names():
            tools.setdefault(tool_name(served), served)
        return tools

    def shape(self, host: ProgramHost) -> ToolShape:
        """The tool a loaded program makes (its schemas, its description): built on first use."""
        made = self._shapes.get(host)
        if made is None:
            shape = PredictShape(host.program)
            made = self._shapes[host] = ToolShape(shape, description(host.program.program),
                                                  shape.inputs.model_json_schema(), shape.outputs.model_json_schema())
        return made

    def tools(self) -> list[types.Tool]:
        listed = []
        for name, served in self.served().items():
            made = self.shape(self.gateway.models.host(served))
            listed.append(types.Tool(name=name, title=served, description=made.description,
                                     input_schema=made.input_schema, output_schema=made.output_schema))
        return listed

    async def until_loaded(self) -> None:
        """Wait (up to --request-timeout) for the models' first load; a model that failed to load, or still
        loading then, is the gateway's 503."""
        models = self.gateway.models
        deadline = time.monotonic() + self.gateway.config.request_timeout
        while not models.loaded and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        models.get()  # the 503, if no model serves

    async def _list_tools(self, ctx: ServerRequestContext, params: types.PaginatedRequestParams | None
                          ) -> types.ListToolsResult:
        try:
            await self.until_loaded()
        except GatewayError as error:
            raise MCPError(types.INTERNAL_ERROR, error.message) from None
        return types.ListToolsResult(tools=self.tools())

    def _input_schema(self, name: str) -> dict[str, Any] | None:
        """A tool's input schema for the SDK's `Mcp-Param-*` header check (without listing every tool)."""
        served = self.served().get(name)
        if served is None:
            return None
        try:
            return self.shape(self.gateway.models.host(served)).input_schema
        except GatewayError:
            return None

    # -- a call --------------------------------------------------------------------------
    async def _call_tool(self, ctx: ServerRequestContext, params: types.CallToolRequestParams
                         ) -> types.CallToolResult:
        scope = getattr(ctx.request, "scope", None)  # the HTTP request that carried it (none over stdio)
        carried: RequestContext | None = scope.get(CONTEXT_KEY) if scope is not None else None
        # Over HTTP, the call fills the context of the request that carried it; over stdio, it is a request of
        # its own, with its own bookkeeping.
        call = carried or RequestContext("tools/call", MCP_PATH, {}, self.gateway.config.request_timeout)
        try:
            result, call.status = await self.call(call, params.name, params.arguments)
        except MCPError:
            call.status = 404
            raise
        except asyncio.CancelledError:
            call.status = 499  # the client cancelled it (or left), as a departed HTTP client
            raise
        except Exception as exc:
            call.status = 500
            log.error("a tool call failed unexpectedly", exc_info=exc)
            raise MCPError(types.INTERNAL_ERROR, "internal error") from None
        finally:
            if carried is None:
                self.gateway.finished(call)
            else:
                scope[TOOL_STATUS] = call.status
        return result

    async def call(self, ctx: RequestContext, name: str, arguments: dict[str, Any] | None
                   ) -> tuple[types.CallToolResult, int]:
        """Run tool `name` as a /predict request with `arguments` as its body, in `ctx`: the result, and the
        status /predict would have answered. An unknown tool raises the JSON-RPC error."""
        gateway = self.gateway
        try:
            await self.until_loaded()
            served = self.served().get(name)
            if served is None:
                listed = ", ".join(f"'{tool}'" for tool in self.served())
                raise MCPError(types.INVALID_PARAMS, f"unknown tool '{name}'; tools: {listed}")
            gateway.in_flight.take()
            ctx.holds_slot = True
            with tracking_thread_work() as ctx.threads:
                host = gateway.program_for(ctx, served)
                shape = self.shape(host).shape
                inputs = gateway.predict.inputs(json.dumps(arguments or {}).encode(), shape)
                outcome = await ctx.start_run(host, inputs).outcome()
            if isinstance(outcome, Failed):
                raise GatewayError.of(outcome.failure)
        except GatewayError as error:
            return types.CallToolResult(content=[types.TextContent(text=error.message)], is_error=True), error.status
        data = jsonable_encoder(outcome.prediction.toDict())
        return types.CallToolResult(content=[types.TextContent(text=json.dumps(data))], structured_content=data), 200

    # -- Streamable HTTP -----------------------------------------------------------------
    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """/mcp for the gateway's lifetime (its lifespan): stateless, each POST answered as one JSON body."""
        manager = StreamableHTTPSessionManager(self.server, json_response=True, stateless=True,
                                               max_request_body_size=self.gateway.limits.max_body_bytes)
        async with manager.run():
            self._manager = manager
            try:
                yield
            finally:
                self._manager = None

    async def serve(self, ctx: RequestContext, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """One HTTP request to /mcp, past the gateway's admission (Host, key, body)."""
        origin = ctx.headers.get(b"origin")
        if origin is not None and origin.decode("latin-1") not in self.gateway.config.cors_origins:
            # A browser page of another origin (DNS rebinding included): MCP servers must refuse it.
            error = GatewayError(403, "this origin may not call /mcp (see --allow-origin)", "permission_error",
                                 code="origin_not_allowed")
            await error.response()(scope, receive, send)
            return
        if ctx.method != "POST":
            # Stateless: no session to end (DELETE), and no message of the server's own to send on a GET stream,
            # which would only hold a connection open with nothing on it.
            await Response(status_code=405, headers={"Allow": "POST"})(scope, receive, send)
            return
        if self._manager is None:
            error = GatewayError(503, "MCP is served once the gateway has started", "service_unavailable",
                                 code="not_started")
            await error.response()(scope, receive, send)
            return
        await self._manager.handle_request(scope, receive, send)
        if TOOL_STATUS in scope:
            ctx.status = scope[TOOL_STATUS]
        elif ctx.model is None:
            ctx.model = ""  # a protocol message (initialize, tools/list, ...): counted under no program's name


# -- stdio -------------------------------------------------------------------------------
def serve_stdio(config: GatewayConfig) -> int:
    """`mlflow-dspy mcp`: serve `config`'s programs as MCP tools over stdin and stdout until stdin closes."""
    return asyncio.run(_serve_stdio(replace(config, load_before_serving=True)))


async def _serve_stdio(config: GatewayConfig) -> int:
    from mlflow_dspy.gateway.app import _configure_logging, create_app

    _configure_logging()  # on stderr
    # Inside, the process's stdout (print, a library's or a C extension's writes) goes to stderr: the SDK serves
    # the protocol from a private copy of it.
    async with stdio_server() as (read, write):
        gateway = create_app(config)
        async with gateway.lifespan(gateway.app):  # its end flushes the queued traces
            code, signalled = await _serve_tools(gateway, read, write)
        if signalled:
            # Stopped by SIGTERM with stdin still open: the SDK's reader of stdin is blocked on a thread that only
            # a line or its end would free. The stop is done; nothing is left to wait for.
            logging.shutdown()
            sys.stderr.flush()
            os._exit(code)
    return code


async def _serve_tools(gateway: Gateway, read: Any, write: Any) -> tuple[int, bool]:
    """The tools of a started gateway over the stdio streams, until stdin closes or a SIGTERM: the exit code,
    and whether the signal ended it."""
    if not gateway.models.router.loaded():
        failure = gateway.models.failure
        print("mlflow-dspy mcp: the model failed to load" + (f": {failure}" if failure else ""), file=sys.stderr,
              flush=True)
        return 1, False
    log.info("MCP over stdio: tools %s", ", ".join(gateway.mcp.served()))
    server = gateway.mcp.server
    serving = asyncio.ensure_future(server.run(read, write, server.create_initialization_options()))
    # A host stops its server by closing stdin, then, a moment later, with SIGTERM: either ends the serving,
    # and neither cuts short the stop that follows (the queued traces' flush); SIGKILL still does.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, serving.cancel)
    try:
        await serving
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():
            raise  # this task's own cancellation, not the signal's
        return 0, True
    return 0, False
