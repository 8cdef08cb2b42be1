"""llama.cpp as the real consumer of lowbit's GGUF files: find its command-line tools (built by
``scripts/peers/setup_llamacpp.sh``), run them, and compute perplexity the way
``llama-perplexity`` does so that the two can be compared on the same token ids.

``llama-perplexity`` cuts the token ids into consecutive chunks of ``n_ctx`` tokens and scores,
in each chunk, the tokens after position ``n_ctx / 2`` given everything before them in the
chunk; the perplexity is ``exp`` of the mean negative log-likelihood over all scored tokens.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError

TOOLS = ("llama-perplexity", "llama-completion", "llama-tokenize", "llama-quantize", "llama-imatrix")


def llama_cpp_bin() -> Path | None:
    """The folder of llama.cpp's tools: ``$LOWBIT_LLAMA_CPP_BIN``, else the newest build under
    ``$LOWBIT_CACHE/llama.cpp``; None when there is none."""
    from lowbit.models import cache_dir

    env = os.environ.get("LOWBIT_LLAMA_CPP_BIN")
    candidates = [Path(env)] if env else sorted((cache_dir() / "llama.cpp").glob("build-*/bin"), reverse=True)
    for c in candidates:
        if all((c / t).is_file() for t in TOOLS):
            return c
    return None


def run_tool(tool: str, *args: str, timeout: float = 1800, stdout_only: bool = False) -> str:
    """Run one llama.cpp tool; its stdout and stderr together (or stdout alone), or a LowbitError
    with their tail."""
    folder = llama_cpp_bin()
    if folder is None:
        raise LowbitError("llama.cpp's tools are not built: run scripts/peers/setup_llamacpp.sh")
    # Files, not pipes: with pipes llama.cpp's asynchronous logger sometimes lost its last lines
    # (the final perplexity estimate) at exit.
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        proc = subprocess.run([str(folder / tool), *args], stdout=fo, stderr=fe, timeout=timeout)
        fo.seek(0)
        fe.seek(0)
        stdout = fo.read().decode("utf-8", errors="replace")
        out = stdout + fe.read().decode("utf-8", errors="replace")
    if proc.returncode != 0:
        raise LowbitError(f"{tool} failed ({proc.returncode}): {out.strip().splitlines()[-1] if out.strip() else ''}")
    return stdout if stdout_only else out


def llama_cpp_perplexity(gguf: Path, text_file: Path, n_ctx: int, chunks: int, threads: int) -> float:
    """``llama-perplexity``'s estimate on the first ``chunks`` chunks of ``text_file``: its final
    line, or its running estimate after the last chunk (the same number). llama.cpp's
    asynchronous logger now and then loses its last lines at exit, so the run is repeated when
    neither made it out."""
    for _ in range(5):
        out = run_tool("llama-perplexity", "-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx), "-b", str(n_ctx),
                       "--chunks", str(chunks), "-t", str(threads))
        final = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
        if final is not None:
            return float(final.group(1))
        n = re.search(r"perplexity over (\d+) chunks", out)
        running = dict(re.findall(r"\[(\d+)\]([0-9.]+),", out))
        if n is not None and n.group(1) in running:
            return float(running[n.group(1)])
    raise LowbitError(f"llama-perplexity printed no estimate in 5 runs: {out.strip().splitlines()[-3:]}")


def llama_cpp_imatrix(gguf: Path, text_file: Path, out: Path, n_ctx: int, chunks: int, threads: int,
                      *extra: str) -> Path:
    """``llama-imatrix`` of ``gguf`` on the first ``chunks`` chunks of ``n_ctx`` tokens of
    ``text_file`` (``extra``: more of its options), written to ``out`` through a partial file
    renamed at the end (a stopped run leaves nothing at ``out``)."""
    partial = out.with_suffix(".partial.gguf")
    run_tool("llama-imatrix", "-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx), "--chunks", str(chunks),
             "-o", str(partial), "-t", str(threads), *extra)
    return partial.replace(out)


def llama_cpp_token_ids(gguf: Path, text_file: Path) -> list[int]:
    """How llama.cpp tokenizes ``text_file`` with the vocabulary in ``gguf`` (no BOS added)."""
    out = run_tool("llama-tokenize", "-m", str(gguf), "-f", str(text_file), "--ids", "--log-disable",
                   "--no-bos", "--no-parse-special")
    line = [ln for ln in out.splitlines() if ln.startswith("[")][-1]
    return [int(t) for t in line.strip("[]").split(",") if t.strip()]


def llama_cpp_generate(gguf: Path, prompt: str, n_tokens: int, threads: int) -> str:
    """Greedy continuation of ``prompt`` by ``llama-completion`` (the prompt included); run again
    when its logger lost the text at exit (see :func:`llama_cpp_perplexity`)."""
    text = ""
    for _ in range(5):
        text = run_tool("llama-completion", "-m", str(gguf), "-p", prompt, "-n", str(n_tokens), "--temp", "0",
                        "-no-cnv", "-t", str(threads), stdout_only=True)
        if text.strip():
            break
    return text


def perplexity_like_llama_cpp(model: nn.Module, ids: torch.Tensor, n_ctx: int, chunks: int, batch: int = 8) -> float:
    """``llama-perplexity``'s protocol on 1-D token ids ``ids`` with a transformers model."""
    n = min(chunks, ids.numel() // n_ctx)
    if n == 0:
        raise LowbitError(f"fewer than {n_ctx} tokens: no perplexity chunk")
    windows = ids[: n * n_ctx].view(n, n_ctx)
    first = n_ctx // 2
    # a batch's logits are batch x n_ctx x vocab floats: 2.5 GB for 8 windows of Qwen's 152k
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1
    batch = max(1, min(batch, (1 << 28) // (n_ctx * vocab)))
    nll, count = 0.0, 0
    with torch.no_grad():
        for part in windows.split(batch):
            logits = model(input_ids=part).logits
            for row, seq in zip(logits, part):  # float64 on the scored half only, one window at a time
                logp = torch.log_softmax(row[first:-1].to(torch.float64), dim=-1)
                target = seq[first + 1:]
                nll -= float(logp.gather(-1, target.unsqueeze(-1)).sum())
                count += target.numel()
            del logits
    return float(torch.exp(torch.tensor(nll / count)))


def kld_like_llama_cpp(model: nn.Module, ref: nn.Module, ids: torch.Tensor, n_ctx: int, chunks: int,
                       ) -> dict[str, float]:
    """``llama-perplexity --kl-divergence``'s protocol with transformers models: on the chunks of
    :func:`perplexity_like_llama_cpp`, over the scored second half of each, the mean
    ``KL(ref || model)``, the share of positions whose most likely token is the same, and the
    model's perplexity; float64 log-softmax of one chunk at a time."""
    n = min(chunks, ids.numel() // n_ctx)
    if n == 0:
        raise LowbitError(f"fewer than {n_ctx} tokens: no chunk")
    first = n_ctx // 2
    kl = nll = 0.0
    same = count = 0
    with torch.no_grad():
        for seq in ids[: n * n_ctx].view(n, n_ctx):
            lp = torch.log_softmax(model(input_ids=seq[None]).logits[0, first:-1].to(torch.float64), -1)
            lr = torch.log_softmax(ref(input_ids=seq[None]).logits[0, first:-1].to(torch.float64), -1)
            target = seq[first + 1:]
            kl += float((lr.exp() * (lr - lp)).sum())
            nll -= float(lp.gather(-1, target.unsqueeze(-1)).sum())
            same += int((lp.argmax(-1) == lr.argmax(-1)).sum())
            count += target.numel()
    return {"kld": kl / count, "top1": same / count, "ppl": float(torch.exp(torch.tensor(nll / count))), "tokens": count}


def llama_cpp_kld(gguf: Path, text_file: Path, n_ctx: int, chunks: int, threads: int, base: Path,
                  cache_k: str = "f16", cache_v: str = "f16") -> dict[str, float]:
    """``llama-perplexity`` with the KV cache types ``cache_k`` / ``cache_v`` (``-ctk`` / ``-ctv``,
    flash attention on, as a quantized value cache needs): with ``base`` missing it saves its logits
    there (``--kl-divergence-base``) and returns its perplexity; else its mean KLD against ``base``,
    same-top-token share and perplexity (``--kl-divergence``)."""
    args = ["-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx), "-b", str(n_ctx), "--chunks", str(chunks),
            "-t", str(threads), "-fa", "on", "-ctk", cache_k, "-ctv", cache_v, "--kl-divergence-base", str(base)]
    if not base.is_file():
        out = run_tool("llama-perplexity", *args)
        ppl = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
        return {"ppl": float(ppl.group(1)) if ppl else float("nan")}
    out = run_tool("llama-perplexity", *args, "--kl-divergence")
    def grab(pattern: str) -> float:
        m = re.search(pattern, out)
        if m is None:
            raise LowbitError(f"llama-perplexity printed no {pattern!r}: {out.strip().splitlines()[-3:]}")
        return float(m.group(1))
    return {"kld": grab(r"Mean\s+KLD:\s+([-0-9.e]+)"), "top1": grab(r"Same top p:\s+([0-9.]+)") / 100,
            "ppl": grab(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)")}
