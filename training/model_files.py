"""The files of a saved model folder: which of them hold its weights, and the version they hash to.

A folder's weights are safetensors, as `save_pretrained` writes them: one `model.safetensors`, or a
`model.safetensors.index.json` whose `weight_map` names the shards; with peft installed,
transformers also loads a LoRA adapter saved beside them (`adapter_config.json` and
`adapter_model.safetensors`), so the adapter counts as weights too. A folder whose weights are only
pickles (`pytorch_model.bin`, `*.pt`, ...) is refused with how to convert it: unpickling a file can
run code, and nothing here ever does.

An adapter folder holds a LoRA adapter and no weights of its own (what LoRA training saves by default,
`training.model.save_policy`): `adapter_config.json`, whose `base_model_name_or_path` names the base model
folder as peft's own loaders read it, `adapter_model.safetensors`, and `adapter_base.json` with the base's
version when the adapter was trained. Its weights are the base's files then the adapter's, so its version
covers both; a base whose files changed since (another version) is refused, since the adapter's deltas
were learnt against the weights it had. An adapter saved beside full weights (transformers applies it
when loading the folder) is not an adapter folder: its base is the folder itself.

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
ADAPTER_BASE_FILE = "adapter_base.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = ("convert it once, where the file is trusted: load it with transformers (peft for an adapter) and "
                "`save_pretrained(folder, safe_serialization=True)`")


class ModelFolderError(ValueError):
    """A model folder that cannot load: a file missing, weights only pickled, or weights truncated or corrupt."""


def weight_files(folder: str | Path) -> tuple[Path, ...]:
    """The files holding the weights of the model in `folder`, in a stable order: `model.safetensors`, or the
    index then its shards by name; then, when the folder holds a LoRA adapter, its config and weights. An adapter
    folder's are its base's, then its adapter's.

    Checks only that the files are there (and that the index names shards inside the folder), reading no weights.
    """
    folder = Path(folder)
    base = adapter_base(folder)
    if base is not None:
        return (*weight_files(base), *_adapter_files(folder))
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
        files += _adapter_files(folder)
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise ModelFolderError(f"model folder {folder} lacks the shards {', '.join(missing)} that {WEIGHTS_INDEX_FILE} names")
    return tuple(files)


def _adapter_files(folder: Path) -> list[Path]:
    if not (folder / ADAPTER_WEIGHTS_FILE).is_file():
        raise ModelFolderError(f"model folder {folder}: its LoRA adapter has no {ADAPTER_WEIGHTS_FILE} (a pickled adapter is never "
                               "loaded); " + CONVERT_HINT)
    return [folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE]


def has_full_weights(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / WEIGHTS_FILE).is_file() or (folder / WEIGHTS_INDEX_FILE).is_file()


def adapter_config(folder: str | Path) -> dict:
    """The folder's `adapter_config.json` (peft's LoRA settings: r, lora_alpha, target_modules, base_model_name_or_path)."""
    path = Path(folder) / ADAPTER_CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def adapter_base(folder: str | Path) -> Path | None:
    """The base model folder of the adapter folder `folder` (module doc); None for a folder with full weights or none at all.

    The base is `base_model_name_or_path` of its adapter config, a path relative to the adapter folder when not absolute;
    it must be a folder of full weights with no adapter of its own (one adapter over one base, no chains).
    """
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_FILE).is_file() or has_full_weights(folder):
        return None
    named = adapter_config(folder).get("base_model_name_or_path")
    if not isinstance(named, str) or not named:
        raise ModelFolderError(f"{folder / ADAPTER_CONFIG_FILE}: base_model_name_or_path names no base model folder; set it to the folder "
                               "the adapter was trained on")
    base = (folder / named).resolve()  # an absolute path stays itself
    if not has_full_weights(base):
        raise ModelFolderError(f"adapter folder {folder}: its base {base} (base_model_name_or_path in {ADAPTER_CONFIG_FILE}) is not a "
                               f"folder of full weights ({WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}); point it at the base model folder "
                               "(a hub name is never downloaded)")
    if (base / ADAPTER_CONFIG_FILE).is_file():
        raise ModelFolderError(f"adapter folder {folder}: its base {base} holds an adapter of its own; merge that one first "
                               "(`relevance model merge`) and train the adapter on the merged folder")
    return base


def base_folder(folder: str | Path) -> Path:
    """The folder whose config.json describes the model in `folder`: an adapter folder's base, else the folder itself."""
    return adapter_base(folder) or Path(folder)


def record_adapter_base(folder: str | Path, base: str | Path) -> None:
    """Write `adapter_base.json` into the adapter folder `folder`: the version of `base` the adapter was trained on."""
    (Path(folder) / ADAPTER_BASE_FILE).write_text(json.dumps({"base_model_version": model_version(base)}, indent=2) + "\n")


def remove_weights(folder: str | Path) -> None:
    """Delete the weight files a save wrote into `folder` (full weights: one file or the index and its shards; an adapter
    and its base record), so that a save of the other kind into it leaves one model, not two mixed."""
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX_FILE
    shards = [folder / name for name in _shard_names(index)] if index.is_file() else []
    for path in (folder / WEIGHTS_FILE, index, *shards, folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE, folder / ADAPTER_BASE_FILE):
        path.unlink(missing_ok=True)


def refuse_adapter(folder: str | Path, consequence: str) -> None:
    """ModelFolderError when `folder` holds a LoRA adapter beside full weights (not an adapter folder), for the commands
    that would not apply it as transformers does when scoring (`consequence` says what would go wrong)."""
    if (Path(folder) / ADAPTER_CONFIG_FILE).is_file() and has_full_weights(folder):
        raise ModelFolderError(f"model folder {folder} holds a LoRA adapter ({ADAPTER_CONFIG_FILE}) beside full weights: {consequence}; merge it into the "
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
    For an adapter folder: the files of its base then its adapter's, after checking that the base's own version is
    the one the adapter was trained on (`adapter_base.json`; a folder without it is taken as it is).
    """
    files = weight_files(folder)
    digests = [_file_digest(path.resolve(), *_file_state(path)) for path in files]
    base = adapter_base(folder)
    if base is not None:
        _check_base_version(Path(folder), base, _version(files[:-2], digests[:-2]))
    return _version(files, digests)


def _version(files: tuple[Path, ...], digests: list[str]) -> str:
    if len(files) == 1:
        return digests[0][:12]
    listing = "".join(f"{path.name}\t{digest}\n" for path, digest in zip(files, digests))
    return hashlib.sha256(listing.encode()).hexdigest()[:12]


def _check_base_version(folder: Path, base: Path, version: str) -> None:
    path = folder / ADAPTER_BASE_FILE
    if not path.is_file():
        return
    try:
        trained_on = json.loads(path.read_text())["base_model_version"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{path}: expected {{\"base_model_version\": ...}} ({type(error).__name__}: {error})") from None
    if trained_on != version:
        raise ModelFolderError(f"adapter folder {folder}: its base {base} is now model version {version}, but the adapter was trained on "
                               f"version {trained_on}; point base_model_name_or_path in {ADAPTER_CONFIG_FILE} at the base it was "
                               "trained on (the adapter's deltas mean nothing on other weights)")


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
