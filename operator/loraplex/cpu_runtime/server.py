"""The HTTP side of the CPU runtime: vLLM's OpenAI server routes and LoRA endpoints."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from loraplex.cpu_runtime.engine import AdapterError, Engine, Generation

BATCH_WINDOW_SECONDS = 0.01
MAX_BATCH = 16


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"object": "error", "message": message, "type": kind, "param": None, "code": status},
                             status=status)


class CpuRuntime:
    def __init__(self, engine: Engine, served_model: str):
        self.engine, self.served_model = engine, served_model
        self.queue: asyncio.Queue[tuple[Generation, asyncio.Future[str]]] = asyncio.Queue()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        app.on_startup.append(self._start_batcher)
        return app

    async def _start_batcher(self, app: web.Application) -> None:
        app["batcher"] = asyncio.create_task(self._batch_forever())

    async def _batch_forever(self) -> None:
        """Answer requests that arrive within a few milliseconds of each other in one pass."""
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + BATCH_WINDOW_SECONDS
            while len(batch) < MAX_BATCH and (remaining := deadline - time.monotonic()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            try:
                texts = await asyncio.to_thread(self.engine.generate, [request for request, _ in batch])
            except AdapterError:  # one bad row must not fail the others: answer them one by one
                for request, future in batch:
                    try:
                        future.set_result((await asyncio.to_thread(self.engine.generate, [request]))[0])
                    except Exception as exc:
                        future.set_exception(exc)
                continue
            except Exception as exc:
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), text in zip(batch, texts, strict=True):
                future.set_result(text)

    async def _generate(self, request: Generation) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        await self.queue.put((request, future))
        return await future

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        cards = [{"id": self.served_model, "object": "model", "created": now, "owned_by": "loraplex",
                  "root": self.served_model, "parent": None}]
        cards += [{"id": name, "object": "model", "created": now, "owned_by": "loraplex", "root": path,
                   "parent": self.served_model} for name, path in sorted(self.engine.adapters.items())]
        return web.json_response({"object": "list", "data": cards})

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="request body must be JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="request body must be a JSON object")
        return body

    def _generation(self, body: dict[str, Any], prompt: str) -> Generation | web.Response:
        model = body.get("model", self.served_model)
        if model != self.served_model and model not in self.engine.adapters:
            return _error(404, "NotFoundError", f"The model `{model}` does not exist.")
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 2048:
            return _error(400, "BadRequestError", "max_tokens must be an integer between 1 and 2048")
        return Generation(prompt=prompt, adapter=None if model == self.served_model else model, max_tokens=max_tokens,
                          temperature=float(body.get("temperature", 0.0) or 0.0))

    async def completions(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return _error(400, "BadRequestError", "prompt must be a string")
        return await self._answer(body, prompt, "text_completion", lambda text: {"text": text, "logprobs": None})

    async def chat(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "BadRequestError", "messages must be a non-empty list")
        return await self._answer(body, self.engine.chat_prompt(messages), "chat.completion",
                                  lambda text: {"message": {"role": "assistant", "content": text}})

    async def _answer(self, body: dict[str, Any], prompt: str, kind: str,
                      choice: Callable[[str], dict[str, Any]]) -> web.Response:
        generation = self._generation(body, prompt)
        if isinstance(generation, web.Response):
            return generation
        try:
            text = await self._generate(generation)
        except AdapterError as exc:
            return _error(exc.status, exc.kind, exc.message)
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        return web.json_response({
            "id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": body.get("model", self.served_model),
            "choices": [{"index": 0, **choice(text), "finish_reason": "length"}],
        })

    async def load(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return _error(400, "InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided.")
        try:
            await asyncio.to_thread(self.engine.load, name, path)
        except AdapterError as exc:
            return _error(exc.status, exc.kind, exc.message)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name = body.get("lora_name")
        if not name:
            return _error(400, "InvalidUserInput", "either 'lora_name' and 'lora_int_id' needs to be provided.")
        try:
            await asyncio.to_thread(self.engine.unload, name)
        except AdapterError as exc:
            return _error(exc.status, exc.kind, exc.message)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def serve(model: str, served_model: str, host: str, port: int, max_adapters: int) -> None:
    engine = Engine(model, max_adapters=max_adapters)
    web.run_app(CpuRuntime(engine, served_model).app(), host=host, port=port, print=None)
