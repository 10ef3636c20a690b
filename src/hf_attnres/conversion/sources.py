"""Read and validate what `hf-attnres convert` converts: a local folder, a Hub repo id or a GGUF file.

Everything is checked before the output is touched: the config, that every weight file the index names
exists and is complete (safetensors headers against file sizes), and that the family is supported. Weights
are described (`TensorRef`), not loaded: safetensors data is streamed later straight from the files.
"""

from __future__ import annotations

import copy
import json
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import metadata_load, parse_local_safetensors_file_metadata
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from .families import check_supported, some_names
from .streaming import INDEX_FILE, SAFETENSORS_DTYPES, SINGLE_FILE, LoadedTensor, StoredTensor, TensorRef

BIN_FILE, BIN_INDEX_FILE = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_DIRS = ("additional_chat_templates",)
# Hub download: the files a transformers checkpoint needs, nothing else (no GGUF/consolidated duplicates).
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "README.md",
    "model*.safetensors",
    INDEX_FILE,
    *TOKENIZER_FILES,
    *(f"{d}/*" for d in TOKENIZER_DIRS),
]
HUB_BIN_PATTERNS = ["pytorch_model*.bin", BIN_INDEX_FILE]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HF_CACHE_DIR = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")


@dataclass
class Source:
    """A validated checkpoint: its family config, its tensors as stored, and what goes with it."""

    spec: str  # what the user passed
    kind: str  # "folder", "hub" or "gguf"
    path: Path  # the folder, or the .gguf file
    config: PretrainedConfig  # transformers' own config class of the family
    tensors: list[TensorRef]
    dtype: torch.dtype  # the dtype the weights are stored in
    license: str | None = None
    base_model: str | None = None
    model: torch.nn.Module | None = field(default=None, repr=False)  # GGUF: the dequantised model
    tokenizer: object | None = field(default=None, repr=False)  # GGUF: its tokenizer

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    def tokenizer_paths(self) -> list[Path]:
        """Tokenizer files and folders (incl. the chat template) to copy as they are."""
        if self.kind == "gguf":
            return []
        names = TOKENIZER_FILES + TOKENIZER_DIRS
        return [self.folder / n for n in names if (self.folder / n).exists()]

    def generation_config(self) -> GenerationConfig | None:
        if self.model is not None:
            return self.model.generation_config
        if (self.folder / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(self.folder)
        return None

    def load_model(self, keep: bool = True) -> torch.nn.Module:
        """The source as transformers' own model class (LlamaForCausalLM, ...), fp32, for verification.

        A fresh model the caller may modify (verification rounds it to the output dtype). For GGUF, a copy of
        the dequantised model, so that `self.model` stays as loaded for further conversions; `keep=False`
        hands that model over instead (a source opened for one conversion), so it is not held twice.
        """
        if self.model is not None:
            if not keep:
                model, self.model = self.model, None
                return model.float().eval()
            return copy.deepcopy(self.model).float().eval()
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32).eval()

    def load_tokenizer(self):
        """The tokenizer, or None when the source has none (verification then uses fixed token ids)."""
        if self.kind == "gguf":
            return self.tokenizer
        if not self.tokenizer_paths():
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder)


def open_source(spec: str | Path, *, revision: str | None = None) -> Source:
    """Resolve `spec` (folder, .gguf file or Hub repo id) into a validated `Source`."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _open_gguf(path, str(spec))
    if path.is_dir():
        return _open_folder(path, str(spec), "folder")
    if path.exists():
        raise ValueError(
            f"{spec} is a file but not a .gguf file: pass a checkpoint folder, a .gguf file or a Hub repo id."
        )
    if path.suffix == ".gguf" or not _REPO_ID.match(str(spec)):
        raise FileNotFoundError(f"{spec} does not exist (nor is it a Hub repo id like 'meta-llama/Llama-3.2-1B').")
    folder = download_from_hub(str(spec), revision=revision)
    return _open_folder(folder, str(spec), "hub")


def download_from_hub(repo_id: str, revision: str | None = None) -> Path:
    """Download the checkpoint files of `repo_id` (safetensors, else .bin) with huggingface_hub; returns the folder."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
        patterns = HUB_PATTERNS + ([] if any(f.endswith(".safetensors") for f in files) else HUB_BIN_PATTERNS)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise FileNotFoundError(
            f"could not download {repo_id!r} from the Hub ({type(e).__name__}: {e}). "
            "Check the repo id, your network and "
            "`hf auth login` for gated models; if you meant a local folder, it does not exist."
        ) from e


