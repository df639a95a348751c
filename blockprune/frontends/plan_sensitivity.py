"""Per-layer sensitivity curves for ``blockprune plan``: one per block shape of the fast set.

Why here: measuring needs the PyTorch model (forward passes with one layer pruned at a time,
``allocation.measure_sensitivity``), and torch lives in the frontends. The planner itself stays
numpy-only; it gets the curves as plain dicts.

What is measured: the same one-shot rule ``compress --plan`` applies (per-layer block L2 norms,
weakest blocks first), each layer alone, at a few ratios; the loss is the model's disagreement
with its unpruned self on a few hundred examples — ``1 - cosine`` of mean-pooled sentence
embeddings for an encoder, logit KL for a classifier, squared error for a regressor — times 100
("points of the proxy"). Curves are cached in a JSON next to the plan, keyed by everything that
changes them, so re-planning with another budget or target is instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError
from blockprune.frontends.allocation import SensitivityCurves, measure_sensitivity

LOSSES = {"encoder": "100 x (1 - cosine of mean-pooled sentence embeddings to the unpruned model)",
          "classification": "100 x logit KL to the unpruned model", "regression": "100 x squared error to the unpruned model"}


@dataclass
class PlanModel:
    """The PyTorch model the plan is for, its prunable layers and where it came from."""

    loaded: Any  # models.zoo.LoadedModel
    layers: dict[str, tuple[int, int]]  # HF name -> (out, in), in model order
    roles: dict[str, tuple[str, int | None]]  # HF name -> (role, encoder layer)
    onnx_path: Path | None
    source: str


def load_plan_model(model: str) -> PlanModel:
    """``minilm`` / a named config / an HF directory, or an ONNX file from ``blockprune export``
    (its source model is loaded and its own weights copied in, so the curves describe that file)."""
    from blockprune.models.zoo import load_model

    onnx_path = None
    # a local checkpoint keeps its own head (a fine-tuned task teacher plans on its task's outputs)
    spec, head = model, (None if Path(model).is_dir() else "encoder")
    if model.endswith(".onnx") or Path(model).is_file():
        from blockprune.onnx_io import get_meta, load_onnx

        onnx_path = Path(model)
        if not onnx_path.is_file():
            raise BlockpruneError(f"model {model!r} does not exist", "give an ONNX file from `blockprune export`")
        proto = load_onnx(onnx_path)
        source, head = get_meta(proto, "source"), get_meta(proto, "head", "encoder")
        param_map = get_meta(proto, "param_map", {}) or {}
        if not source or not param_map:
            raise BlockpruneError(f"{model} has no blockprune export metadata (source model, parameter names)",
                                  "plan on the model it came from (minilm, an HF directory) or export it with "
                                  "`blockprune export`")
        spec = source.split(":", 1)[1] if source.startswith(("bundled:", "config:")) else source
        loaded = load_model(spec, head=head)
        _copy_onnx_weights(loaded.model, proto)
    else:
        loaded = load_model(spec, head=head)
    params = dict(loaded.model.named_parameters())
    names = loaded.arch.prunable(list(params), include_heads=False)
    roles = {n: loaded.arch.role_of(n) for n in names}
    return PlanModel(loaded, {n: tuple(params[n].shape) for n in names}, {n: r for n, r in roles.items() if r},
                     onnx_path, loaded.source)


@torch.no_grad()
def _copy_onnx_weights(module: torch.nn.Module, proto: Any) -> None:
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    for name, p in module.named_parameters():
        if name not in inits:
            continue
        arr = numpy_helper.to_array(inits[name])
        if tuple(arr.shape) == tuple(p.shape):
            p.copy_(torch.from_numpy(np.array(arr)))
        elif arr.ndim == 2 and tuple(arr.T.shape) == tuple(p.shape):
            p.copy_(torch.from_numpy(np.array(arr.T)))


def read_plan_texts(data: str | None, limit: int) -> tuple[list[str] | None, list[Any] | None, str]:
    """(sentences, GLUE examples, description) from a text file or a GLUE task folder."""
    if data is None:
        return None, None, "random token ids (no --data)"
    p = Path(data)
    if p.is_file():
        from blockprune.frontends.embedding import read_sentences

        return read_sentences(p, limit), None, f"{p} (first {limit} lines)"
    if p.is_dir():
        from blockprune.frontends.data import resolve_data_dir
        from blockprune.frontends.glue import get_task, read_glue_split

        try:
            spec = get_task(p.resolve().name)
        except BlockpruneError as exc:
            raise BlockpruneError(f"--data {data!r} is a folder but not a GLUE task folder ({exc.problem})",
                                  "give a GLUE task folder (e.g. ../shared/data/glue/MRPC) or a text file, "
                                  "one sentence per line") from exc
        root, spec = resolve_data_dir(p, spec)
        examples = read_glue_split(root, spec, "train", limit=limit)
        texts = [t for e in examples for t in (e.text_a, e.text_b) if t][:limit]
        return texts, examples, f"{spec.name} train (first {len(examples)} examples)"
    raise BlockpruneError(f"--data {data!r} does not exist",
                          "give a GLUE task folder (e.g. ../shared/data/glue/MRPC) or a text file, one sentence per line")


def make_batches(pm: PlanModel, texts: list[str] | None, max_length: int, examples: int,
                 batch_size: int = 32, seed: int = 0, pairs: list[Any] | None = None) -> list[dict[str, torch.Tensor]]:
    """Tokenised batches (random valid token ids when there is no text or no tokenizer).

    ``pairs`` (GLUE examples): a task head sees its inputs as trained, sentence pairs encoded
    together; an encoder sees single sentences (``texts``)."""
    loaded = pm.loaded
    tok = None
    if texts is not None:
        tok = loaded.tokenizer()
    if tok is not None and pairs is not None and loaded.head != "encoder":
        ex = sorted(pairs[:examples], key=lambda e: len(e.text_a) + len(e.text_b or ""))
        out = []
        for i in range(0, len(ex), batch_size):
            part = ex[i:i + batch_size]
            a = [e.text_a for e in part]
            b = [e.text_b for e in part] if all(e.text_b for e in part) else None
            enc = tok(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            out.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
        return out
    if tok is None:
        g = torch.Generator().manual_seed(seed)
        vocab = int(loaded.config.vocab_size)
        seq = min(max_length, 32)
        out = []
        for i in range(0, examples, batch_size):
            n = min(batch_size, examples - i)
            b = {"input_ids": torch.randint(0, vocab, (n, seq), generator=g),
                 "attention_mask": torch.ones(n, seq, dtype=torch.long)}
            if getattr(loaded, "uses_token_type_ids", False):
                b["token_type_ids"] = torch.zeros(n, seq, dtype=torch.long)
            out.append(b)
        return out
    texts = list(texts)[:examples]
    texts.sort(key=len)  # fewer pad tokens per batch
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        out.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


def _kl_per_example(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each example's class distribution."""
    return torch.nn.functional.kl_div(torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1),
                                      reduction="none", log_target=True).sum(-1)


