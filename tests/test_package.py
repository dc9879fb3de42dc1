import subprocess
import sys

import pytest

import lynxkv
import lynxkv.codec
import lynxkv.errors


@pytest.mark.parametrize("module", [lynxkv, lynxkv.codec, lynxkv.errors])
def test_public_api_is_sorted_and_real(module: object) -> None:
    names = module.__all__  # type: ignore[attr-defined]
    # isort style, as ruff's RUF022 keeps it: CONSTANTS, then Classes, then functions
    assert names == sorted(names, key=lambda n: (not n.isupper(), not n[:1].isupper(), n))
    for name in names:
        assert hasattr(module, name), name


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_lynxkv_is_light() -> None:
    loaded = _loaded_after("import lynxkv")
    assert not loaded & {"torch", "cupy", "lmdb", "aiohttp", "numpy", "transformers"}


def test_the_codec_is_pure() -> None:
    loaded = _loaded_after("import lynxkv.codec; import lynxkv.cli")
    assert not loaded & {"torch", "cupy", "lmdb", "aiohttp", "asyncio", "transformers", "zstandard"}


def test_error_tree() -> None:
    from lynxkv.errors import ChecksumError, CodecError, FormatError, LynxError, MissingDependency

    assert issubclass(ChecksumError, FormatError)
    assert issubclass(FormatError, ValueError) and issubclass(FormatError, LynxError)
    assert issubclass(CodecError, ValueError)
    err = MissingDependency("cupy", "gpu")
    assert isinstance(err, ImportError) and "pip install 'lynxkv[gpu]'" in str(err)
