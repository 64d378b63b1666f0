"""Server-sent events: ``stream(..., as_text_events=True)`` on a real 2-rank pool, and a real SSE client.

The worker streams whatever the payload lists (``items``, each with its ``image_format``), so each test
states its inputs; they travel to rank 0 and back pickled, as a worker's own values would.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from lightdist import DistributedRunner, DistributedWorker, TextEventError
from tests.conftest import wait_until

CALL_TIMEOUT = 60.0
DRIP_LIMIT = 30.0  # a dripping call gives up waiting for its cancel after this


class Emitter(DistributedWorker):
    """Rank 0 streams ``items`` (with ``formats[i]`` as image format, default jpeg), returns ``final``.

    With ``drip_token`` it then streams a counter until the call is cancelled and notes that it saw the
    cancel under the token; ``query_token`` returns that note.
    """

    def setup(self, **kwargs: Any) -> None:
        self.saw_cancel: dict[str, bool] = {}

    def __call__(
        self,
        items: list[Any] = [],  # noqa: B006 - never mutated
        formats: list[str] | None = None,
        final: Any = "done",
        drip_token: str | None = None,
        query_token: str | None = None,
        streaming: bool = False,
    ) -> Any:
        if query_token is not None:
            return self.saw_cancel.get(query_token)
        if self.rank == 0:
            for i, item in enumerate(items):
                self.add_streaming_result(item, image_format=formats[i] if formats else "jpeg")
        if drip_token is not None:
            self.saw_cancel[drip_token] = self._drip_until_cancelled()
        return final

    def _drip_until_cancelled(self) -> bool:
        deadline = time.monotonic() + DRIP_LIMIT
        i = 0
        while not self.cancelled and time.monotonic() < deadline:
            if self.rank == 0:
                self.add_streaming_result(i)
                i += 1
            time.sleep(0.005)
        return self.cancelled


@pytest.fixture(scope="module")
def pool() -> Iterator[DistributedRunner]:
    runner = DistributedRunner(Emitter, world_size=2)
    runner.start_sync(timeout=120)
    yield runner
    runner.stop_sync()


def events(runner: DistributedRunner, payload: dict[str, Any], how: str = "sync") -> list[bytes]:
    if how == "sync":
        return list(runner.stream_sync(payload, timeout=CALL_TIMEOUT, as_text_events=True))

    async def consume() -> list[bytes]:
        return [e async for e in runner.stream(payload, timeout=CALL_TIMEOUT, as_text_events=True)]

    return asyncio.run(consume())


def parse(event: bytes) -> Any:
    """The JSON of one ``data: <json>\\n\\n`` event, checking the framing on the way."""
    assert isinstance(event, bytes)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2, event[:80]
    return json.loads(event[len(b"data: ") : -2])


def decode_image(event: Any, fmt: str) -> Image.Image:
    """The PIL image in a media object as fal sends it, checking its fields against the pixels."""
    assert event["content_type"] == f"image/{fmt}" and event["data"] is None, {**event, "url": "..."}
    image = Image.open(io.BytesIO(decode_url(event["url"], f"image/{fmt}")))
    assert image.format == fmt.upper()
    assert (event["width"], event["height"]) == image.size
    return image


def decode_url(url: str, content_type: str) -> bytes:
    prefix = f"data:{content_type};base64,"
    assert url.startswith(prefix), url[:40]
    return base64.b64decode(url[len(prefix) :], validate=True)


def decode_tensor(event: Any) -> torch.Tensor:
    assert event["content_type"] == "application/tensor" and event["data"] is None
    tensor = torch.load(io.BytesIO(decode_url(event["url"], "application/tensor")))
    assert isinstance(tensor, torch.Tensor)
    assert (event["shape"], event["dtype"]) == (list(tensor.shape), str(tensor.dtype))
    return tensor


def decode_array(event: Any) -> np.ndarray:
    assert event["content_type"] == "application/ndarray" and event["data"] is None
    array = np.load(io.BytesIO(decode_url(event["url"], "application/ndarray")), allow_pickle=False)
    assert (event["shape"], event["dtype"]) == (list(array.shape), str(array.dtype))
    return array


def assert_serves(runner: DistributedRunner) -> None:
    assert [parse(e) for e in events(runner, {"items": [1, 2], "final": "ok"})] == [1, 2, "ok"]


HOW = pytest.mark.parametrize("how", ["sync", "async"])


@HOW
def test_text_events_are_data_frames_in_order_with_final_last(pool: DistributedRunner, how: str) -> None:
    """Every item is one `data: <json>\\n\\n` bytes event, in order; the final result is the last event."""
    items = [1, "two", {"three": [3.5, None, True]}, [4]]
    got = events(pool, {"items": items, "final": {"done": True}}, how)
    assert [parse(e) for e in got] == [*items, {"done": True}]


def test_tensors_and_arrays_become_fal_media_objects(pool: DistributedRunner) -> None:
    """Tensors and arrays become fal's media objects (torch.save / numpy.save bytes in a data URL) that
    decode to equal values, anywhere in an item; numpy scalars become numbers, non-finite floats null."""
    items = [
        torch.arange(6).reshape(2, 3),
        torch.tensor([[0.5, float("inf")]], dtype=torch.float64),
        np.arange(4, dtype=np.int32).reshape(2, 2),
        torch.tensor(3),
        {"nested": [torch.ones(2), np.zeros((1, 1))], "n": np.int64(7), "f": np.float32(0.5)},
        float("nan"),
    ]
    got = [parse(e) for e in events(pool, {"items": items, "final": np.float64(2.5)})]
    assert torch.equal(decode_tensor(got[0]), items[0]) and got[0]["dtype"] == "torch.int64"
    assert torch.equal(decode_tensor(got[1]), items[1]) and got[1]["shape"] == [1, 2]
    assert np.array_equal(decode_array(got[2]), items[2]) and got[2]["dtype"] == "int32"
    assert decode_tensor(got[3]).item() == 3 and got[3]["shape"] == []
    assert torch.equal(decode_tensor(got[4]["nested"][0]), torch.ones(2))
    assert np.array_equal(decode_array(got[4]["nested"][1]), np.zeros((1, 1)))
    assert (got[4]["n"], got[4]["f"], got[5], got[6]) == (7, 0.5, None, 2.5)
    assert type(got[4]["n"]) is int  # ints stay ints


def test_a_view_sends_only_its_own_elements(pool: DistributedRunner) -> None:
    """A small slice of a big tensor is saved on its own, not with its base's whole storage."""
    big = torch.zeros(1_000_000)
    got = parse(events(pool, {"items": [big[:3]]})[0])
    assert torch.equal(decode_tensor(got), torch.zeros(3)) and len(got["url"]) < 10_000


