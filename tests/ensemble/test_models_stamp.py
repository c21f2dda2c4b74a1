"""Packaged model files are hashed once, not on every load: the digest stamp in the cache root
(ensemble.models.verified_sha256) is keyed by (path, size, mtime_ns); a changed file is hashed again
and refused when its digest is wrong. No real model: a fake package and a fake conversion cache."""
import hashlib
import json
import logging
import os

import pytest

from ensemble import models
from ensemble.models import STAMP_NAME, ModelSourceError, PackagedModel, resolve

GGUF = b"a fake gguf, never converted: the cache below already holds its conversion"
WEIGHTS = b"fake safetensors weights"


@pytest.fixture()
def fake(monkeypatch, tmp_path):
    """A packaged alias whose GGUF lives in an importable module and whose conversion is cached;
    yields (gguf path, cached weights path, list of the paths each sha256_of call hashed)."""
    pkg_dir = tmp_path / "site" / "fakepkg_stamp"
    pkg_dir.mkdir(parents=True)
    (pkg_dir / "__init__.py").write_text("")
    gguf = pkg_dir / "m.gguf"
    gguf.write_bytes(GGUF)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    sha = hashlib.sha256(GGUF).hexdigest()
    monkeypatch.setitem(models.PACKAGED, "fake-stamp",
                        PackagedModel("fake-stamp", sha, ("fake-pkg==1.0",), (("fakepkg_stamp", "m.gguf"),)))
    cache = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV, str(cache))
    target = cache / "models" / f"fake-stamp-{sha[:16]}"
    target.mkdir(parents=True)
    weights = target / "model.safetensors"
    weights.write_bytes(WEIGHTS)
    (target / "manifest.json").write_text(json.dumps(
        {"source_sha256": sha, "files": {"model.safetensors": hashlib.sha256(WEIGHTS).hexdigest()}}))
    hashed: list[list[str]] = []
    real = models.sha256_of

    def counting(paths):
        hashed.append([p.name for p in paths])
        return real(paths)

    monkeypatch.setattr(models, "sha256_of", counting)
    return gguf, weights, hashed


def _rewrite(path, data):
    """Rewrite ``path`` (same size when ``data`` is) and make sure its mtime_ns moved."""
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    if path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before + 1000, before + 1000))


def test_each_file_is_hashed_once_over_many_loads(fake):
    _, _, hashed = fake
    paths = {resolve("fake-stamp")[1] for _ in range(5)}
    assert len(paths) == 1
    assert sorted(hashed) == [["m.gguf"], ["model.safetensors"]]  # once each, not 5 times
    stamp = json.loads((models.cache_dir() / STAMP_NAME).read_text())
    assert len(stamp) == 2 and all(len(e["sha256"]) == 64 for e in stamp.values())
    # written atomically: no temporary file left next to it
    assert not [p for p in models.cache_dir().iterdir() if p.name.startswith(".verified-")]


def test_a_modified_cached_file_is_hashed_again_and_refused(fake):
    _, weights, hashed = fake
    resolve("fake-stamp")
    hashed.clear()
    _rewrite(weights, b"X" + WEIGHTS[1:])  # same size, new content
    with pytest.raises(ModelSourceError, match="model.safetensors have sha256 .* delete"):
        resolve("fake-stamp")
    assert hashed == [["model.safetensors"]]
    with pytest.raises(ModelSourceError, match="delete"):  # refused again (the stamp holds the bad digest)
        resolve("fake-stamp")
    assert hashed == [["model.safetensors"]]
    _rewrite(weights, WEIGHTS)
    resolve("fake-stamp")  # restored: hashed once more and accepted
    assert hashed == [["model.safetensors"]] * 2


def test_a_modified_gguf_is_hashed_again_and_refused(fake):
    gguf, _, hashed = fake
    resolve("fake-stamp")
    hashed.clear()
    _rewrite(gguf, GGUF[:-1] + b"!")
    with pytest.raises(ModelSourceError, match="GGUF sha256 is .* expected"):
        resolve("fake-stamp")
    assert hashed == [["m.gguf"]]


def test_a_touched_file_with_the_same_content_is_hashed_again_once(fake):
    gguf, _, hashed = fake
    resolve("fake-stamp")
    hashed.clear()
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    resolve("fake-stamp")
    resolve("fake-stamp")
    assert hashed == [["m.gguf"]]


def test_a_damaged_stamp_costs_a_rehash_and_is_rebuilt(fake, caplog):
    _, _, hashed = fake
    resolve("fake-stamp")
    (models.cache_dir() / STAMP_NAME).write_text("{not json")
    hashed.clear()
    with caplog.at_level(logging.WARNING, logger="ensemble.models"):
        resolve("fake-stamp")
    assert "ignoring unreadable digest stamp" in caplog.text
    assert sorted(hashed) == [["m.gguf"], ["model.safetensors"]]
    hashed.clear()
    resolve("fake-stamp")
    assert hashed == []


def test_every_hash_is_logged(fake, caplog):
    with caplog.at_level(logging.INFO, logger="ensemble.models"):
        resolve("fake-stamp")
        resolve("fake-stamp")
    assert caplog.text.count("sha256 hashed") == 2


def test_entries_of_deleted_files_are_dropped_when_the_stamp_is_written(fake, tmp_path):
    gguf, _, _ = fake
    resolve("fake-stamp")
    other = tmp_path / "other.bin"
    other.write_bytes(b"x")
    models.verified_sha256([other])
    other.unlink()
    _rewrite(gguf, GGUF)  # a new mtime: the next resolve writes the stamp again
    resolve("fake-stamp")
    keys = json.loads((models.cache_dir() / STAMP_NAME).read_text())
    assert len(keys) == 2 and not any("other.bin" in k for k in keys)