def _loss_fn(pm: PlanModel, batches: list[dict[str, torch.Tensor]]):
    from blockprune.frontends.embedding import mean_pool

    model = pm.loaded.model.eval()
    head = pm.loaded.head
    if head == "encoder":
        ref = [mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in batches]

        def loss() -> float:
            cos = [(mean_pool(model(**b).last_hidden_state, b["attention_mask"]) * r).sum(-1)
                   for b, r in zip(batches, ref)]
            return 100.0 * float(1.0 - torch.cat(cos).mean())
        return loss
    ref = [model(**b).logits.float() for b in batches]

    def loss() -> float:
        tot, n = 0.0, 0
        for b, t in zip(batches, ref):
            s = model(**b).logits.float()
            if head == "regression":
                tot += float(((s - t) ** 2).sum())
            else:
                tot += float(_kl_per_example(s, t).sum())
            n += s.shape[0]
        return 100.0 * tot / max(n, 1)
    return loss


JOINT_LOSSES = {
    "encoder": "100 x (1 - correlation of the pairwise sentence similarities with the unpruned model's)",
    "classification": "100 x logit KL to the unpruned model",
    "regression": "100 x (1 - Pearson correlation of the outputs with the unpruned model's)"}


BOOTSTRAP = 200  # resamples of the examples for the joint losses' paired standard errors


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair of ``a`` and ``b`` (R, n)."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), 0.0)


def _joint_loss_fn(pm: PlanModel, batches: list[dict[str, torch.Tensor]], seed: int = 0):
    """The loss a whole plan is judged by (all its layers pruned at once): a function returning
    (loss, loss on each of ``BOOTSTRAP`` resamples of the examples). The resamples are the same for
    every call, so two plans' replicate losses give a *paired* standard error of their difference.

    Why not the per-layer loss: summed per-layer losses rank plans that concentrate removal in a
    few kinds of layer far too kindly (on MiniLM/STS-B a plan with Q/K and whole FFNs at 0.9
    kept the embedding cosine of a uniform model but lost 14 points of zero-shot Spearman). What
    a user keeps is the *ranking* of outputs, so an encoder is judged by how well the similarities
    between its sentences still correlate with the unpruned model's, a regressor by the
    correlation of its outputs; a classifier by the logit KL."""
    from blockprune.frontends.embedding import mean_pool

    model = pm.loaded.model.eval()
    head = pm.loaded.head
    rng = np.random.default_rng(seed)
    if head == "encoder":
        def embed() -> np.ndarray:
            return torch.cat([mean_pool(model(**b).last_hidden_state, b["attention_mask"])
                              for b in batches]).double().numpy()
        ref = embed()
        n = ref.shape[0]
        iu = np.triu_indices(n, 1)
        # resample sentences; a pair survives when its two resampled sentences differ
        idx = rng.integers(0, n, size=(BOOTSTRAP, n))
        ref_sims = ref @ ref.T

        def loss() -> tuple[float, np.ndarray]:
            e = embed()
            sims = e @ e.T
            full = 100.0 * (1.0 - float(_pearson_rows(sims[iu][None], ref_sims[iu][None])[0]))
            reps = np.empty(BOOTSTRAP)
            for r, j in enumerate(idx):
                keep = j[iu[0]] != j[iu[1]]
                ja, jb = j[iu[0][keep]], j[iu[1][keep]]
                reps[r] = 100.0 * (1.0 - float(_pearson_rows(sims[ja, jb][None], ref_sims[ja, jb][None])[0]))
            return full, reps
        return loss
    if head == "regression":
        def outs() -> np.ndarray:
            return torch.cat([model(**b).logits.float().reshape(-1) for b in batches]).double().numpy()
        ref_out = outs()
        idx = rng.integers(0, ref_out.shape[0], size=(BOOTSTRAP, ref_out.shape[0]))

        def loss() -> tuple[float, np.ndarray]:
            o = outs()
            full = 100.0 * (1.0 - float(_pearson_rows(o[None], ref_out[None])[0]))
            return full, 100.0 * (1.0 - _pearson_rows(o[idx], ref_out[idx]))
        return loss
    ref_logits = [model(**b).logits.float() for b in batches]
    n = sum(t.shape[0] for t in ref_logits)
    idx = rng.integers(0, n, size=(BOOTSTRAP, n))

    def loss() -> tuple[float, np.ndarray]:
        per = torch.cat([_kl_per_example(model(**b).logits.float(), t)
                         for b, t in zip(batches, ref_logits)]).double().numpy()
        return 100.0 * float(per.mean()), 100.0 * per[idx].mean(-1)
    return loss


