"""Distillation into the multi-head student: the loss against a per-example reference, the head set,
the serving rows, ONNX equality, and short runs on the tiny world with the tiny teacher (the loss
goes down; a resumed run ends bit-for-bit where an uninterrupted one does)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from schemas.graph import LabelSet, ReasoningGraph
from schemas.storage import write_table
from schemas.tables import RELEVANCE
from training.distill import IGNORE, TEACHER_CACHE, DistillConfig, batch_targets, distill_loss, node_tables, run, soft_kl
from training.student import (
    CHECK_STATES,
    OnnxStudent,
    build_student,
    check_keys,
    default_encoder,
    export_onnx,
    head_value,
    head_vocabularies,
    length_sorted_batches,
    load_student,
    pad_batch,
    predict_probabilities,
    quantize_onnx,
    save_student,
    score_split,
    student_rows,
    tokenize_pairs,
)

GRAPH = ReasoningGraph.load("relevance7")
LABELS = LabelSet.load("wands")
PAIRS = [
    {"query": "gray sofa", "query_id": "q1", "product_id": "p1", "title": "Gray wool sofa by Acme", "product_type": "sofa",
     "attributes": {"color": "gray", "material": "wool", "brand": "Acme"}, "description": "A sofa for the living room, soft and deep."},
    {"query": "bed", "query_id": "q2", "product_id": "p5", "title": "Queen bed frame", "product_type": "bed frame",
     "attributes": {}, "description": None},
    {"query": "oak coffee table", "query_id": "q3", "product_id": "p3", "title": "Oak coffee table", "product_type": "coffee table",
     "attributes": {"material": "oak"}, "description": "A table."},
]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A one-layer, 16-wide BERT with the MiniLM tokenizer: any local encoder folder works as the student's encoder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_encoder")
    tokenizer = AutoTokenizer.from_pretrained(default_encoder())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=128)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _config(tiny_world, tiny_model, tiny_encoder, out, **overrides) -> DistillConfig:
    defaults = dict(data=tiny_world, teacher=tiny_model, encoder=tiny_encoder, out=out, max_steps=4, batch_size=8, warmup_steps=1,
                    lr=1e-3, head_lr=1e-2, max_length=48, checkpoint_every=2, val_items=0, teacher_batch_size=16, threads=1)
    return DistillConfig(**{**defaults, **overrides})


@pytest.mark.parametrize("bad", [{"gold_weight": 1.5}, {"temperature": 0.0}, {"max_steps": 0}, {"graph": "nope"}, {"order": "backwards"}])
def test_config_rejects_bad_values_by_name(bad, tmp_path):
    from schemas.config import ConfigError

    with pytest.raises(ConfigError, match=next(iter(bad)) if next(iter(bad)) not in ("graph", "order") else "graph/order"):
        DistillConfig(out=tmp_path, **bad)
    with pytest.raises(ConfigError, match="encoder"):
        DistillConfig(encoder=tmp_path)  # no config.json there


# ---------------------------------------------------------------- the loss


def test_soft_kl_equals_the_textbook_sum_per_example():
    torch.manual_seed(1)
    for temperature in (1.0, 2.0, 4.0):
        student = torch.randn(5, 3)
        teacher = torch.softmax(torch.randn(5, 3), dim=-1)
        got = soft_kl(student, teacher, temperature)
        for i in range(5):
            softened = [teacher[i, k].item() ** (1 / temperature) for k in range(3)]
            p = [s / sum(softened) for s in softened]
            z = sum(math.exp(student[i, k].item() / temperature) for k in range(3))
            q = [math.exp(student[i, k].item() / temperature) / z for k in range(3)]
            assert got[i].item() == pytest.approx(temperature**2 * sum(pk * math.log(pk / qk) for pk, qk in zip(p, q)), rel=1e-5)
    assert soft_kl(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[1 / 3, 1 / 3, 1 / 3]]), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_distill_loss_mixes_teacher_and_gold_and_skips_missing_targets():
    logits = {"y": torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), "ms": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])}
    teacher_probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    teacher = {"y": torch.tensor([IGNORE, IGNORE]), "ms": torch.tensor([0, IGNORE])}  # the teacher decided ms only for pair 0
    gold = {"y": torch.tensor([0, 2]), "ms": torch.tensor([1, 2])}
    loss, metrics = distill_loss(logits, teacher_probs, teacher, gold, label_node="y", temperature=2.0, gold_weight=0.25, node_weight=0.5)

    def ce(row, target):
        return -math.log(math.exp(row[target]) / sum(math.exp(v) for v in row))

    kl = soft_kl(logits["y"], teacher_probs, 2.0).mean().item()
    y_gold = (ce([2.0, 0.0, -1.0], 0) + ce([0.0, 1.0, 0.0], 2)) / 2
    ms_teacher = ce([1.0, 0.0, 0.0], 0)  # one target: a mean over one pair, not over two
    ms_gold = (ce([1.0, 0.0, 0.0], 1) + ce([0.0, 0.0, 3.0], 2)) / 2
    expected = 0.75 * kl + 0.25 * y_gold + 0.5 * (0.75 * ms_teacher + 0.25 * ms_gold)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["loss/ms_teacher"] == pytest.approx(ms_teacher, rel=1e-5)
    none_decided = {"y": teacher["y"], "ms": torch.tensor([IGNORE, IGNORE])}
    loss, metrics = distill_loss(logits, teacher_probs, none_decided, gold, label_node="y", temperature=2.0, gold_weight=0.25, node_weight=0.5)
    assert metrics["loss/ms_teacher"] == 0.0 and math.isfinite(loss.item())


def test_targets_map_decisions_into_each_head_and_ignore_the_rest():
    heads = head_vocabularies(GRAPH, LABELS, ("sofa", "bed frame"))
    pairs = [{"gold": {"y": "Partial", "qs": "sofa", "ps": "lamp", "ms": "related", "ma": "none"}}]
    teacher = [{"label_probs": [("Irrelevant", 0.5), ("Exact", 0.2), ("Partial", 0.3)],  # any order in the row
                "node_decisions": [("ms", "match"), ("qs", "bed frame"), ("ps", "sofa table")]}]
    probs, from_teacher, from_gold = batch_targets(pairs, teacher, heads, "y", LABELS)
    assert probs.tolist() == [pytest.approx([0.2, 0.3, 0.5])]
    assert {head: t.tolist() for head, t in from_teacher.items()} == {"y": [IGNORE], "qs": [1], "ps": [IGNORE], "ms": [0], "ma": [IGNORE]}
    assert {head: t.tolist() for head, t in from_gold.items()} == {"y": [1], "qs": [0], "ps": [IGNORE], "ms": [1], "ma": [3]}


# ---------------------------------------------------------------- the student


def test_heads_follow_the_graph():
    assert head_vocabularies(GRAPH, LABELS) == {"y": ("Exact", "Partial", "Irrelevant"), "ms": ("match", "related", "mismatch"),
                                                "ma": ("match", "partial", "mismatch", "none")}
    with_classes = head_vocabularies(GRAPH, LABELS, ("bed frame", "sofa"))
    assert list(with_classes) == ["y", "qs", "ps", "ms", "ma"] and with_classes["ps"] == ("bed frame", "sofa")
    assert head_vocabularies(GRAPH, LABELS, ("sofa",), single_head=True) == {"y": ("Exact", "Partial", "Irrelevant")}
    # without the subjects, ms keeps no rule over them
    small = ReasoningGraph(name="small", nodes=tuple(dataclasses.replace(node, equal_parents=None) for node in GRAPH.nodes[4:]),
                           edges=(("ms", "y"), ("ma", "y")), label_node="y", orders={"label_first": ("y", "ms", "ma")})
    assert list(head_vocabularies(small, LABELS, ("sofa",))) == ["y", "ms", "ma"]


def test_node_tables_count_the_decisions_of_nodes_whose_parents_have_heads():
    heads = head_vocabularies(GRAPH, LABELS, ("sofa", "bed frame"))
    decisions = [{"qs": "sofa", "ps": "bed frame", "ms": "related", "ma": "none", "y": "Partial"},
                 {"qs": "sofa", "ps": "bed frame", "ms": "related", "ma": "none", "y": "Partial"},
                 {"qs": "sofa", "ps": "sofa", "ms": "match", "ma": "match", "y": "Exact"},
                 {"qs": "lamp", "ps": "sofa", "ms": "mismatch", "ma": "none", "y": "Irrelevant"}]  # lamp: no class, counted for y only
    tables = node_tables(decisions, heads, GRAPH)
    assert list(tables) == ["ms", "y"] and tables["ms"][0] == ("qs", "ps") and tables["y"][0] == ("ms", "ma")
    ms = tables["ms"][1]
    assert ms.shape == (2, 2, 3) and ms.sum() == 3 and ms[0, 1, 1] == 2 and ms[0, 0, 0] == 1
    y = tables["y"][1]
    assert y.shape == (3, 4, 3) and y.sum() == 4 and y[2, 3, LABELS.names.index("Irrelevant")] == 1
    assert list(node_tables(decisions, head_vocabularies(GRAPH, LABELS), GRAPH)) == ["y"]  # no class heads: qs and ps have none


CHECKED = ReasoningGraph.load("relevance8")
CHECK_GOLDS = [{"qa": "color=gray", "ac": "color=gray/gray:yes", "ma": "match"},
               {"qa": "color=gray; size=king", "ac": "color=gray/red:no; size=king/king:yes", "ma": "partial"},
               {"qa": "material=oak", "ac": "material=oak/-:no", "ma": "mismatch"},
               {"qa": "none", "ac": "none", "ma": "none"}]


def test_a_checks_node_gets_a_head_per_key_its_gold_checks():
    checks = check_keys(CHECK_GOLDS, CHECKED)
    assert checks == {"ac": ("color", "material", "size")}  # qa's values are facets, not checks
    heads = head_vocabularies(CHECKED, LABELS, checks=checks)
    assert list(heads) == ["y", "ac:color", "ac:material", "ac:size", "ms", "ma"] and heads["ac:size"] == ("unasked", "yes", "no")
    assert [head_value(gold, "ac:color") for gold in CHECK_GOLDS] == ["yes", "no", "unasked", "unasked"]
    assert head_value({"ac": "color=gray"}, "ac:color") is None and head_value({}, "ac:color") is None  # not checks, or not decided
    assert check_keys(CHECK_GOLDS, GRAPH) == {}  # relevance7 has no checks node


def test_the_attribute_match_is_counted_per_case_of_the_checks():
    heads = head_vocabularies(CHECKED, LABELS, checks=check_keys(CHECK_GOLDS, CHECKED))
    decisions = [{**gold, "ms": "match", "y": "Exact"} for gold in CHECK_GOLDS] + [{"ac": "color=gray/gr", "ma": "match"}]  # unparsed: not counted
    tables = node_tables(decisions, heads, CHECKED)
    assert list(tables) == ["ma", "y"] and tables["ma"][0] == ("ac",)
    ma = tables["ma"][1]
    assert ma.shape == (4, 4) and ma.sum() == 4
    values = CHECKED.node("ma").values
    for state, value in (("all yes", "match"), ("mixed", "partial"), ("all no", "mismatch"), ("unasked", "none")):
        assert ma[CHECK_STATES.index(state), values.index(value)] == 1


def test_check_states_are_the_cases_of_independent_keys(tiny_encoder, tmp_path):
    heads = head_vocabularies(CHECKED, LABELS, checks={"ac": ("color", "material", "size")})
    counts = torch.eye(4)[[3, 0, 2, 1]]  # unasked -> none, all yes -> match, all no -> mismatch, mixed -> partial
    model, tokenizer = build_student(tiny_encoder, heads, tables={"ma": (("ac",), counts)})
    torch.manual_seed(0)
    logits = tuple(torch.randn(2, len(values)) for values in heads.values())
    keys = [torch.softmax(logits[model.head_names.index(f"ac:{key}")], dim=-1) for key in ("color", "material", "size")]
    expected = torch.zeros(2, 4)
    for verdicts in ((a, b, c) for a in range(3) for b in range(3) for c in range(3)):  # every assignment of unasked/yes/no
        probability = keys[0][:, verdicts[0]] * keys[1][:, verdicts[1]] * keys[2][:, verdicts[2]]
        expected[:, (1 in verdicts) + 2 * (2 in verdicts)] += probability
    assert torch.allclose(model.check_states(dict(zip(model.head_names, logits)), "ac"), expected, atol=1e-6)
    served = dict(zip(model.head_names, model.compose(logits)))["ma"].exp()
    own = torch.softmax(logits[model.head_names.index("ma")], dim=-1)
    conditional = (counts + 0.25) / 2
    assert torch.allclose(served, expected @ (0.5 * conditional) + 0.5 * own, atol=1e-6)

    save_student(model, tokenizer, tmp_path / "saved", graph=CHECKED.name, label_set=LABELS.name, max_length=48)
    loaded, _, meta = load_student(tmp_path / "saved")
    assert meta["tables"] == {"ma": ["ac"]} and torch.equal(loaded.table_ma, counts)
    batch = pad_batch(tokenize_pairs(tokenizer, PAIRS, 48), tokenizer.pad_token_id)
    with torch.inference_mode():
        expected_served = model.eval().predict(**batch)
    onnx_served = OnnxStudent(export_onnx(model, tokenizer, tmp_path / "student.onnx", max_length=48), heads).predict(**batch)
    for onnx_logits, torch_logits in zip(onnx_served, expected_served):
        assert torch.allclose(onnx_logits, torch_logits, atol=1e-4)
    rows = student_rows(loaded, tokenizer, PAIRS, LABELS, "y", max_length=48, model_name="student", model_version="v1", ds=dt.date(2024, 1, 2))
    assert {node for row in rows.to_pylist() for node, _ in row["node_decisions"]} == {"ms", "ma"}  # check heads decide no node


def test_a_tabled_node_is_its_parents_joint_through_the_counts_mixed_with_its_own_head(tiny_encoder):
    heads = {"y": ("Exact", "Partial", "Irrelevant"), "qs": ("sofa", "lamp"), "ps": ("sofa", "lamp"), "ms": ("match", "related", "mismatch")}
    counts = torch.zeros(2, 2, 3)
    counts[0, 1, 2] = 3  # sofa query, lamp product: mismatch three times; (lamp, lamp) and (lamp, sofa) never seen
    counts[0, 0, 0] = 1
    model, _ = build_student(tiny_encoder, heads, tables={"ms": (("qs", "ps"), counts)})
    logits = (torch.zeros(1, 3), torch.tensor([[math.log(0.9), math.log(0.1)]]), torch.tensor([[math.log(0.2), math.log(0.8)]]),
              torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]]))
    y, qs, ps, ms = model.compose(logits)
    own = torch.tensor([0.5, 0.3, 0.2])
    sofa_lamp = 0.75 * (torch.tensor([0.0, 0.0, 3.0]) + 1 / 3) / 4 + 0.25 * own
    sofa_sofa = 0.5 * (torch.tensor([1.0, 0.0, 0.0]) + 1 / 3) / 2 + 0.5 * own
    expected = 0.9 * 0.8 * sofa_lamp + 0.9 * 0.2 * sofa_sofa + 0.1 * own
    assert torch.allclose(ms.exp()[0], expected, atol=1e-6) and ms.exp().sum().item() == pytest.approx(1.0)
    assert torch.equal(qs, logits[1]) and torch.equal(y, logits[0])  # untabled heads pass through


def test_length_sorted_batches_cover_every_index_once_longest_first():
    batches = length_sorted_batches([3, 9, 1, 9, 5], 2)
    assert batches == [[1, 3], [4, 0], [2]]


def test_the_packaged_minilm_loads_offline_as_the_encoder():
    model, tokenizer = build_student(default_encoder(), head_vocabularies(GRAPH, LABELS))
    assert model.encoder.config.hidden_size == 384 and model.encoder.config.num_hidden_layers == 6
    encoded = tokenize_pairs(tokenizer, PAIRS[:1], 64)[0]["input_ids"]
    text = tokenizer.decode(encoded)
    assert text.startswith("[CLS] gray sofa [SEP] title : gray wool sofa by acme") and text.endswith("[SEP]")


def test_rows_follow_the_relevance_schema_and_do_not_depend_on_batching(tiny_encoder, tmp_path):
    torch.manual_seed(0)
    model, tokenizer = build_student(tiny_encoder, head_vocabularies(GRAPH, LABELS, ("sofa", "bed frame")))
    rows = student_rows(model, tokenizer, PAIRS, LABELS, "y", max_length=48, model_name="student", model_version="v1", ds=dt.date(2024, 1, 2),
                        batch_size=2)
    assert rows.schema == RELEVANCE.arrow_schema()
    alone = [predict_probabilities(model, tokenizer, [pair], 48, batch_size=1) for pair in PAIRS]
    for i, row in enumerate(rows.to_pylist()):
        probabilities = dict(row["label_probs"])
        assert sum(probabilities.values()) == pytest.approx(1.0)
        assert list(probabilities.values()) == pytest.approx(alone[i]["y"][0].tolist(), abs=1e-5)  # padding changes nothing
        assert row["label"] == max(probabilities, key=probabilities.get)
        assert row["expected_gain"] == pytest.approx(sum(LABELS.gains[k] * p for k, p in probabilities.items()))
        assert [node for node, _ in row["node_decisions"]] == ["ma", "ms", "ps", "qs"]
        ms = dict(row["node_decisions"])["ms"]
        assert ms == GRAPH.node("ms").values[int(alone[i]["ms"][0].argmax())]
        assert row["reasoning"] is None and row["query_id"] == PAIRS[i]["query_id"]


def test_onnx_outputs_equal_pytorch_and_serve_through_the_same_path(tiny_encoder, tmp_path):
    torch.manual_seed(0)
    heads = head_vocabularies(GRAPH, LABELS, ("sofa", "bed frame"))
    tables = {node: (parents, torch.randint(0, 3, counts.shape).float()) for node, (parents, counts) in node_tables([], heads, GRAPH).items()}
    model, tokenizer = build_student(tiny_encoder, heads, tables=tables)  # the export serves the tables composed in
    path = export_onnx(model, tokenizer, tmp_path / "student.onnx", max_length=48)
    batch = pad_batch(tokenize_pairs(tokenizer, PAIRS, 48), tokenizer.pad_token_id)  # another batch size and length than the export's
    onnx_student = OnnxStudent(path, heads)
    with torch.inference_mode():
        expected = model.eval().predict(**batch)
        assert not torch.allclose(expected[3], model(**batch)[3])  # ms is composed
    got = onnx_student.predict(**batch)
    assert [tuple(o.shape) for o in got] == [(3, 3), (3, 2), (3, 2), (3, 3), (3, 4)]
    for onnx_logits, torch_logits in zip(got, expected):
        assert torch.allclose(onnx_logits, torch_logits, atol=1e-4)
    served = predict_probabilities(onnx_student, tokenizer, PAIRS, 48, batch_size=2)
    save_student(model, tokenizer, tmp_path / "saved", graph=GRAPH.name, label_set=LABELS.name, max_length=48)
    loaded, _, _ = load_student(tmp_path / "saved")
    assert torch.equal(loaded.table_ms, tables["ms"][1])
    for name, probabilities in predict_probabilities(loaded, tokenizer, PAIRS, 48, batch_size=2).items():
        assert torch.allclose(served[name], probabilities, atol=1e-5)

    int8 = OnnxStudent(quantize_onnx(path, tmp_path / "student.int8.onnx"), heads)
    assert (tmp_path / "student.int8.onnx").stat().st_size < path.stat().st_size
    rows = student_rows(int8, tokenizer, PAIRS, LABELS, "y", max_length=48, model_name="student", model_version="int8", ds=dt.date(2024, 1, 2))
    assert rows.schema == RELEVANCE.arrow_schema() and rows.num_rows == 3


class _FinalizerThatReadsATensor:
    """Like vLLM's CPU matmul handle, which frees itself through `tensor.item()` when collected: under the exporter's
    fake tensors that read becomes an unbacked symbol the trace then refuses."""

    def __init__(self, handle: torch.Tensor):
        self.handle = handle
        self.cycle = self  # only the cyclic collector frees it, at whatever allocation it next runs

    def __del__(self):
        self.handle.item()


def test_an_export_is_not_broken_by_garbage_whose_finalizer_reads_a_tensor(tiny_encoder, tmp_path):
    heads = head_vocabularies(GRAPH, LABELS, ("sofa",))
    model, tokenizer = build_student(tiny_encoder, heads)

    handle = torch.tensor(7)  # made here: a tensor made inside the collector's callback would be traced too

    def leave_one_pending(phase, info):  # whenever the collector runs, it finds such garbage
        if phase == "stop":
            _FinalizerThatReadsATensor(handle)

    thresholds = gc.get_threshold()
    gc.set_threshold(200)  # collections throughout the trace, as late in a long process
    gc.callbacks.append(leave_one_pending)
    try:
        path = export_onnx(model, tokenizer, tmp_path / "student.onnx", max_length=48)
    finally:
        gc.callbacks.remove(leave_one_pending)
        gc.set_threshold(*thresholds)
    batch = pad_batch(tokenize_pairs(tokenizer, PAIRS, 48), tokenizer.pad_token_id)
    with torch.inference_mode():
        expected = model.eval().predict(**batch)
    for onnx_logits, torch_logits in zip(OnnxStudent(path, heads).predict(**batch), expected):
        assert torch.allclose(onnx_logits, torch_logits, atol=1e-4)


# ---------------------------------------------------------------- runs


def test_a_short_run_saves_a_student_that_loads_and_caches_the_teacher(tiny_world, tiny_model, tiny_encoder, tmp_path, monkeypatch):
    config = _config(tiny_world, tiny_model, tiny_encoder, tmp_path / "run", max_steps=2, class_heads=True, graph_tables=True)
    summary = run(config)
    assert summary["heads"] == ["y", "qs", "ps", "ms", "ma"]
    meta = json.loads((tmp_path / "run" / "model" / "student.json").read_text())
    assert meta["graph"] == "relevance7" and meta["label_set"] == "wands" and meta["heads"]["ms"] == ["match", "related", "mismatch"]
    assert meta["tables"] == {"ms": ["qs", "ps"], "y": ["ms", "ma"]}
    model, tokenizer, loaded_meta = load_student(tmp_path / "run" / "model")
    assert loaded_meta == meta
    rows = score_split(tmp_path / "run" / "model", tiny_world, "validation", model_name="student")
    assert rows.schema == RELEVANCE.arrow_schema() and rows.num_rows == 16  # q2 and q5, 8 products each
    assert {node for row in rows.to_pylist() for node, _ in row["node_decisions"]} == {"qs", "ps", "ms", "ma"}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and "val/label_macro_f1" in records[-1]

    cache = pq.read_table(tmp_path / "run" / TEACHER_CACHE)
    assert cache.schema == RELEVANCE.arrow_schema() and cache.num_rows == summary["drawn_pairs"] == 16
    counted = node_tables([{**dict(row["node_decisions"]), "y": row["label"]} for row in cache.to_pylist()], meta["heads"], GRAPH)
    assert torch.equal(model.table_ms, counted["ms"][1]) and torch.equal(model.table_y, counted["y"][1])  # the drawn pairs' decisions
    for row in cache.to_pylist():
        assert sum(dict(row["label_probs"]).values()) == pytest.approx(1.0)
    # a longer re-run scores only the pairs the first one did not draw
    longer = run(dataclasses.replace(config, max_steps=4, resume=False))
    assert pq.read_table(tmp_path / "run" / TEACHER_CACHE).num_rows == longer["drawn_pairs"] > 16

    # rows the teacher already wrote elsewhere (a RELEVANCE table) stand in for scoring
    # (the untrained teacher decides nothing in the heads' vocabularies: these rows decide, so the tables count them)
    subject = meta["heads"]["qs"][0]
    decided = [{**row, "node_decisions": [("ma", "none"), ("ms", "match"), ("ps", subject), ("qs", subject)]}
               for row in pq.read_table(tmp_path / "run" / TEACHER_CACHE).to_pylist()]
    write_table(RELEVANCE, pa.Table.from_pylist(decided, schema=RELEVANCE.arrow_schema()), tmp_path / "scores")
    monkeypatch.setattr("training.model.load_model", lambda *_: pytest.fail("the teacher was loaded to score cached pairs"))
    again = run(dataclasses.replace(config, out=tmp_path / "other", max_steps=4, teacher_scores=tmp_path / "scores"))
    assert again["drawn_pairs"] == longer["drawn_pairs"]
    served, _, _ = load_student(tmp_path / "other" / "model")
    assert served.table_ms[0, 0, 0] == served.table_ms.sum() == again["drawn_pairs"]  # every drawn pair: (subject, subject) -> match
    assert served.table_y[0, 3].sum() == again["drawn_pairs"]  # ms match, ma none, under each pair's label


def test_loss_goes_down(tiny_world, sft_policy, tiny_encoder, tmp_path):
    # batch_size 32 is the whole train split, so every step sees the same pairs and the loss is comparable
    run(_config(tiny_world, sft_policy, tiny_encoder, tmp_path / "run", max_steps=16, batch_size=32, checkpoint_every=0, dropout=0.0,
                lr=3e-3, head_lr=3e-2, warmup_steps=2))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1:-1]]
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_resume_continues_bit_for_bit(tiny_world, tiny_model, tiny_encoder, tmp_path):
    from safetensors.torch import load_file

    run(_config(tiny_world, tiny_model, tiny_encoder, tmp_path / "whole"))
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    (tmp_path / "resumed" / "checkpoints" / "step-000002").symlink_to(tmp_path / "whole" / "checkpoints" / "step-000002")
    summary = run(_config(tiny_world, tiny_model, tiny_encoder, tmp_path / "resumed"))
    assert summary["resumed_from"] == 2

    def losses(folder):
        return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]

    assert losses(tmp_path / "resumed") == losses(tmp_path / "whole")[2:]
    a = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checked_teacher_targets_are_decoded_checked_and_cached_as_their_own_version(tiny_world, tiny_model, tiny_encoder, tmp_path,
                                                                                    monkeypatch):
    """With checked_verdicts the teacher generates under checked decoding, its rows are cached under the checked version,
    a plain run in the same folder scores the pairs again instead of taking them, and the student names what it learned."""
    import training.predict
    from training.model_files import model_version
    from training.predict import decoding_version

    decoded = []
    relevance_rows = training.predict.relevance_rows
    monkeypatch.setattr(training.predict, "relevance_rows",
                        lambda *args, **kwargs: decoded.append(kwargs["checked_verdicts"]) or relevance_rows(*args, **kwargs))
    config = _config(tiny_world, tiny_model, tiny_encoder, tmp_path / "run", max_steps=2, checkpoint_every=0, checked_verdicts=True)
    checked = run(config)
    weights = model_version(tiny_model)
    version = decoding_version(weights, GRAPH, checked_verdicts=True)
    assert decoded == [True] and version.startswith(f"{weights}-checked-")
    assert {row["model_version"] for row in pq.read_table(tmp_path / "run" / TEACHER_CACHE).to_pylist()} == {version}
    assert json.loads((tmp_path / "run" / "model" / "student.json").read_text())["teacher_version"] == version

    plain = run(dataclasses.replace(config, checked_verdicts=False, resume=False))
    cache = pq.read_table(tmp_path / "run" / TEACHER_CACHE)
    assert decoded == [True, False] and plain["drawn_pairs"] == checked["drawn_pairs"]
    assert cache["model_version"].to_pylist() == [weights] * plain["drawn_pairs"]  # the cache keeps the latest version's rows
    assert json.loads((tmp_path / "run" / "model" / "student.json").read_text())["teacher_version"] == weights


def test_checked_teacher_targets_need_a_graph_with_rules(tmp_path):
    from training_world import unruled_graph

    from schemas.config import ConfigError
    from training.policy_format import PolicyFormat

    PolicyFormat(graph=str(unruled_graph(tmp_path)), label_set="wands", order="reasoning_first").save(tmp_path / "teacher")
    with pytest.raises(ConfigError, match="graph 'relevance7' declares no checks_node .* and no node with equal_parents"):
        DistillConfig(teacher=tmp_path / "teacher", checked_verdicts=True)


def test_the_format_comes_from_the_teacher_and_a_contradiction_is_refused(tmp_path):
    from schemas.config import ConfigError
    from training.policy_format import PolicyFormat

    teacher_format = PolicyFormat(order="reasoning_first", prompt_tokens=40)
    teacher_format.save(tmp_path / "teacher")
    assert DistillConfig(teacher=tmp_path / "teacher").teacher_format() == teacher_format
    with pytest.raises(ConfigError, match="order='label_first'.*order='reasoning_first'"):
        DistillConfig(teacher=tmp_path / "teacher", order="label_first")


def test_the_teacher_generates_the_whole_cot_when_its_label_comes_last(tmp_path):
    from training.cot import COT_TOKEN_BUDGET
    from training.policy_format import PolicyFormat

    for order, tokens in (("label_first", 16), ("reasoning_first", COT_TOKEN_BUDGET), ("product_first", COT_TOKEN_BUDGET)):
        PolicyFormat(order=order).save(tmp_path / order)
        assert DistillConfig(teacher=tmp_path / order).teacher_new_tokens == tokens
    assert DistillConfig(teacher=tmp_path / "product_first", teacher_new_tokens=70).teacher_new_tokens == 70


def test_a_huge_title_costs_the_student_tokenizer_no_more_than_a_full_length_one():
    from transformers import AutoTokenizer

    from training.prompt import MAX_CHARS_PER_TOKEN

    tokenizer = AutoTokenizer.from_pretrained(default_encoder())
    seen: list[int] = []

    def counting(queries, products, **options):
        seen.extend(len(text) for text in [*queries, *products])
        return tokenizer(queries, products, **options)

    huge = {**PAIRS[0], "title": "sofa " * 2_000_000}  # 10 MB
    encodings = tokenize_pairs(counting, [huge, PAIRS[1]], max_length=48)
    assert max(seen) <= 4 * 48 * MAX_CHARS_PER_TOKEN  # title and description clipped, plus the short lines
    assert len(encodings[0]["input_ids"]) == 48
    assert tokenize_pairs(tokenizer, [PAIRS[1]], max_length=48)[0] == encodings[1]