def test_images_become_data_urls_in_the_requested_format(pool: DistributedRunner) -> None:
    """PIL images become fal's image objects: content type, width, height and a data URL, jpeg by
    default and png with image_format="png"; the URL decodes back to the pixels."""
    rgb = Image.new("RGB", (12, 8), (200, 30, 60))
    rgba = Image.new("RGBA", (5, 7), (10, 20, 30, 128))
    items = [rgb, rgba, rgba]
    got = [parse(e) for e in events(pool, {"items": items, "formats": ["jpeg", "png", "jpeg"]})]
    jpeg = decode_image(got[0], "jpeg")
    assert (jpeg.size, jpeg.mode) == ((12, 8), "RGB")
    assert all(abs(a - b) <= 8 for a, b in zip(jpeg.getpixel((6, 4)), (200, 30, 60)))  # lossy, but close
    png = decode_image(got[1], "png")
    assert (png.size, png.mode) == ((5, 7), "RGBA")
    assert png.tobytes() == rgba.tobytes()  # lossless, alpha kept
    flattened = decode_image(got[2], "jpeg")  # JPEG has no alpha: converted, not an error
    assert (flattened.size, flattened.mode) == ((5, 7), "RGB")
    assert got[3] == "done"


@HOW
@pytest.mark.parametrize(
    ("payload", "before", "names"),
    [
        ({"items": [1, object(), 3]}, [1], ["stream item 2", "builtins.object"]),
        ({"items": [{"tags": {"a", "b"}}]}, [], ["stream item 1", "item['tags']", "builtins.set"]),
        ({"items": [1], "final": {"a": {1, 2}}}, [1], ["the final result", "item['a']", "builtins.set"]),
    ],
    ids=["object", "nested-set", "final-set"],
)
def test_unencodable_value_raises_text_event_error_and_pool_serves_on(
    pool: DistributedRunner, how: str, payload: dict[str, Any], before: list[Any], names: list[str]
) -> None:
    """A value with no JSON form raises TextEventError naming it (after the good events); the pool serves on."""
    got: list[bytes] = []

    async def consume() -> None:
        async for e in pool.stream(payload, timeout=CALL_TIMEOUT, as_text_events=True):
            got.append(e)

    with pytest.raises(TextEventError) as info:
        if how == "sync":
            got.extend(pool.stream_sync(payload, timeout=CALL_TIMEOUT, as_text_events=True))
        else:
            asyncio.run(consume())
    for name in names:
        assert name in str(info.value)
    assert [parse(e) for e in got] == before
    assert_serves(pool)