@dataclass
class JointScore:
    """A candidate's joint loss and its loss on each shared resample of the examples."""

    loss: float
    replicates: np.ndarray

    def paired_se(self, other: "JointScore") -> float:
        """Standard error of (this - other) over the shared resamples."""
        return float(np.std(self.replicates - other.replicates))


@torch.no_grad()
def score_plans(pm: PlanModel, plans: dict[str, dict[str, tuple[str, float]]],
                batches: list[dict[str, torch.Tensor]], log=None) -> dict[str, JointScore]:
    """Joint loss of each candidate plan ({layer: (block, ratio)}), every layer of it pruned at once
    by the rule ``compress --plan`` applies (per-layer block L2, weakest first); weights restored."""
    from blockprune.frontends.hard_prune import prune_per_layer

    params = dict(pm.loaded.model.named_parameters())
    loss = _joint_loss_fn(pm, batches)
    base, base_reps = loss()
    out = {}
    for tag, plan in plans.items():
        pruned = {n: br for n, br in plan.items() if br[1] > 0}
        saved = {n: params[n].detach().clone() for n in pruned}
        try:
            masks = prune_per_layer(saved, {n: BlockShape.parse(b) for n, (b, _) in pruned.items()},
                                    {n: r for n, (_, r) in pruned.items()})
            for n, m in masks.items():
                params[n].copy_(saved[n].masked_fill(~m.mask.to(params[n].device), 0))
            value, reps = loss()
            out[tag] = JointScore(max(value - base, 0.0), reps - base_reps)
        finally:
            for n, w in saved.items():
                params[n].copy_(w)
        if log:
            log(f"joint score {tag}: {out[tag].loss:.3f}")
    return out


@torch.no_grad()
def measure_plan_curves(pm: PlanModel, blocks: Sequence[str], ratios: Sequence[float],
                        batches: list[dict[str, torch.Tensor]], cache: Path | None, key: dict,
                        log=None) -> tuple[dict[str, SensitivityCurves], bool]:
    """{block: curves} for every layer the block divides; (curves, True) when read from ``cache``."""
    import json

    from blockprune.io import atomic_path

    key = {**key, "blocks": list(blocks), "ratios": sorted(ratios), "rule": "one-shot block L2, per layer"}
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            data = {}
        # curves measured for more blocks serve a plan over fewer of them (each block's curves are
        # measured on their own)
        want, have = json.loads(json.dumps(key)), dict(data.get("key") or {})
        have_blocks = set(have.pop("blocks", []))
        if have == {k: v for k, v in want.items() if k != "blocks"} and set(want["blocks"]) <= have_blocks:
            return {b: SensitivityCurves(c["ratios"], c["loss"], c["sizes"], c.get("baseline", 0.0),
                                         c.get("seconds", 0.0)) for b, c in data["curves"].items() if b in want["blocks"]}, True
    loss = _loss_fn(pm, batches)
    out = {}
    for b in blocks:
        shape = BlockShape.parse(b)
        fits = {n: shape for n, (o, i) in pm.layers.items() if o % shape.rows == 0 and i % shape.cols == 0}
        if fits:
            out[b] = measure_sensitivity(pm.loaded.model, fits, ratios, loss, None, log=log)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache, suffix=".json") as tmp:
            Path(tmp).write_text(json.dumps({"key": key, "curves": {b: c.to_json() for b, c in out.items()}},
                                            indent=1) + "\n")
    return out, False


__all__ = ["LOSSES", "JOINT_LOSSES", "JointScore", "PlanModel", "load_plan_model", "read_plan_texts", "make_batches",
           "measure_plan_curves", "score_plans"]
