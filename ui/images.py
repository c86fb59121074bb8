"""Pictures in chat messages: OpenAI `image_url` content parts -> decoded PIL images.

`data:` URLs (png, jpeg, webp, gif: its first frame) are always read; http(s) URLs only when
the server runs with --allow-remote-images, fetched with a timeout and a size cap, refusing
any hop (the first or a redirect) whose host resolves to a private, loopback or link-local
address, and connecting to the address that was checked, so a request cannot make the
server read its own network. Every problem is a 400 naming the image
(`messages[i].content[j]`) and what is wrong with it."""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from .errors import APIError

log = logging.getLogger(__name__)

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_MAX_REDIRECTS = 3
_MAX_ADDRESSES = 3  # of a name's, tried in turn when one refuses the connection


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What one request may send: images per request, encoded bytes per image, decoded
    pixels per image (a tiny PNG can claim a huge canvas), and how remote URLs are fetched."""

    allow_remote: bool = False
    max_images: int = 8
    max_bytes: int = 20 << 20
    max_pixels: int = 64 << 20
    timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class ImageRef:
    url: str
    where: str  # the part's place in the request, as clients write it: messages[0].content[1]


def split_image_parts(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    """Messages with each `image_url` part replaced by the template's {"type": "image"}, and
    the image URLs in prompt order. Messages without pictures come back unchanged."""
    refs: list[ImageRef] = []
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            if part.get("type") == "image_url":
                refs.append(ImageRef(part["image_url"]["url"], f"messages[{i}].content[{j}]"))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**m, "content": parts})
    return out, refs


def _bad(ref: ImageRef, why: str, code: str = "invalid_image") -> APIError:
    return APIError(400, f"Image at {ref.where}: {why}", ref.where, code)


def _decode_data_url(ref: ImageRef, limits: ImageLimits) -> bytes:
    head, sep, payload = ref.url.partition(",")
    if not sep or not head.startswith("data:"):
        raise _bad(ref, "a data URL must look like data:image/png;base64,...")
    media, *params = head[5:].split(";")
    if media and media.lower() not in FORMATS.values():
        raise _bad(ref, f"unsupported type {media!r}; send png, jpeg, webp or gif", "unsupported_image_type")
    if "base64" not in params:
        raise _bad(ref, "only base64 data URLs are supported")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise _bad(ref, f"larger than {limits.max_bytes} bytes", "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(ref, "the base64 data is corrupt") from None


def _resolve(host: str) -> list[str]:
    return [str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)]


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_global and not ip.is_multicast


def _public_addresses(ref: ImageRef, url: str) -> list[str]:
    """The addresses to fetch `url` from (at most _MAX_ADDRESSES, in the resolver's order):
    its host resolved once, refused unless every answer is public. The fetch connects to
    these very addresses: were the HTTP client to resolve the name again, a DNS server could
    answer a private address the second time (rebinding)."""
    host = urlsplit(url).hostname
    if not host:
        raise _bad(ref, "the URL has no host")
    try:
        addresses = list(dict.fromkeys(_resolve(host)))
    except OSError as e:
        raise _bad(ref, f"cannot resolve {host}: {e}", "image_fetch_failed") from None
    if not addresses or not all(_public(a) for a in addresses):
        raise _bad(ref, f"{host} is a private or local address; remote images must be public", "image_fetch_failed")
    return addresses[:_MAX_ADDRESSES]


def _pinned(url: str, address: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """`url` with its host replaced by `address`, and the Host header and TLS server name
    (httpx's `sni_hostname`: the certificate is still checked against the name) of the
    original, so that the request goes to the address that was checked."""
    parts = urlsplit(url)
    netloc = f"[{address}]" if ":" in address else address
    if parts.port is not None:
        netloc += f":{parts.port}"
    host = parts.netloc.rpartition("@")[2]  # host[:port], without any user:password@
    return parts._replace(netloc=netloc).geturl(), {"Host": host}, {"sni_hostname": parts.hostname or ""}


def _get(client: Any, ref: ImageRef, url: str, address: str, limits: ImageLimits) -> bytes | str:
    """One hop, from `address`: the body, or the URL a redirect points to."""
    target, headers, extensions = _pinned(url, address)
    with client.stream("GET", target, headers=headers, extensions=extensions) as resp:
        if resp.is_redirect and "location" in resp.headers:
            return urljoin(url, resp.headers["location"])
        if resp.status_code != 200:
            raise _bad(ref, f"fetching it answered HTTP {resp.status_code}", "image_fetch_failed")
        data = bytearray()
        for chunk in resp.iter_bytes():
            data += chunk
            if len(data) > limits.max_bytes:
                raise _bad(ref, f"larger than {limits.max_bytes} bytes", "image_too_large")
        return bytes(data)


def _fetch(ref: ImageRef, limits: ImageLimits) -> bytes:
    import httpx

    url = ref.url
    with httpx.Client(timeout=limits.timeout_s, follow_redirects=False) as client:
        for _ in range(_MAX_REDIRECTS + 1):
            if urlsplit(url).scheme not in ("http", "https"):
                raise _bad(ref, "redirected to a URL that is not http(s)", "image_fetch_failed")
            addresses = _public_addresses(ref, url)
            for i, address in enumerate(addresses):
                try:
                    got = _get(client, ref, url, address, limits)
                    break
                except (httpx.ConnectError, httpx.ConnectTimeout) as e:  # the next address, as a name would
                    if i + 1 == len(addresses):
                        raise _bad(ref, f"fetching it failed ({type(e).__name__})", "image_fetch_failed") from None
                except httpx.HTTPError as e:
                    raise _bad(ref, f"fetching it failed ({type(e).__name__})", "image_fetch_failed") from None
            if isinstance(got, bytes):
                return got
            url = got
    raise _bad(ref, f"more than {_MAX_REDIRECTS} redirects", "image_fetch_failed")


def _open(ref: ImageRef, data: bytes, limits: ImageLimits) -> Any:
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise _bad(ref, f"larger than {limits.max_bytes} bytes", "image_too_large")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise _bad(ref, "not an image, or corrupt") from None
    except Image.DecompressionBombError:
        raise _bad(ref, "its canvas is too large", "image_too_large") from None
    if img.format not in FORMATS:
        raise _bad(ref, f"unsupported type {img.format}; send png, jpeg, webp or gif", "unsupported_image_type")
    if img.width * img.height > limits.max_pixels:
        raise _bad(ref, f"{img.width}x{img.height} is over {limits.max_pixels} pixels", "image_too_large")
    try:
        img.seek(0)  # an animation: its first frame
        return img.convert("RGB")  # decodes the pixels: truncated or corrupt data fails here
    except (OSError, ValueError, SyntaxError) as e:
        raise _bad(ref, f"corrupt image data ({e})") from None


def _read_file(ref: ImageRef, limits: ImageLimits) -> bytes:
    path = Path(ref.url.removeprefix("file:"))
    try:
        if path.stat().st_size > limits.max_bytes:
            raise _bad(ref, f"larger than {limits.max_bytes} bytes", "image_too_large")
        return path.read_bytes()
    except OSError as e:
        raise _bad(ref, f"cannot read the upload ({e.strerror})") from None


def load_images(refs: list[ImageRef], limits: ImageLimits, files: bool = False) -> list[Any]:
    """The pictures as RGB PIL images, in order. `files`: `file:` URLs name local files (the
    web page's uploads; never a client's URL). Blocking (decoding, fetching): call it off
    the event loop."""
    if len(refs) > limits.max_images:
        raise APIError(400, f"At most {limits.max_images} images per request.", "messages", "too_many_images")
    images = []
    for ref in refs:
        scheme = urlsplit(ref.url).scheme.lower()
        if scheme == "data":
            data = _decode_data_url(ref, limits)
        elif scheme == "file" and files:
            data = _read_file(ref, limits)
        elif scheme in ("http", "https"):
            if not limits.allow_remote:
                raise _bad(
                    ref,
                    "remote image URLs are disabled on this server (--allow-remote-images); "
                    "send the picture as a data: URL",
                    "remote_images_disabled",
                )
            data = _fetch(ref, limits)
        else:
            raise _bad(ref, f"unsupported URL scheme {scheme!r}; use a data: URL")
        images.append(_open(ref, data, limits))
    return images
