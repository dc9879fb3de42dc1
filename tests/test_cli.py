import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lynxkv.cli import main

from .codec.kvgen import make_kv


def _write_kv(
    path: Path, tokens: int = 300, dtype: str = "bf16"
) -> list[tuple[np.ndarray, np.ndarray]]:
    kv = make_kv(21, layers=2, tokens=tokens, heads=2, dim=16, dtype=dtype)
    save_file(
        {f"{n}.{i}": t for i, pair in enumerate(kv) for n, t in zip("kv", pair, strict=True)},
        str(path),
    )
    return kv


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_encode_inspect_decode_one_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kv = _write_kv(tmp_path / "in.safetensors", tokens=200)
    obj = tmp_path / "obj.lkv"
    assert (
        main(["encode", str(tmp_path / "in.safetensors"), "-o", str(obj), "--codec", "lynx-a4"])
        == 0
    )
    assert obj.is_file()
    capsys.readouterr()
    assert main(["inspect", str(obj)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["codec"]["name"] == "lynx-a4" and info["tokens"] == 200 and info["layers"] == 2
    assert info["anchor_end"] < info["total"] == obj.stat().st_size
    assert set(info["streams"]) == {"anchor", "residual", "all"}
    for part in ("anchor", "full"):
        out = tmp_path / f"{part}.safetensors"
        assert main(["decode", str(obj), "-o", str(out), "--part", part]) == 0
        back = load_file(str(out))
        assert back["k.1"].dtype == kv[1][0].dtype and back["k.1"].shape == (200, 2, 16)
        err = np.abs(back["v.0"].astype(np.float32) - kv[0][1].astype(np.float32)).mean()
        assert err < (0.1 if part == "anchor" else 0.01)


def test_several_objects_go_to_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_kv(tmp_path / "in.safetensors", tokens=600, dtype="f16")
    folder = tmp_path / "objs"
    assert (
        main(["encode", str(tmp_path / "in.safetensors"), "-o", str(folder), "--codec", "raw"]) == 0
    )
    assert sorted(p.name for p in folder.iterdir()) == [f"chunk-0000{i}.lkv" for i in range(3)]
    capsys.readouterr()
    assert main(["inspect", str(folder)]) == 0
    assert [o["tokens"] for o in json.loads(capsys.readouterr().out)["objects"]] == [256, 256, 88]
    out = tmp_path / "back.safetensors"
    assert main(["decode", str(folder), "-o", str(out)]) == 0
    original = load_file(str(tmp_path / "in.safetensors"))
    back = load_file(str(out))
    np.testing.assert_array_equal(back["k.0"], original["k.0"])  # raw f16 is lossless


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["encode", "{missing}", "-o", "{out}"], "cannot read"),
        (["encode", "{garbage}", "-o", "{out}"], "cannot read"),
        (["encode", "{wrong_names}", "-o", "{out}"], "must hold tensors k.0..k.N"),
        (["encode", "{good}", "-o", "{out}", "--codec", "nope"], "unknown codec 'nope'"),
        (["encode", "{good}", "-o", "{out}", "--tokens-per-object", "0"], "tokens_per_object"),
        (["decode", "{garbage}", "-o", "{out}"], "bad magic"),
        (["decode", "{truncated}", "-o", "{out}"], "truncated object"),
        (["decode", "{missing}", "-o", "{out}"], "no such file"),
        (["decode", "{empty_dir}", "-o", "{out}"], "holds no .lkv objects"),
        (["inspect", "{garbage}"], "bad magic"),
        (["inspect", "{truncated}"], "its header says"),
    ],
)
def test_bad_input_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    good = tmp_path / "good.safetensors"
    _write_kv(good, tokens=40)
    (tmp_path / "garbage").write_bytes(b"\x00not an object at all" * 3)
    save_file(
        {"k.0": np.zeros((2, 1, 4), np.float32), "x": np.zeros(3, np.float32)},
        str(tmp_path / "names"),
    )
    obj = tmp_path / "obj.lkv"
    assert main(["encode", str(good), "-o", str(obj)]) == 0
    (tmp_path / "truncated").write_bytes(obj.read_bytes()[:-7])
    (tmp_path / "empty_dir").mkdir()
    paths = {
        "missing": tmp_path / "nope",
        "garbage": tmp_path / "garbage",
        "good": good,
        "wrong_names": tmp_path / "names",
        "truncated": tmp_path / "truncated",
        "empty_dir": tmp_path / "empty_dir",
        "out": tmp_path / "out",
    }
    capsys.readouterr()
    assert main([a.format(**paths) for a in argv]) == 1
    line = _error_line(capsys)
    assert line.startswith("lynxkv: error: ") and message in line


def test_console_script_runs(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("lynxkv")
    if not exe.exists():
        pytest.skip("the lynxkv console script is not installed in this environment")
    done = subprocess.run(
        [str(exe), "inspect", str(tmp_path / "none")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert done.stderr.strip() == f"lynxkv: error: {tmp_path / 'none'}: no such file or folder"
    usage = subprocess.run([str(exe), "encode"], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "required" in usage.stderr