# ---------------------------------------------------------------------------------------------------------
# Local folders (also Hub snapshots)
# ---------------------------------------------------------------------------------------------------------
def _open_folder(folder: Path, spec: str, kind: str) -> Source:
    config = _read_config(folder)
    if (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file():
        tensors = _safetensors_checkpoint(folder)
    elif (folder / BIN_INDEX_FILE).is_file() or (folder / BIN_FILE).is_file():
        tensors = _bin_checkpoint(folder)
    else:
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f" It holds {ggufs}: pass the .gguf file itself." if ggufs else ""
        raise FileNotFoundError(
            f"{folder} has no weights in transformers format ({SINGLE_FILE}, {INDEX_FILE}, {BIN_FILE} or "
            f"{BIN_INDEX_FILE}).{hint}"
        )
    card = readme_metadata(folder)
    base_model = spec if kind == "hub" else _repo_id_from_cache_path(folder)
    return Source(
        spec=spec,
        kind=kind,
        path=folder,
        config=config,
        tensors=tensors,
        dtype=_stored_dtype(config, tensors),
        license=card.get("license"),
        base_model=base_model,
    )


def _read_config(folder: Path) -> PretrainedConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: a transformers checkpoint folder needs one.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint.") from e
    check_supported(raw.get("model_type"))  # refuse before transformers tries to interpret it
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path} could not be read by transformers: {e}") from e


def _safetensors_checkpoint(folder: Path) -> list[TensorRef]:
    if not (folder / INDEX_FILE).is_file():
        return _safetensors_file(folder / SINGLE_FILE)
    weight_map = _read_index(folder / INDEX_FILE)
    files = [folder / name for name in sorted(set(weight_map.values()))]
    tensors: list[TensorRef] = []
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{INDEX_FILE} lists the shard {path.name}, which is missing from {folder}.")
        stored = _safetensors_file(path)
        listed = {n for n, f in weight_map.items() if f == path.name}
        missing = listed - {t.name for t in stored}
        if missing:
            raise ValueError(
                f"{INDEX_FILE} places {some_names(missing)} in {path.name}, which does not hold them: the shard or the "
                "index is from another checkpoint. Re-download or re-save it."
            )
        tensors += [t for t in stored if t.name in listed]
    return tensors


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid shard index (JSON with a 'weight_map'): {e}") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{path} has an empty or invalid 'weight_map'.")
    return weight_map


