"""One HTTP request's engine requests: admission, merged output, abort, accounting."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.adapter_errors import AdapterError, AdapterQueueFull, ModelNotFoundError
from server.backends.base import (
    Backend,
    EngineDeadError,
    EngineInputError,
    GenerateOutput,
    GenerateRequest,
    SamplingOptions,
)
from server.errors import (
    APIError,
    adapter_queue_full,
    adapter_refused,
    bad_request,
    model_not_found,
)
from server.metrics import Metrics


@dataclass
class Admission:
    """A bounded queue: at most ``limit`` engine requests admitted at once.

    Beyond that the server answers 429 with Retry-After instead of queueing without
    bound; while draining (SIGTERM) it answers 503.
    """

    limit: int
    in_flight: int = 0
    draining: bool = False

    def acquire(self, count: int, metrics: Metrics) -> None:
        if self.draining:
            raise APIError(503, "server is shutting down", type="service_unavailable",
                           headers={"Retry-After": "5"})
        if self.in_flight + count > self.limit:
            metrics.rejected.inc()
            raise APIError(
                429, f"too many requests in flight (limit {self.limit}); retry later",
                type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"},
            )
        self.in_flight += count

    def release(self, count: int) -> None:
        self.in_flight -= count


@dataclass
class Run:
    """Runs prompts through the engine and yields ``(prompt_index, output)`` in arrival order."""

    backend: Backend
    admission: Admission
    metrics: Metrics
    endpoint: str
    prompts: list[list[int]]
    sampling: SamplingOptions
    cache_salt: str | None = None
    stream: bool = True
    model: str | None = None  # the request's ``model`` (which adapter, on a server of many)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    start: float = field(default_factory=time.monotonic)
    finished: set[int] = field(default_factory=set)
    aborted: bool = False
    _got_first: bool = False
    _released: bool = False

    @property
    def model_name(self) -> str:
        """The ``model`` a response names: the one asked for, else the server's own."""
        return self.model or self.backend.info.name

    def engine_id(self, index: int) -> str:
        return f"{self.request_id}-{index}"

    def __post_init__(self) -> None:
        self.admission.acquire(len(self.prompts), self.metrics)
        self.metrics.running.inc(len(self.prompts))
        self.metrics.queue_depth.inc(len(self.prompts))
        self.metrics.talan.labels("on" if self.sampling.talan_enabled else "off").inc()
        self.metrics.prompt_tokens.inc(sum(len(p) for p in self.prompts))

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.admission.release(len(self.prompts))
        self.metrics.running.dec(len(self.prompts))
        if not self._got_first:
            self.metrics.queue_depth.dec(len(self.prompts))

    async def abort(self, reason: str) -> None:
        """Free every unfinished engine request of this run (client gone, error, ...)."""
        unfinished = [i for i in range(len(self.prompts)) if i not in self.finished]
        if not unfinished or self.aborted:
            return
        self.aborted = True
        self.metrics.aborted.labels(reason).inc()
        for index in unfinished:
            await self.backend.abort(self.engine_id(index))

    def _account(self, output: GenerateOutput) -> None:
        if not self._got_first:
            self._got_first = True
            self.metrics.queue_depth.dec(len(self.prompts))
            if self.stream:  # a non-streamed answer arrives whole: no first-token time
                self.metrics.first_token.labels(self.endpoint).observe(
                    time.monotonic() - self.start)
        self.metrics.generation_tokens.inc(sum(len(s.token_ids) for s in output.sequences))

    def _request(self, index: int) -> GenerateRequest:
        return GenerateRequest(self.engine_id(index), self.prompts[index], self.sampling,
                               self.cache_salt, self.stream, self.model)

    async def outputs(self) -> AsyncIterator[tuple[int, GenerateOutput]]:
        try:
            if len(self.prompts) == 1:
                # The common case: no queue, no extra task.
                async for output in self.backend.generate(self._request(0)):
                    self._account(output)
                    if output.finished:
                        self.finished.add(0)
                    yield 0, output
            else:
                async for index, output in self._merged():
                    self._account(output)
                    if output.finished:
                        self.finished.add(index)
                    yield index, output
        except EngineInputError as error:
            await self._stop("error")
            raise bad_request(str(error)) from error
        except ModelNotFoundError as error:  # an adapter unloaded since admission
            await self._stop("error")
            raise model_not_found(str(error)) from error
        except AdapterError as error:  # an adapter of --adapter-dir refused at its load
            await self._stop("error")
            raise adapter_refused(error) from error
        except AdapterQueueFull as error:
            await self._stop("error")
            self.metrics.rejected.inc()
            raise adapter_queue_full(error) from error
        except EngineDeadError as error:
            await self._stop("error")
            raise APIError(503, f"engine unavailable: {error}", type="service_unavailable",
                           headers={"Retry-After": "5"}) from error
        except (asyncio.CancelledError, GeneratorExit):
            await self._stop("client_disconnect")
            raise
        except BaseException:
            await self._stop("error")
            raise
        finally:
            self.release()

    async def _stop(self, reason: str) -> None:
        # Shielded: a cancelled request must still reach the engine's abort.
        if len(self.finished) < len(self.prompts):
            await asyncio.shield(self.abort(reason))

    async def _merged(self) -> AsyncIterator[tuple[int, GenerateOutput]]:
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int) -> None:
            try:
                async for output in self.backend.generate(self._request(index)):
                    await queue.put((index, output))
            except BaseException as error:  # noqa: B036 - forwarded to the consumer
                await queue.put((index, error))
                return
            await queue.put((index, done))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.prompts))]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