def test_stream_sync_gives_the_same_bytes_as_stream(pool: DistributedRunner) -> None:
    """The blocking twin yields byte-for-byte the events of the async stream."""
    payload = {
        "items": [torch.arange(3), Image.new("RGB", (4, 4), (1, 2, 3)), {"x": np.float32(1.5)}],
        "formats": ["jpeg", "png", "jpeg"],
        "final": [1, 2],
    }
    sync = events(pool, payload, "sync")
    assert sync == events(pool, payload, "async")
    assert len(sync) == 4 and parse(sync[-1]) == [1, 2]


# --- a real SSE consumer --------------------------------------------------------------------------


def serve(app: Starlette) -> tuple[uvicorn.Server, threading.Thread, int]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    if not wait_until(lambda: server.started or not thread.is_alive(), 30):
        server.should_exit = True
        thread.join(timeout=10)
        raise TimeoutError("uvicorn did not start within 30 s")
    assert server.started, "uvicorn exited during start-up"
    port = server.servers[0].sockets[0].getsockname()[1]  # port=0: the OS picked a free one
    return server, thread, port


def test_starlette_sse_endpoint_streams_every_event_to_an_http_client(pool: DistributedRunner) -> None:
    """`StreamingResponse(runner.stream(..., as_text_events=True))` under uvicorn: httpx reads all events."""
    n = 300
    payload = {"items": [*range(n), torch.ones(2, 2), Image.new("RGB", (3, 2))], "final": {"done": n}}

    async def endpoint(request: Request) -> StreamingResponse:
        stream = pool.stream(payload, timeout=CALL_TIMEOUT, as_text_events=True)
        return StreamingResponse(stream, media_type="text/event-stream")

    server, thread, port = serve(Starlette(routes=[Route("/events", endpoint)]))
    try:
        data: list[Any] = []
        with httpx.Client() as client, client.stream("GET", f"http://127.0.0.1:{port}/events", timeout=30) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    data.append(json.loads(line[len("data:") :]))
                else:
                    assert line == "", line[:80]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert data[:n] == list(range(n))
    assert torch.equal(decode_tensor(data[n]), torch.ones(2, 2))
    assert decode_image(data[n + 1], "jpeg").size == (3, 2)
    assert data[n + 2 :] == [{"done": n}]


def test_http_client_disconnect_cancels_the_call(pool: DistributedRunner) -> None:
    """An SSE client that hangs up mid-stream makes the server drop the stream, which cancels the call."""

    async def endpoint(request: Request) -> StreamingResponse:
        stream = pool.stream({"drip_token": "hangup"}, timeout=CALL_TIMEOUT, as_text_events=True)
        return StreamingResponse(stream, media_type="text/event-stream")

    server, thread, port = serve(Starlette(routes=[Route("/events", endpoint)]))
    try:
        data: list[Any] = []
        with httpx.Client() as client, client.stream("GET", f"http://127.0.0.1:{port}/events", timeout=30) as resp:
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    data.append(json.loads(line[len("data:") :]))
                if len(data) == 5:
                    break  # leaving the block closes the connection
        assert data == [0, 1, 2, 3, 4]
        # Queued behind the dripping call, so it answers only once that call has ended.
        assert pool.invoke_sync({"query_token": "hangup"}, timeout=DRIP_LIMIT + 30) is True
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert_serves(pool)
