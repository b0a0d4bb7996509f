"""Zero-shot judging (`relevance score --prompt zero_shot`) with the hf backend, on the tiny random Mistral of
tests/sharded_checkpoint.py: a folder with no policy.json, Mistral's production tokenizer and its chat template.
Plumbing, not quality: the prompt is the judge prompt inside the model's own template (or a given one), the
label distribution is read after the answer prefix in the assistant's turn (after the greedy reasoning with
reasoning kept), sums to one over the label set, and the model version changes with the prompt's text and the
template, not with its comments. The vLLM side: test_vllm_sharded_checkpoint.py."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.scoring.backends import HFScorer
from jobs.scoring.config import ScoreConfig
from jobs.scoring.spec import ScorerSpec, scorer_version
from schemas.config import ConfigError
from schemas.judge_prompt import JudgePrompt
from schemas.storage import read_table
from schemas.tables import RELEVANCE
from training.policy_format import PolicyFormat
from training.predict import answer_format, label_prefix, label_steps, pair_prompts

DAY = dt.date(2024, 3, 2)
PROMPT_FIELDS = {"query": "gray sofa", "title": "Harper sofa", "type": "sofa"}
BUNDLED = Path(__file__).resolve().parents[3] / "schemas" / "prompts" / "zero_shot.yaml"
# Mistral's [INST] template as its older instruct models ship it (a folder lacking one is given this file)
INST_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
                 "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
PAIRS = [
    {"query": "gray velvet sofa", "query_id": "q1", "product_id": "p1", "title": "Harper 3-seat sofa", "product_type": "sofa",
     "attributes": {"color": "gray", "brand": "Acme"}, "description": "A soft sofa.", "product_content_hash": "h1"},
    {"query": "oak desk", "query_id": "q2", "product_id": "p2", "title": "Lamp", "product_type": "lamp", "attributes": {},
     "description": None, "product_content_hash": "h2"},
]


def spec(model: Path, **settings) -> ScorerSpec:
    return ScorerSpec(backend="hf", model=str(model), **{"prompt": "zero_shot", "prompt_tokens": 64, "max_new_tokens": 12, **settings})


def without_chat_template(model: Path, folder: Path) -> Path:
    """A copy of `model` whose tokenizer has no chat template (as a base model's folder)."""
    import json

    shutil.copytree(model, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def hf_scorer(sharded_policy):
    """One hf scorer for the module: `score` reads the prompt, order and reasoning from its spec at each call, so a test swaps it."""
    return HFScorer(spec(sharded_policy))


def test_the_label_is_read_after_the_answer_prefix_in_the_models_own_template(hf_scorer, sharded_policy):
    scorer = hf_scorer
    scorer.spec = spec(sharded_policy)
    rows = scorer.score(PAIRS, DAY).to_pylist()
    assert scorer.model_version.split("-")[1] == "zero_shot"
    for row in rows:
        assert [name for name, _ in row["label_probs"]] == ["Exact", "Partial", "Irrelevant"]
        assert sum(q for _, q in row["label_probs"]) == pytest.approx(1.0, abs=1e-6)
        assert row["reasoning"] is None and row["node_decisions"] == []
    zero_shot = scorer.spec.zero_shot()
    step = label_steps(scorer.tokenizer, pair_prompts(scorer.tokenizer, PAIRS[:1], 64, zero_shot), ["Label: "],
                       answer_format(scorer.graph, "label_first", zero_shot), scorer.labels)[0]
    context = scorer.tokenizer.decode(step.context)
    assert context.startswith("<s>[INST]") and "Query: gray velvet sofa\nProduct:\ntitle: Harper 3-seat sofa" in context
    assert context.endswith("[/INST]Label:")  # the answer prefix opens the assistant's turn; each label's first token follows


def test_with_reasoning_the_label_follows_the_generated_reasoning(hf_scorer, sharded_policy):
    config = ScoreConfig(date=DAY.isoformat(), model=str(sharded_policy), prompt="zero_shot", reasoning="all", max_new_tokens=12)
    assert (config.policy_format.order, config.policy_format.prompt_tokens) == ("reasoning_first", 256)
    scorer = hf_scorer
    scorer.spec = config.spec()
    rows = scorer.score(PAIRS, DAY).to_pylist()
    zero_shot = scorer.spec.zero_shot()
    prompts = pair_prompts(scorer.tokenizer, PAIRS, 256, zero_shot)
    assert "Split this problem into steps" in scorer.tokenizer.decode(prompts[0])
    answer = answer_format(scorer.graph, "reasoning_first", zero_shot)
    for row, prompt in zip(rows, prompts):
        assert row["reasoning"]  # the greedy reasoning, kept
        assert sum(q for _, q in row["label_probs"]) == pytest.approx(1.0, abs=1e-6)
        step = label_steps(scorer.tokenizer, [prompt], [label_prefix(row["reasoning"], answer)], answer, scorer.labels)[0]
        assert scorer.tokenizer.decode(step.context[len(prompt):]).endswith("\nLabel:")
    assert scorer_version(config.spec()) != scorer_version(spec(sharded_policy, prompt_tokens=256))  # label_first: another judge


def test_reasoning_with_a_label_first_judge_is_refused(sharded_policy):
    with pytest.raises(ConfigError, match="order=label_first: a zero-shot judge then answers with the label alone"):
        ScoreConfig(date=DAY.isoformat(), model=str(sharded_policy), prompt="zero_shot", reasoning="sample", order="label_first")


def test_a_folder_without_a_chat_template_is_refused_unless_one_is_given(sharded_policy, tmp_path):
    bare = without_chat_template(sharded_policy, tmp_path / "bare")
    with pytest.raises(ConfigError, match="chat_template: model folder .*bare has no chat template"):
        ScoreConfig(date=DAY.isoformat(), model=str(bare), prompt="zero_shot")
    template = tmp_path / "inst.jinja"
    template.write_text(INST_TEMPLATE)
    config = ScoreConfig(date=DAY.isoformat(), model=str(bare), prompt="zero_shot", chat_template=str(template), prompt_tokens=64)
    scorer = HFScorer(config.spec())
    prompt = scorer.tokenizer.decode(pair_prompts(scorer.tokenizer, PAIRS[:1], 64, scorer.spec.zero_shot())[0])
    assert prompt.startswith("<s>[INST] Given a query") and prompt.endswith("[/INST]")
    assert all(sum(q for _, q in row["label_probs"]) == pytest.approx(1.0, abs=1e-6) for row in scorer.score(PAIRS, DAY).to_pylist())
    template.write_text(INST_TEMPLATE.replace("[/INST]", " [/INST]"))
    assert scorer_version(config.spec()) != scorer.model_version  # another template: another judge


def test_an_edited_prompt_is_another_judge_and_a_comment_is_not(sharded_policy, tmp_path):
    original = scorer_version(spec(sharded_policy))
    commented = tmp_path / "commented.yaml"
    commented.write_text("# our team's copy\n" + BUNDLED.read_text())
    assert scorer_version(spec(sharded_policy, prompt=str(commented))) == original
    edited = tmp_path / "edited.yaml"
    edited.write_text(BUNDLED.read_text().replace("as a search quality rater does", "as a strict search quality rater does"))
    changed = scorer_version(spec(sharded_policy, prompt=str(edited)))
    assert changed != original and changed.startswith(original.split("-")[0] + "-zero_shot-")
    assert "as a strict search quality rater does" in spec(sharded_policy, prompt=str(edited)).zero_shot().messages(PROMPT_FIELDS)[0]["content"]
    assert scorer_version(ScorerSpec(backend="hf", model=str(sharded_policy))) not in (original, changed)


def test_the_messages_hold_the_label_definitions_the_pair_and_the_task(tmp_path):
    from schemas.graph import LabelSet, ReasoningGraph
    from schemas.judge_prompt import ZeroShot

    path = tmp_path / "with_system.yaml"
    path.write_text(BUNDLED.read_text().replace('system: ""', 'system: "You rate search results."'))
    labels, graph = LabelSet.load("esci"), ReasoningGraph.load("relevance7")
    fields = {"query": "cost $5 sofa", "title": "Sofa", "type": "", "attributes": "color=gray", "description": ""}
    system, user = ZeroShot(JudgePrompt.load(path), labels, graph, "label_first").messages(fields)
    assert system == {"role": "system", "content": "You rate search results."} and user["role"] == "user"
    assert "- C: complement: does not fulfil the query but goes with an exact item" in user["content"]
    assert "Query: cost $5 sofa\nProduct:\ntitle: Sofa\nattributes: color=gray\n" in user["content"]  # empty fields left out
    assert user["content"].endswith("Answer on one line: `Label:` followed by the one label that fits best (E, S, C, I), and nothing else.")
    (user,) = ZeroShot(JudgePrompt.load("zero_shot"), labels, graph, "product_first").messages(fields)
    steps = [line.split(":")[0] for line in user["content"].splitlines() if line.startswith("- ") and line[2:4] in graph.node_names]
    assert steps == ["- ps", "- pa", "- qs", "- qa", "- ms", "- ma"]  # the graph's nodes in the order asked for, the label last
    assert "- ms: subject match (one of: match, related, mismatch)" in user["content"]


@pytest.mark.parametrize(("text", "message"), [
    ("user: 'Query: $query'", "a prompt file holds exactly the keys"),
    (BUNDLED.read_text().replace("$product", "$item"), r"user: unknown placeholders \['item'\] / missing placeholders \['product'\]"),
    (BUNDLED.read_text().replace("name: zero_shot", "name: zero shot"), "name must be letters"),
    (BUNDLED.read_text().replace('answer_prefix: "Label: "', 'answer_prefix: "  "'), "answer_prefix must be one line of text"),
    (BUNDLED.read_text().replace("(brand, colour", "($brand, colour"), r"user: unknown placeholders \['brand'\]"),
])
def test_a_bad_prompt_file_is_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        JudgePrompt.load(path)


def test_the_cli_judges_a_pairs_file_zero_shot_and_refuses_a_trained_policy(sharded_policy, tmp_path, tiny_world, tiny_model):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("query,product_id\ngray sofa,p1\noak desk,p2\n")
    arguments = ["score", "--date", DAY.isoformat(), "--pairs", str(pairs), "--catalog", str(tiny_world), "--out", str(tmp_path / "scores"),
                 "--prompt", "zero_shot", "--set", "prompt_tokens=64"]
    result = CliRunner().invoke(app, [*arguments, "--model", str(sharded_policy)])
    assert result.exit_code == 0, result.output
    rows = read_table(RELEVANCE, tmp_path / "scores", days=[DAY])
    assert rows.num_rows == 2 and set(rows["model_version"].to_pylist()) == {scorer_version(spec(sharded_policy))}
    policy = Path(shutil.copytree(tiny_model, tmp_path / "policy"))
    PolicyFormat().save(policy)
    refused = CliRunner().invoke(app, [*arguments, "--model", str(policy)])
    assert refused.exit_code == 2 and "holds policy.json, a policy trained on its own prompt" in refused.output
