"""Every scaling transform is an exact equivalence of the unquantized model, on every architecture
in the table: folding leaves the logits unchanged to float tolerance."""

from __future__ import annotations

import pytest
import torch

from lowbit.models import architecture_of
from lowbit.pipeline.passes import capture_block_inputs, run_block
from lowbit.pipeline.plan import plan_block
from lowbit.pipeline.sequential import apply_transforms
from lowbit.recipes import Recipe

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "opt", "opt-post-ln",
            "mixtral", "qwen3_moe", "olmoe"]
TRANSFORMS = {
    "awq": [{"name": "awq", "grid": 8}],
    "smoothquant": [{"name": "smoothquant"}],
    "smoothquant-searched": [{"name": "smoothquant", "alpha": None, "alpha_grid": 4, "rows": 64}],
    "smoothquant then awq": ["smoothquant", {"name": "awq", "grid": 4}],
}


def transform_all_blocks(model: torch.nn.Module, recipe: Recipe, tokens: torch.Tensor) -> int:
    """Apply ``recipe``'s transforms to every block, block after block on the transformed
    model's own outputs; returns how many linears' weights they changed."""
    arch = architecture_of(model)
    blocks = arch.block_list(model)
    inputs = capture_block_inputs(model, blocks[0], tokens, 2, torch.float32)
    changed = 0
    for i, block in enumerate(blocks):
        plan = plan_block(block, f"{arch.blocks}.{i}", arch, recipe)
        before = {n: p.detach().clone() for n, p in block.named_parameters()}
        apply_transforms(block, plan, arch, inputs, torch.float32)
        changed += sum(not torch.equal(before[n], p) for n, p in block.named_parameters() if n.endswith("weight"))
        inputs = run_block(block, inputs, torch.float32)
    return changed


@pytest.mark.parametrize("transforms", sorted(TRANSFORMS))
@pytest.mark.parametrize("family", FAMILIES)
def test_folding_leaves_the_unquantized_model_unchanged(tiny_model, family: str, transforms: str) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    tokens = torch.randint(2, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=tokens, use_cache=False).logits
    recipe = Recipe.from_dict({"codec": {"name": "int", "bits": 4, "group_size": 16}, "algorithm": {"name": "rtn"},
                               "transforms": TRANSFORMS[transforms]})
    with torch.no_grad():
        changed = transform_all_blocks(model, recipe, tokens)
        after = model(input_ids=tokens, use_cache=False).logits
    # something was folded: a norm and its linears, or a linear and its successor (post-LN OPT has
    # no norm before its linears, but v_proj -> out_proj and fc1 -> fc2 still fold)
    assert changed >= 2, changed
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
