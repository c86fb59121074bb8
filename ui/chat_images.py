"""Pictures in the Chat tab: what the multimodal chat box hands over (file paths in Gradio's
upload cache), how a turn with pictures is shown (thumbnails above the text) and how it is
sent (one {"type": "image"} part per picture, then the text, as the model's template takes
them). The pictures themselves are read with the same checks as the API's (ui/images.py)."""

from __future__ import annotations

from typing import Any

from .images import ImageLimits, ImageRef, load_images

# Shown once, above the chat box: what it accepts.
ACCEPTED = ["image"]


def message_parts(value: Any) -> tuple[str, list[str]]:
    """A MultimodalTextbox value -> (text, picture paths); a plain string is text alone."""
    if isinstance(value, dict):
        files = [f if isinstance(f, str) else f.get("path", "") for f in value.get("files") or []]
        return str(value.get("text") or ""), [f for f in files if f]
    return str(value or ""), []


def user_content(text: str, images: list[str]) -> str | list[dict[str, Any]]:
    """The message content the chat template gets for one user turn."""
    if not images:
        return text
    return [*({"type": "image"} for _ in images), {"type": "text", "text": text}]


def shown(text: str, images: list[str]) -> str | list[Any]:
    """The gr.Chatbot content of one user turn: its pictures as thumbnails, then the text."""
    if not images:
        return text
    return [*({"path": p} for p in images), *([text] if text else [])]


def read_pictures(paths: list[str], limits: ImageLimits) -> list[Any]:
    """The uploaded files as RGB images (APIError naming the file if one is not a picture)."""
    refs = [ImageRef(f"file:{p}", f"picture {i + 1}") for i, p in enumerate(paths)]
    return load_images(refs, limits, files=True)
