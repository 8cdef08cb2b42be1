"""HumanEval: program assembly, pass@k, stop sequences, batched generation, canonical likelihood."""

from __future__ import annotations

import argparse
import math
from fractions import Fraction

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.evaluation.humaneval import (
    CHAT_REQUEST,
    N_PROBLEMS,
    STOP_SEQUENCES,
    _encode,
    _first_stop,
    chat_program,
    chat_prompt_ids,
    check_program,
    extract_code,
    generate_completions,
    load_problems,
    pass_at_k,
    run_humaneval,
    solution_scores,
    truncate_at_stop,
)
from lowbit.evaluation.humaneval_cli import add_humaneval_args, format_humaneval, validate_humaneval_args
from lowbit.evaluation.sandbox import run_programs
from conftest import build_tiny_model, make_byte_level_tokenizer


@pytest.fixture(scope="module")
def problems():  # type: ignore[no-untyped-def]
    return load_problems()


@pytest.fixture(scope="module")
def byte_tokenizer():  # type: ignore[no-untyped-def]
    return make_byte_level_tokenizer()


def _tiny(seed: int = 0) -> torch.nn.Module:
    # float64 so that padding-free and padded forwards agree far beyond any argmax tie
    return build_tiny_model("llama", seed=seed, vocab_size=260).double()


def test_load_problems(problems) -> None:  # type: ignore[no-untyped-def]
    assert len(problems) == N_PROBLEMS
    assert problems[0].task_id == "HumanEval/0" and problems[-1].task_id == "HumanEval/163"
    assert [p.task_id for p in load_problems(3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    with pytest.raises(LowbitError, match="1..164"):
        load_problems(165)


def test_every_canonical_solution_passes_in_the_sandbox(problems) -> None:  # type: ignore[no-untyped-def]
    results = run_programs([check_program(p, p.canonical_solution) for p in problems], workers=2)
    failed = [(p.task_id, r.status, r.detail) for p, r in zip(problems, results) if not r.passed]
    assert failed == []


def test_empty_and_wrong_completions_fail(problems) -> None:  # type: ignore[no-untyped-def]
    p = problems[0]  # has_close_elements
    wrong = "    return False\n"
    results = run_programs([check_program(p, ""), check_program(p, wrong), check_program(p, "    return (\n")])
    assert [r.status for r in results] == ["failed", "failed", "failed"]
    assert results[1].detail.startswith("AssertionError")


def test_chat_programs(problems) -> None:  # type: ignore[no-untyped-def]
    p0, p10 = problems[0], problems[10]  # HumanEval/10 needs the prompt's helper is_palindrome
    whole = lambda p: p.prompt + p.canonical_solution  # noqa: E731
    helper_free = "def make_palindrome(string: str) -> str:\n" + p10.canonical_solution
    reply = f"Sure!\n```python\n{whole(p0)}```\nThis works because..."
    code = extract_code(reply)
    assert code == whole(p0)
    programs = [chat_program(p0, code), chat_program(p0, p0.canonical_solution), chat_program(p10, helper_free),
                chat_program(p0, "def has_close_elements(numbers, threshold):\n    return True\n")]
    assert [r.passed for r in run_programs(programs)] == [True, True, True, False]
    assert extract_code("```\nx = 1\n```\n```python\ny = 2\n```") == "y = 2\n"
    assert extract_code("text\n```python\ndef f():\n    return 1") == "def f():\n    return 1"


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (10, 3, 5), (20, 0, 10), (20, 11, 10),
                                   (100, 37, 10), (200, 5, 100), (200, 199, 100)])
def test_pass_at_k_matches_exact_combinatorics(n: int, c: int, k: int) -> None:
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_pass_at_k_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 10)


def test_stop_sequences_truncate_at_the_first() -> None:
    text = "    return x\n\nprint(f(1))\ndef g():\n"
    assert truncate_at_stop(text) == "    return x\n"
    assert truncate_at_stop("    # keep\n    return 1\n# comment\nclass A:") == "    # keep\n    return 1"
    assert truncate_at_stop("    if x:\n        return 1\n") == "    if x:\n        return 1\n"  # indented: not a stop
    assert truncate_at_stop("    return 1\nif __name__ == '__main__':") == "    return 1"
    assert set(STOP_SEQUENCES) == {"\nclass", "\ndef", "\n#", "\nif", "\nprint"}