def _safetensors_file(path: Path) -> list[StoredTensor]:
    """The tensors of one safetensors file, after checking the header against the file size."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing.")
    problem = f"{path} is truncated or corrupt"
    try:
        meta = parse_local_safetensors_file_metadata(path)
        with open(path, "rb") as f:
            data_start = 8 + struct.unpack("<Q", f.read(8))[0]
    except Exception as e:  # SafetensorsParsingError, malformed entries, short reads
        raise ValueError(f"{problem} (cannot parse the safetensors header: {e}). Re-download or re-save it.") from e
    tensors, end = [], 0
    for name, info in sorted(meta.tensors.items(), key=lambda kv: kv[1].data_offsets[0]):
        dtype = SAFETENSORS_DTYPES.get(info.dtype)
        if dtype is None:
            raise ValueError(
                f"{path}: tensor {name!r} has dtype {info.dtype}; only floating-point weights can be converted."
            )
        begin, stop = info.data_offsets
        t = StoredTensor(name=name, shape=tuple(info.shape), dtype=dtype, origin=path, offset=data_start + begin)
        if begin != end or stop - begin != t.nbytes():
            raise ValueError(
                f"{problem}: the header's offsets for {name!r} are inconsistent. Re-download or re-save it."
            )
        tensors.append(t)
        end = stop
    size = path.stat().st_size
    if size != data_start + end:
        raise ValueError(
            f"{problem}: its header describes {data_start + end} bytes but the file has {size}. "
            "Re-download or re-save it."
        )
    return tensors


def _bin_checkpoint(folder: Path) -> list[TensorRef]:
    if (folder / BIN_INDEX_FILE).is_file():
        weight_map = _read_index(folder / BIN_INDEX_FILE)
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = [folder / BIN_FILE]
    shards = _BinShards()
    tensors: list[TensorRef] = []
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{BIN_INDEX_FILE} lists the shard {path.name}, which is missing from {folder}.")
        for name, t in shards.get(path).items():
            if not t.is_floating_point():
                raise ValueError(
                    f"{path}: tensor {name!r} has dtype {t.dtype}; only floating-point weights can be converted."
                )
            tensors.append(
                LoadedTensor(
                    name=name,
                    shape=tuple(t.shape),
                    dtype=t.dtype,
                    origin=path,
                    load=lambda path=path, name=name: shards.get(path)[name],
                )
            )
    return tensors


class _BinShards:
    """Loads `.bin` shards memory-mapped, keeping only the last one, so shards are read one at a time."""

    def __init__(self):
        self.path: Path | None = None
        self.state: dict[str, torch.Tensor] = {}

    def get(self, path: Path) -> dict[str, torch.Tensor]:
        if path != self.path:
            self.state = {}
            self.state, self.path = self._load(path), path
        return self.state

    @staticmethod
    def _load(path: Path) -> dict[str, torch.Tensor]:
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"{path} is truncated or corrupt (torch.load failed: {e}). Re-download or re-save it."
            ) from e
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__}).")
        return state


# ---------------------------------------------------------------------------------------------------------
# GGUF: dequantised through transformers (this one source is built in memory)
# ---------------------------------------------------------------------------------------------------------
def _open_gguf(path: Path, spec: str) -> Source:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    metadata = _gguf_metadata(path)
    check_supported(metadata.get("general.architecture"))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # the GGUF loader raises many types on bad files
        raise ValueError(f"transformers could not load {path} ({type(e).__name__}: {e}).") from e
    check_supported(model.config.model_type)
    state = model.state_dict()
    tensors = [LoadedTensor(name=n, shape=tuple(t.shape), dtype=t.dtype, load=lambda t=t: t) for n, t in state.items()]
    return Source(
        spec=spec,
        kind="gguf",
        path=path,
        config=model.config,
        tensors=tensors,
        dtype=torch.float32,
        license=metadata.get("general.license"),
        base_model=_repo_from_url(metadata.get("general.base_model.0.repo_url")),
        model=model.eval(),
        tokenizer=tokenizer,
    )


def _gguf_metadata(path: Path) -> dict[str, object]:
    """The `general.*` string fields of a GGUF file (architecture, license, base model)."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise RuntimeError("reading .gguf files needs the gguf package: pip install 'hf-attnres[gguf]'.") from e
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}).") from e
    out = {}
    for key, fld in reader.fields.items():
        if key.startswith("general."):
            try:
                out[key] = fld.contents()
            except Exception:  # a field of an unexpected type: not needed
                continue
    return out


# ---------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------
def _stored_dtype(config: PretrainedConfig, tensors: list[TensorRef]) -> torch.dtype:
    """The checkpoint's dtype: the config's when it names a float type, else the most common tensor dtype."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return Counter(t.dtype for t in tensors).most_common(1)[0][0]


def readme_metadata(folder: Path) -> dict:
    """The YAML front matter of `folder`'s README.md (a model card), or {} when there is none."""
    readme = folder / "README.md"
    try:
        return (metadata_load(readme) or {}) if readme.is_file() else {}
    except Exception:  # malformed front matter: the card is informative only
        return {}


def _repo_id_from_cache_path(folder: Path) -> str | None:
    """`org/name` when `folder` is a snapshot in the Hugging Face cache, else None."""
    match = _HF_CACHE_DIR.search(folder.resolve().as_posix())
    return f"{match.group(1)}/{match.group(2)}" if match else None


def _repo_from_url(url: object) -> str | None:
    if isinstance(url, str) and "huggingface.co/" in url:
        return url.rstrip("/").split("huggingface.co/", 1)[1] or None
    return None
