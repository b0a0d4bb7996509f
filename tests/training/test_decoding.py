"""The one generate loop: greedy and sampled decoding of left-padded batches on the tiny model."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from schemas.graph import ReasoningGraph
from training.cot import CheckedRules, CheckedVerdicts, checked_rules
from training.decoding import generate, left_padded

PROMPTS = [[1, 5, 6, 7], [1, 8, 9, 10, 11, 12, 13, 14], [1, 20]]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9


@pytest.fixture(scope="module")
def policy(tiny_model):
    from training.model import load_model

    return load_model(tiny_model)


def test_left_padding_by_hand():
    ids, attention = left_padded([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7]] and attention.tolist() == [[1, 1], [0, 1]]


def test_greedy_responses_stop_at_eos_and_keep_no_logprobs(policy):
    model, tokenizer = policy
    out = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2)
    assert out.logprobs is None and len(out.response_ids) == len(out.ended) == len(out.texts) == 3
    for ids, ended, text in zip(out.response_ids, out.ended, out.texts):
        assert ended == (tokenizer.eos_token_id in ids) and (not ended or ids[-1] == tokenizer.eos_token_id)
        assert text == tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=False)


def test_sampling_is_seeded_and_scores_each_drawn_token(policy):
    model, tokenizer = policy
    model.train()
    first = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2, sampling=Sampling(), seed=3)
    assert model.training  # the caller's mode comes back
    assert first == generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2, sampling=Sampling(), seed=3)
    assert [len(lps) for lps in first.logprobs] == [len(ids) for ids in first.response_ids]
    # each logprob is log_softmax(logits / T) of the drawn token after the prompt and the tokens before it
    model.eval()
    prompt, ids, logprobs = PROMPTS[1], first.response_ids[1], first.logprobs[1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + list(ids)])).logits[0, len(prompt) - 1 : -1].float()
    expected = torch.log_softmax(logits / Sampling.temperature, dim=-1).gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1)
    assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-4)
    with pytest.raises(ValueError, match="seed"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=2, batch_size=2, sampling=Sampling())


def test_greedy_rows_that_end_leave_the_batch_and_the_others_decode_as_generate_does(policy):
    """With an EOS that some rows reach early, the rest keep decoding from a smaller cache: the ids are still
    transformers' greedy ones, row by row."""
    from training.decoding import _decode_batch

    model, tokenizer = policy
    model.eval()
    ids, attention = left_padded(PROMPTS, tokenizer.pad_token_id)
    with torch.no_grad():
        reference = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=8, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=-1)[:, ids.shape[1]:].tolist()
        eos = reference[0][2]  # row 0 ends at its third token; the other rows end where they meet it, if they do
        expected = [row[: row.index(eos) + 1] if eos in row else row for row in reference]
        got, logprobs, _, _ = _decode_batch(model, ids, attention, 8, eos, None)
    assert got == expected and logprobs is None
    assert sum(len(row) < 8 for row in got) >= 1 and any(len(row) == 8 for row in got)


def test_top_p_draws_only_from_the_smallest_set_that_reaches_it_and_scores_the_unfiltered_distribution():
    from training.decoding import _draw

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])).repeat(500, 1)
    torch.manual_seed(0)
    tokens, logprobs = _draw(logits, Sampling(temperature=1.0, top_p=0.7))
    assert set(tokens[0::2].tolist()) == {0, 1} and set(tokens[1::2].tolist()) == {2, 1}
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1))
    greedy, _ = _draw(logits, Sampling(temperature=1.0, top_p=1e-6))
    assert greedy.tolist() == [0, 2] * 500


def test_sampled_rows_that_end_leave_the_batch_and_their_logprobs_stop_with_them(policy):
    model, tokenizer = policy
    out = generate(model, tokenizer, PROMPTS * 4, max_new_tokens=10, batch_size=12, sampling=Sampling(temperature=1.5, top_p=1.0), seed=1)
    for ids, ended, lps in zip(out.response_ids, out.ended, out.logprobs):
        assert len(lps) == len(ids) and (not ended or ids[-1] == tokenizer.eos_token_id) and all(lp <= 0 for lp in lps)


class Scripted:
    """A chooser that writes token 10 + the response's length, whatever the model says: greedy picks it, and sampling may
    draw nothing else."""

    def choose(self, responses, logits):
        return torch.tensor([10 + len(ids) for ids in responses])

    def refuse(self, responses, logits):
        return [[token for token in range(logits.shape[-1]) if token != 10 + len(ids)] for ids in responses]


