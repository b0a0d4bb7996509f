"""The files of a saved model folder: which of them hold its weights, and the version they hash to.

A folder's weights are safetensors, as `save_pretrained` writes them: one `model.safetensors`, or a
`model.safetensors.index.json` whose `weight_map` names the shards; with peft installed,
transformers also loads a LoRA adapter saved beside them (`adapter_config.json` and
`adapter_model.safetensors`), so the adapter counts as weights too. A folder whose weights are only
pickles (`pytorch_model.bin`, `*.pt`, ...) is refused with how to convert it: unpickling a file can
run code, and nothing here ever does.

`model_version` hashes every weight file. Each file is read once per process and state (path,
mtime, size), since the job and the scorer it opens both ask and a real model's shards are GBs.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = ("convert it once, where the file is trusted: load it with transformers (peft for an adapter) and "
                "`save_pretrained(folder, safe_serialization=True)`")


class ModelFolderError(ValueError):
    """A model folder that cannot load: a file missing, weights only pickled, or weights truncated or corrupt."""


def weight_files(folder: str | Path) -> tuple[Path, ...]:
    """The files holding the weights of the model in `folder`, in a stable order: `model.safetensors`, or the
    index then its shards by name; then, when the folder holds a LoRA adapter, its config and weights.

    Checks only that the files are there (and that the index names shards inside the folder), reading no weights.
    """
    folder = Path(folder)
    if (folder / WEIGHTS_FILE).is_file() and (folder / WEIGHTS_INDEX_FILE).is_file():
        # two saves mixed: transformers would load the single file, vLLM the shards
        raise ModelFolderError(f"model folder {folder} holds both {WEIGHTS_FILE} and {WEIGHTS_INDEX_FILE}, the weights of two saves; "
                               "remove the stale one (or save into an empty folder)")
    if (folder / WEIGHTS_FILE).is_file():
        files = [folder / WEIGHTS_FILE]
    elif (folder / WEIGHTS_INDEX_FILE).is_file():
        files = [folder / WEIGHTS_INDEX_FILE, *(folder / name for name in _shard_names(folder / WEIGHTS_INDEX_FILE))]
    else:
        pickled = _pickled_files(folder)
        if pickled:
            raise ModelFolderError(f"model folder {folder} holds only pickled weights ({', '.join(pickled)}), which are never loaded; "
                                   + CONVERT_HINT)
        raise ModelFolderError(f"model folder {folder} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}: not a saved model "
                               "(train one, or point at a checkpoint folder)")
    if (folder / ADAPTER_CONFIG_FILE).is_file():
        if not (folder / ADAPTER_WEIGHTS_FILE).is_file():
            raise ModelFolderError(f"model folder {folder}: its LoRA adapter has no {ADAPTER_WEIGHTS_FILE} (a pickled adapter is never "
                                   "loaded); " + CONVERT_HINT)
        files += [folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise ModelFolderError(f"model folder {folder} lacks the shards {', '.join(missing)} that {WEIGHTS_INDEX_FILE} names")
    return tuple(files)


def refuse_adapter(folder: str | Path, consequence: str) -> None:
    """ModelFolderError when `folder` holds a LoRA adapter, for the commands that would not apply it as transformers
    does when scoring (`consequence` says what would go wrong)."""
    if (Path(folder) / ADAPTER_CONFIG_FILE).is_file():
        raise ModelFolderError(f"model folder {folder} holds a LoRA adapter ({ADAPTER_CONFIG_FILE}): {consequence}; merge it into the "
                               "base weights first (peft's `merge_and_unload()`, then `save_pretrained(new_folder, safe_serialization=True)`)")


def _shard_names(index: Path) -> list[str]:
    """The shard file names of a safetensors index's `weight_map`, sorted and each once."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{index}: not a safetensors index with a weight_map ({type(error).__name__}: {error})") from None
    outside = [name for name in names if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors")]
    if outside or not names:
        raise ModelFolderError(f"{index}: weight_map must name safetensors shards in the folder itself, got {outside or 'none'}")
    return names


def _pickled_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("*") if path.is_file() and path.name.endswith(PICKLE_SUFFIXES)) if folder.is_dir() else []


def model_version(folder: str | Path) -> str:
    """The version scores are cached under: the first 12 hex digits of a sha256 over the folder's weight files.

    One file (`model.safetensors` alone) is its own sha256, as before shards and adapters were read, so a
    folder's version does not change; several are the sha256 of their names and sha256s, one per line.
    """
    files = weight_files(folder)
    digests = [_file_digest(path.resolve(), *_file_state(path)) for path in files]
    if len(files) == 1:
        return digests[0][:12]
    listing = "".join(f"{path.name}\t{digest}\n" for path, digest in zip(files, digests))
    return hashlib.sha256(listing.encode()).hexdigest()[:12]


def _file_state(path: Path) -> tuple[int, int]:
    state = path.stat()
    return state.st_mtime_ns, state.st_size


@functools.lru_cache(maxsize=256)
def _file_digest(path: Path, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
