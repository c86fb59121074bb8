"""Pictures through the OpenAI API: the official `openai` client sends generated images as
`data:` URLs to the real app (in process, over Starlette's test transport: no port, no
network) serving the tiny Qwen2-VL; every bad-image case is a 400 that names the problem."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from fastapi.testclient import TestClient

from inference.async_engine import AsyncEngine
from inference.config import EngineConfig
from inference.engine import Engine
from tests.tiny_vl import make_tiny_vl, picture, png_bytes, save_tokenizer
from ui.images import ImageLimits
from ui.server import build_app

GREEDY = dict(temperature=0, max_tokens=6)


def _data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def _encoded(fmt: str, width: int = 60, height: int = 40, **save) -> bytes:
    buf = io.BytesIO()
    picture(width, height, 3).save(buf, format=fmt, **save)
    return buf.getvalue()


def _ask(*urls: str, text: str = "What is in these pictures?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


@pytest.fixture(scope="module")
def vl_engine(tmp_path_factory) -> Engine:
    path = tmp_path_factory.mktemp("qwen2vl-api")
    make_tiny_vl(path)
    return Engine(EngineConfig(model=str(path), block_size=4, max_batch_tokens=64), num_blocks=128)


LIMITS = ImageLimits(max_bytes=200_000, max_images=3)


@pytest.fixture(scope="module")
def app(vl_engine):
    """One app (one model thread) over the engine for the module."""
    return build_app(AsyncEngine(vl_engine, "tiny-vl"), image_limits=LIMITS)


@pytest.fixture(scope="module")
def http(app):
    with TestClient(app) as http:
        yield http


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)


def test_png_data_url_is_seen(client, vl_engine):
    png = png_bytes(56, 84, 1)
    reply = client.chat.completions.create(model="tiny-vl", messages=_ask(_data_url(png)), **GREEDY)
    # The same prompt straight through the engine: the picture's tokens are in the count.
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is in these pictures?"}, {"type": "image"}]}]
    from PIL import Image

    ids, images = vl_engine.encode_chat_images(msgs, [Image.open(io.BytesIO(png)).convert("RGB")])
    assert reply.usage.prompt_tokens == len(ids) > 20
    # Another picture of the same size: as many tokens, but the model sees something else
    # (a random tiny model may still say the same words: compare its confidence).
    kw = dict(GREEDY, logprobs=True)
    first = client.chat.completions.create(model="tiny-vl", messages=_ask(_data_url(png)), **kw)
    again = client.chat.completions.create(model="tiny-vl", messages=_ask(_data_url(png)), **kw)
    other = client.chat.completions.create(model="tiny-vl", messages=_ask(_data_url(png_bytes(56, 84, 9))), **kw)
    assert other.usage.prompt_tokens == reply.usage.prompt_tokens
    logprob = [r.choices[0].logprobs.content[0].logprob for r in (first, again, other)]
    assert logprob[0] == logprob[1] != logprob[2]


def test_several_formats_in_one_message_and_streaming(client):
    gif = io.BytesIO()
    frames = [picture(40, 40, 5), picture(40, 40, 6)]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    urls = [
        _data_url(_encoded("JPEG"), "image/jpeg"),
        _data_url(_encoded("WEBP"), "image/webp"),
        _data_url(gif.getvalue(), "image/gif"),
    ]
    whole = client.chat.completions.create(model="tiny-vl", messages=_ask(*urls), **GREEDY)
    stream = client.chat.completions.create(model="tiny-vl", messages=_ask(*urls), stream=True, **GREEDY)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole.choices[0].message.content


@pytest.mark.parametrize(
    "url, needle",
    [
        ("data:image/png;base64,@@@not-base64@@@", "base64 data is corrupt"),
        (_data_url(b"this is not a picture at all"), "not an image"),
        (_data_url(_encoded("PNG")[:80]), "corrupt image data"),
        (_data_url(_encoded("BMP"), "image/bmp"), "unsupported type 'image/bmp'"),
        (_data_url(_encoded("BMP")), "unsupported type BMP"),
        (_data_url(_encoded("PNG", 300, 300)), "larger than 200000 bytes"),
        ("https://example.com/cat.png", "remote image URLs are disabled"),
        ("ftp://example.com/cat.png", "unsupported URL scheme"),
    ],
    ids=["bad-base64", "not-an-image", "truncated", "bmp-type", "bmp-bytes", "too-large", "remote-off", "ftp"],
)
def test_bad_images_are_400_naming_the_problem(client, url, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-vl", messages=_ask(_data_url(png_bytes(28, 28)), url), **GREEDY)
    assert e.value.status_code == 400
    assert needle in e.value.message and "messages[0].content[2]" in e.value.message


def test_too_many_images(client):
    urls = [_data_url(png_bytes(28, 28, i)) for i in range(4)]
    with pytest.raises(openai.BadRequestError, match="At most 3 images"):
        client.chat.completions.create(model="tiny-vl", messages=_ask(*urls), **GREEDY)


def test_remote_urls_to_private_addresses_are_refused(app, client):
    app.state.image_limits = ImageLimits(allow_remote=True, timeout_s=2)
    try:
        for url in ("http://127.0.0.1:9/cat.png", "http://[::1]/cat.png", "http://169.254.169.254/latest"):
            with pytest.raises(openai.BadRequestError, match="private or local address"):
                client.chat.completions.create(model="tiny-vl", messages=_ask(url), **GREEDY)
    finally:
        app.state.image_limits = LIMITS


def test_text_only_model_says_it_has_no_vision(tmp_path):
    from tests.tiny_models import make_tiny

    make_tiny("qwen2", tmp_path)
    save_tokenizer(tmp_path)  # a chat template; its extra ids never reach this model
    engine = Engine(EngineConfig(model=str(tmp_path)), num_blocks=8)
    with TestClient(build_app(AsyncEngine(engine, "tiny-text"))) as http:
        c = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        with pytest.raises(openai.BadRequestError, match="has no vision"):
            c.chat.completions.create(model="tiny-text", messages=_ask(_data_url(png_bytes(28, 28))), **GREEDY)


@pytest.fixture
def picture_site():
    """A loopback HTTP server: /pic.png, /big.png, /to-pic (302 to /pic.png), /to-local (302 to
    the same server named `localhost`), /loop (302 to itself)."""
    import http.server
    import threading

    pic, big = png_bytes(56, 56, 4), png_bytes(300, 300, 4)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            port = self.server.server_address[1]
            moves = {"/to-pic": "/pic.png", "/to-local": f"http://localhost:{port}/pic.png", "/loop": "/loop"}
            if self.path in moves:
                self.send_response(302)
                self.send_header("Location", moves[self.path])
                self.end_headers()
                return
            body = {"/pic.png": pic, "/big.png": big}.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        thread.join(5)


def _loopback_plays_the_internet(
    monkeypatch, answers: dict[str, list[list[str]]], public: tuple[str, ...] = ("127.0.0.1",)
) -> list[str]:
    """For fetch tests on loopback: the `public` addresses count as public, any other as
    private, and names resolve to `answers[name]`, one list of addresses per lookup in turn
    (the last repeats); IP literals resolve to themselves. Returns the names looked up."""
    from ui import images as imgs

    asked: list[str] = []

    def resolve(host: str) -> list[str]:
        asked.append(host)
        turns = answers.get(host)
        return [host] if turns is None else (turns.pop(0) if len(turns) > 1 else turns[0])

    monkeypatch.setattr(imgs, "_resolve", resolve)
    monkeypatch.setattr(imgs, "_public", lambda address: address in public)
    return asked


def test_remote_fetch_follows_redirects_with_every_hop_checked(picture_site, monkeypatch):
    """The fetch logic on loopback: 127.0.0.1 plays a public host, `localhost` (resolved to
    127.0.0.2) a private one; every hop, redirects included, is checked."""
    from ui import images as imgs
    from ui.errors import APIError

    _loopback_plays_the_internet(monkeypatch, {"localhost": [["127.0.0.2"]]})
    limits = ImageLimits(allow_remote=True, max_bytes=200_000, timeout_s=5)

    def load(path: str):
        return imgs.load_images([imgs.ImageRef(picture_site + path, "messages[0].content[0]")], limits)

    assert load("/pic.png")[0].size == (56, 56)
    assert load("/to-pic")[0].size == (56, 56)
    for path, needle in [
        ("/to-local", "private or local address"),
        ("/loop", "more than 3 redirects"),
        ("/big.png", "larger than 200000 bytes"),
        ("/missing.png", "HTTP 404"),
    ]:
        with pytest.raises(APIError, match=needle) as e:
            load(path)
        assert e.value.status == 400


def test_remote_fetch_connects_to_the_address_it_checked(picture_site, monkeypatch):
    """DNS rebinding: a name that resolves to a public address when checked and to a private
    one a moment later. The fetch connects to the checked address (the name is looked up
    once a hop, and the system's resolver, which does not know it, is never asked)."""
    from ui import images as imgs
    from ui.errors import APIError

    port = picture_site.rsplit(":", 1)[1]
    asked = _loopback_plays_the_internet(monkeypatch, {"pics.test": [["127.0.0.1"], ["127.0.0.2"]]})
    limits = ImageLimits(allow_remote=True, timeout_s=5)
    ref = imgs.ImageRef(f"http://pics.test:{port}/pic.png", "messages[0].content[0]")
    assert imgs.load_images([ref], limits)[0].size == (56, 56)
    assert asked == ["pics.test"]
    with pytest.raises(APIError, match="private or local address"):  # the second lookup: private
        imgs.load_images([ref], limits)


def test_remote_fetch_tries_the_next_checked_address(picture_site, monkeypatch):
    """A name with several public addresses, the first refusing connections (nothing listens
    on 127.0.0.3): the fetch goes on to the next, as a connection by name would."""
    from ui import images as imgs

    port = picture_site.rsplit(":", 1)[1]
    _loopback_plays_the_internet(monkeypatch, {"pics.test": [["127.0.0.3", "127.0.0.1"]]}, ("127.0.0.1", "127.0.0.3"))
    ref = imgs.ImageRef(f"http://pics.test:{port}/pic.png", "messages[0].content[0]")
    assert imgs.load_images([ref], ImageLimits(allow_remote=True, timeout_s=5))[0].size == (56, 56)


def test_body_limit_grows_for_a_vision_model(http):
    """1 MiB of JSON (the default cap) is too little for a photo as a data: URL: with a vision
    model the cap makes room for one picture of ImageLimits.max_bytes (base64: 4/3 of it)."""
    url = "http://testserver/v1/chat/completions"
    # Unknown fields: refused as soon as parsed (400), unless the size refuses them first (413).
    assert http.post(url, content=b'{"x": "' + b"a" * (1 << 20) + b'"}').status_code == 400
    assert http.post(url, content=b'{"x": "' + b"a" * ((1 << 20) + 300_000) + b'"}').status_code == 413