def test_a_chooser_picks_each_greedy_token_and_what_sampling_may_draw(policy):
    model, tokenizer = policy
    out = generate(model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=2, chooser=Scripted())
    assert out.response_ids == ((10, 11, 12, 13, 14),) * 3
    drawn = generate(model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=2, sampling=Sampling(), seed=0, chooser=Scripted())
    assert drawn.response_ids == ((10, 11, 12, 13, 14),) * 3
    assert drawn.ruled == ((True,) * 5,) * 3 and out.ruled is None  # the rules chose every drawn token; greedy keeps no flags
    # the log-probability of a drawn token stays the unrestricted one, as a trainer recomputes it
    prompt, ids = PROMPTS[0], list(drawn.response_ids[0])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
    expected = torch.log_softmax(logits / Sampling.temperature, dim=-1).gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1)
    assert torch.allclose(torch.tensor(drawn.logprobs[0]), expected, atol=1e-4)


def test_checked_verdicts_replace_a_wrong_verdict_with_the_likeliest_right_one(policy):
    _, tokenizer = policy
    chooser = CheckedVerdicts(tokenizer, checked_rules(ReasoningGraph.load("relevance8")))
    responses = [tokenizer(text, add_special_tokens=False)["input_ids"]
                 for text in ("ps: bed\nac: color=red/blue:", "ps: bed\nac: color=red/red:", "ps: bed\nqs: ")]
    yes, no = (tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in ("y", "n"))
    logits = torch.zeros(3, len(tokenizer))
    logits[:, yes], logits[:, no] = 5.0, 3.0  # the policy would say yes to all three
    assert chooser.choose(responses, logits).tolist() == [no, yes, yes] and (chooser.replaced, chooser.unresolved) == (1, 0)
    assert chooser.pick(responses[0], logits[0]) == (no, [yes])  # what the vLLM logits processor masks
    assert chooser.refuse(responses, logits) == [[yes], [no], []]  # what a rollout may not draw
    logits[0] = float("-inf")
    logits[0, yes] = 5.0  # a grammar allows only the wrong verdict: it stays, counted
    assert chooser.pick(responses[0], logits[0]) == (yes, []) and chooser.unresolved == 1
    relevance7 = ReasoningGraph.load("relevance7")
    assert checked_rules(relevance7).checks is None and [rule.tag for rule in checked_rules(relevance7).equal_parents] == ["ms: "]
    unruled = replace(relevance7, nodes=tuple(replace(node, equal_parents=None) for node in relevance7.nodes))
    with pytest.raises(ValueError, match="nothing to check"):
        checked_rules(unruled)


def test_checked_decoding_writes_match_exactly_when_the_subjects_written_are_the_same(policy):
    _, tokenizer = policy
    rules = checked_rules(ReasoningGraph.load("relevance8"))
    assert CheckedRules.from_json(rules.to_json()) == rules  # what a vLLM request carries to the engine's logits processor
    chooser = CheckedVerdicts(tokenizer, rules)
    words = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in (" match", " related", " mismatch")]
    assert all(len(ids) == 1 for ids in words), "the world's tokenizer holds each decision, with its space, as one token"
    match, related, mismatch = (ids[0] for ids in words)
    responses = [tokenizer(text, add_special_tokens=False)["input_ids"]
                 for text in ("ps: sofa\npa: none\nqs: bed\nqa: none\nms:", "ps: bed\npa: none\nqs: bed\nqa: none\nms:", "ms:")]  # the last decides before any subject is written (label_first): nothing to check
    logits = torch.full((3, len(tokenizer)), float("-inf"))  # as a grammar leaves them: only the three decisions
    logits[:, match], logits[:, mismatch], logits[:, related] = 5.0, 4.0, 3.0
    assert chooser.choose(responses, logits).tolist() == [mismatch, match, match]
    logits[:, related] = 4.5
    assert chooser.choose(responses, logits).tolist() == [related, match, match]
    logits[1, match] = 0.0  # two equal subjects: neither mismatch nor related may be written
    assert chooser.refuse(responses, logits) == [[match], [related, mismatch], []]


@pytest.mark.parametrize(("text", "follows"), [
    ("qs: bed\nps: bed\nms: mat", True), ("qs: bed\nps: bed\nms: rel", False), ("qs: bed\nps: sofa\nms: mis", True),
    ("qs: bed\nps: sofa\nms: m", True), ("qs: bed\nps: sofa\nms: match", False), ("qs: bed\nps: sofa\nms: mismatch\nma", True),
    ("qs: bed\nps: bed\nms: match\n", True), ("qs: bed\nps: bed\nms: related\n", False), ("qs: bed\nms: match", True),
    ("qs: bed\nps: bed\nms: x", True), ("qs: bed\nps: sofa\nms: matches\n", True),  # no value: the format's to refuse
])
def test_a_subject_decision_is_judged_against_the_subjects_above_it(text, follows):
    rules = checked_rules(ReasoningGraph.load("relevance8"))
    assert rules.follows(text, text.index("ms: ")) is follows