def _greedy_one(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                         max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=1)
    return out[0, len(ids):].tolist()


def test_batched_greedy_equals_unbatched_generate(problems, byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = _tiny()
    prompts = [_encode(byte_tokenizer, p.prompt[-n:]) for p, n in zip(problems[:5], (10, 70, 25, 45, 5))]
    stop_chars = ("F", "S")  # this random model writes them at different steps in different rows

    def stop_at(text: str) -> int | None:
        return _first_stop(text, stop_chars)

    texts, n_tokens = generate_completions(model, byte_tokenizer, prompts, stop_at=stop_at, max_new_tokens=24,
                                           batch_size=3)
    expected, stopped = [], 0
    for ids in prompts:
        full = byte_tokenizer.decode(_greedy_one(model, ids, 24), skip_special_tokens=True)
        cut = stop_at(full)
        stopped += cut is not None
        expected.append(full if cut is None else full[:cut])
    assert texts == expected
    assert stopped >= 3 and n_tokens < 5 * 24  # rows really stopped early, not all at once


def _record_prefills(model):  # type: ignore[no-untyped-def]
    """Wrap ``model.forward``: a list that gets, per call, (prompt tokens in the call if it is a
    prefill else None, rows in the call)."""
    calls: list[tuple[int | None, int]] = []
    original = model.forward

    def forward(*a, **k):  # type: ignore[no-untyped-def]
        ids = k["input_ids"]
        calls.append((int(k["attention_mask"].sum()) if ids.shape[1] > 1 else None, ids.shape[0]))
        return original(*a, **k)

    model.forward = forward
    return calls


def test_length_hints_order_admission_not_outputs(problems, byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = _tiny()
    prompts = [_encode(byte_tokenizer, p.prompt[-n:]) for p, n in zip(problems[:4], (10, 70, 25, 45))]
    kw = dict(stop_at=lambda t: None, max_new_tokens=8, batch_size=2)
    calls = _record_prefills(model)
    texts, _ = generate_completions(model, byte_tokenizer, prompts, length_hints=[1, 9, 8, 2], **kw)
    prefills = [n for n, _ in calls if n is not None]
    assert prefills == [70 + 25, 10 + 45]  # the two rows hinted longest enter first, the others when they stop
    assert max(rows for _, rows in calls) == 2
    expected = [byte_tokenizer.decode(_greedy_one(_tiny(), ids, 8), skip_special_tokens=True) for ids in prompts]
    assert texts == expected
    with pytest.raises(ValueError, match="3 length hints for 4 prompts"):
        generate_completions(model, byte_tokenizer, prompts, length_hints=[1, 2, 3], **kw)


def test_a_stopped_row_hands_its_slot_to_the_next_prompt(problems, byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = _tiny()
    prompts = [_encode(byte_tokenizer, p.prompt[-n:]) for p, n in zip(problems[:6], (30, 12, 50, 7, 22, 40))]
    stop_chars = ("F", "S")
    calls = _record_prefills(model)
    texts, n_tokens = generate_completions(model, byte_tokenizer, prompts, max_new_tokens=30, batch_size=2,
                                           stop_at=lambda t: _first_stop(t, stop_chars))
    steps = [rows for n, rows in calls if n is None]
    # every decode step computes only rows still generating: the steps hold exactly the tokens generated
    # after each row's first (which its prefill gives)
    assert sum(steps) == n_tokens - len(prompts)
    assert max(steps) == 2 and sum(n is not None for n, _ in calls) > 2  # prompts joined a running batch
    expected = []
    for ids in prompts:
        full = byte_tokenizer.decode(_greedy_one(_tiny(), ids, 30), skip_special_tokens=True)
        cut = _first_stop(full, stop_chars)
        expected.append(full if cut is None else full[:cut])
    assert texts == expected


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "opt", "gemma", "gemma2"])
def test_every_family_completes_as_unbatched_generate(family, problems, byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from lowbit.evaluation.continuous_batching import supports_continuous_batching

    model = build_tiny_model(family, vocab_size=260).double()
    assert supports_continuous_batching(model) == (family != "gemma2")  # gemma2's sliding layers: generate's batches
    prompts = [_encode(byte_tokenizer, p.prompt[-n:]) for p, n in zip(problems[10:15], (33, 9, 61, 20, 47))]
    texts, _ = generate_completions(model, byte_tokenizer, prompts, stop_at=lambda t: _first_stop(t, ("e", "t")),
                                    max_new_tokens=12, batch_size=2)
    expected = []
    for ids in prompts:
        full = byte_tokenizer.decode(_greedy_one(model, ids, 12), skip_special_tokens=True)
        cut = _first_stop(full, ("e", "t"))
        expected.append(full if cut is None else full[:cut])
    assert texts == expected


def test_generation_without_stops_equals_generate(problems, byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = _tiny(seed=3)
    prompts = [_encode(byte_tokenizer, p.prompt[-n:]) for p, n in zip(problems[5:9], (40, 8, 90, 20))]
    texts, n_tokens = generate_completions(model, byte_tokenizer, prompts, stop_at=lambda t: None, max_new_tokens=16,
                                           batch_size=4)
    expected = [byte_tokenizer.decode(_greedy_one(model, ids, 16), skip_special_tokens=True) for ids in prompts]
    assert texts == expected and n_tokens == 4 * 16


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(problems, byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = _tiny()
    prompts = [_encode(byte_tokenizer, problems[0].prompt[-30:])] * 4
    kw = dict(stop_at=lambda t: None, max_new_tokens=12, batch_size=4, temperature=1.0)
    state = torch.get_rng_state()
    a, _ = generate_completions(model, byte_tokenizer, prompts, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = generate_completions(model, byte_tokenizer, prompts, seed=7, **kw)
    c, _ = generate_completions(model, byte_tokenizer, prompts, seed=8, **kw)
    assert a == b and a != c
    assert len(set(a)) > 1  # the four samples of one prompt differ


def _direct_scores(model, ref, tokenizer, problem):  # type: ignore[no-untyped-def]
    """Float64 log-likelihood sum and KL sum of the solution tokens, computed from scratch."""
    prompt = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
    solution = tokenizer(problem.canonical_solution, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + solution])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].double(), -1)
        rlp = torch.log_softmax(ref(ids).logits[0].double(), -1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(solution) - 1)
    target = torch.tensor(solution)
    loglik = float(lp[pos, target].sum())
    kld = float((rlp[pos].exp() * (rlp[pos] - lp[pos])).sum())
    return loglik, kld, len(solution)


def test_canonical_loglik_and_kld_match_a_direct_computation(problems, byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, ref = _tiny(seed=0), _tiny(seed=1)
    got = solution_scores(model, byte_tokenizer, problems[:3], ref)
    for (ll, kl, n), p in zip(got, problems[:3]):
        want_ll, want_kl, want_n = _direct_scores(model, ref, byte_tokenizer, p)
        assert n == want_n > 0
        assert ll == pytest.approx(want_ll, rel=1e-6)
        assert kl == pytest.approx(want_kl, rel=1e-5) and kl > 0.1 * n  # different seeds: clearly non-zero
    same = solution_scores(model, byte_tokenizer, problems[:3], model)
    assert all(kl == 0.0 for _, kl, _ in same)


def test_solution_tokens_are_tokenized_separately(problems, byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    # " t" is one token of this tokenizer: tokenized together, "x = " + "t = 1" would merge the
    # prompt's last space with the solution's first letter and blur the boundary
    p = problems[0]
    p = type(p)(p.task_id, "x = ", "t = 1\n", p.test, p.entry_point)
    alone = _encode(byte_tokenizer, p.canonical_solution)
    assert len(_encode(byte_tokenizer, p.prompt + p.canonical_solution)) < len(_encode(byte_tokenizer, p.prompt)) + len(alone)
    model = _tiny()
    (ll, _, n), = solution_scores(model, byte_tokenizer, [p])
    assert n == len(alone)
    ids = torch.tensor([_encode(byte_tokenizer, p.prompt) + alone])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, -n - 1:-1].double(), -1)
    assert ll == pytest.approx(float(lp[torch.arange(n), torch.tensor(alone)].sum()), rel=1e-6)


def test_run_humaneval_end_to_end_on_a_tiny_model(byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = _tiny()
    out = run_humaneval(model, byte_tokenizer, ref=model, limit=2, max_new_tokens=6, progress=False).to_dict()
    assert out["task"] == "humaneval" and out["problems"] == 2 and out["samples"] == 1
    assert out["pass@1"] == 0.0 and out["passed"] == 0 and "pass@k" not in out  # random weights write no code
    assert out["kld"] == 0.0 and out["loglik"] < 0
    assert 0 < out["generated_tokens"] <= 2 * 6
    assert [p["task_id"] for p in out["per_problem"]] == ["HumanEval/0", "HumanEval/1"]
    assert all(p["passed"] is False and p["status"] == "failed" for p in out["per_problem"])
    total = sum(p["loglik"] * n for p, n in zip(out["per_problem"], [
        len(_encode(byte_tokenizer, q.canonical_solution)) for q in load_problems(2)]))
    assert out["loglik"] == pytest.approx(total / out["solution_tokens"])  # a mean over tokens
    text = format_humaneval(out)
    assert "pass@1" in text and "failed 2" in text


def test_run_humaneval_with_samples(byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    out = run_humaneval(_tiny(), byte_tokenizer, limit=1, samples=3, temperature=1.0, max_new_tokens=4,
                        progress=False).to_dict()
    assert out["samples"] == 3 and set(out["pass@k"]) == {"pass@1"} and out["kld"] is None
    (p,) = out["per_problem"]
    assert p["passed"] == 0 and len(p["status"]) == 3 and len(p["completion"]) == 3


def test_chat_needs_a_template(char_tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LowbitError, match="chat template"):
        run_humaneval(build_tiny_model("llama"), char_tokenizer, limit=1, chat=True, progress=False)


def test_chat_prompt_uses_the_template(problems) -> None:  # type: ignore[no-untyped-def]
    tok = make_byte_level_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"
    text = tok.decode(chat_prompt_ids(tok, problems[0]))
    assert text == f"[user]{CHAT_REQUEST}\n\n```python\n{problems[0].prompt}```[assistant]"
    out = run_humaneval(_tiny(), tok, limit=1, chat=True, max_new_tokens=4, progress=False).to_dict()
    assert out["chat"] is True and out["per_problem"][0]["status"] == "failed"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_humaneval_args(parser)
    return parser.parse_args(list(argv))


def test_cli_defaults_and_bad_input() -> None:
    args = _args()
    assert (args.task, args.limit, args.samples, args.temperature, args.chat) == ("ppl", None, 1, 0.0, False)
    assert (args.max_new_tokens, args.batch_size, args.timeout) == (384, 16, 10.0)
    validate_humaneval_args(_args("--task", "humaneval", "--samples", "10", "--temperature", "0.8"))
    for argv, message in [
        (("--samples", "0"), "--samples must be at least 1"),
        (("--samples", "5"), "needs --temperature > 0"),
        (("--limit", "165"), "1..164"),
        (("--limit", "0"), "1..164"),
        (("--temperature", "-1"), "--temperature must be"),
        (("--max-new-tokens", "0"), "--max-new-tokens"),
        (("--batch-size", "0"), "--batch-size"),
        (("--timeout", "0"), "--timeout"),
    ]:
        with pytest.raises(LowbitError, match=message) as e:
            validate_humaneval_args(_args("--task", "humaneval", *argv))
        assert "\n" not in str(e.value)


def test_cli_args_fit_lowbit_eval() -> None:
    # `lowbit eval` has a --limit of its own (lm-eval's): HumanEval shares it instead of clashing
    from lowbit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
    if not any("--task" in a.option_strings for a in sub._actions):  # not wired into cli.py yet
        add_humaneval_args(sub)
    args = parser.parse_args(["eval", "m", "--task", "humaneval", "--limit", "3", "--chat", "--timeout", "2"])
    assert (args.task, args.limit, args.chat, args.timeout, args.samples) == ("humaneval", 3, True, 2.0, 1)
    validate_humaneval_args(args)
