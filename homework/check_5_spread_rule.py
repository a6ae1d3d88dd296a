"""Check exercise 5 (homework/spread_rule.py): python -m pytest homework/check_5_spread_rule.py

No reference implementation here: the checks test the properties that define the rule, on FastV's
scores (the last token's attention, mean over heads, the image columns), for several R, image counts
and batches.
"""

import pytest
import torch

import minifastv.model as M

from checking import exercise, require, tiny  # noqa: F401  (tiny: a pytest fixture)

row_balanced_rule = exercise("spread_rule.py", "row_balanced_rule")

CASES = [  # (r, images per prompt, batch size): 6 x 6 grids, so 6 rows per image
    (0.5, 1, 1),  # 18 kept: 3 per row
    (0.75, 1, 1),  # 9 kept: 1 per row, 3 extra
    (0.9, 1, 2),  # 4 kept: fewer than the rows, all extra
    (0.5, 2, 2),  # 36 kept over 12 rows: 3 per row
    (0.6, 2, 1),  # 29 kept over 12 rows: 2 per row, 5 extra
]


def run(tiny, num_images, batch_size, r):
    """(the rule's choice, FastV's scores (B, N), num_keep), with the rule run inside FastV."""
    ids, mask, pixels = tiny.case(num_images, batch_size)
    captured = {}

    def spy(inputs):
        captured["scores"] = inputs.last_token_attention.mean(dim=1).gather(
            1, inputs.image_positions
        )
        captured["num_keep"] = inputs.num_keep
        return row_balanced_rule(inputs)

    fastv = M.FastV(2, r, rule=spy)
    cache = tiny.ours.new_cache(ids, fastv)  # after the prefill, it knows which tokens were kept
    with torch.no_grad():
        tiny.ours(ids, pixels, attention_mask=mask, cache=cache, fastv=fastv,
                  last_logits_only=True)
    return cache.kept_image_tokens, captured["scores"], captured["num_keep"]


def patches(count):
    return f"{count} patch" if count == 1 else f"{count} patches"


def where(prompt, row, grid_size):
    """'row 3 of image 2 (prompt 0)': rows counted over a prompt's images, from the top."""
    return f"row {row % grid_size + 1} of image {row // grid_size + 1} (prompt {prompt})"


def kept_grid(kept, num_image_tokens, grid_size):
    """(B, rows, grid_size) booleans: which patches were kept, row by row."""
    grid = torch.zeros(kept.shape[0], num_image_tokens, dtype=torch.bool)
    grid.scatter_(1, kept, True)
    return grid.view(kept.shape[0], -1, grid_size)


@pytest.mark.parametrize("r, num_images, batch_size", CASES)
def test_every_row_keeps_its_share(tiny, r, num_images, batch_size):
    kept, scores, num_keep = run(tiny, num_images, batch_size, r)
    grid = kept_grid(kept, scores.shape[1], tiny.grid_size)
    per_row = num_keep // grid.shape[1]
    counts = grid.sum(dim=-1)  # (B, rows)
    short = (counts < per_row).nonzero()
    if len(short):
        prompt, row = short[0].tolist()
        pytest.fail(f"R={r}: {where(prompt, row, tiny.grid_size)} keeps "
                    f"{patches(int(counts[prompt, row]))}; with {num_keep} to keep over "
                    f"{counts.shape[1]} rows, every row should keep at least {per_row}",
                    pytrace=False)


@pytest.mark.parametrize("r, num_images, batch_size", CASES)
def test_each_row_keeps_its_best_patches(tiny, r, num_images, batch_size):
    kept, scores, _ = run(tiny, num_images, batch_size, r)
    grid = kept_grid(kept, scores.shape[1], tiny.grid_size)
    by_row = scores.view(grid.shape)
    worst_kept = by_row.masked_fill(~grid, float("inf")).min(dim=-1).values  # (B, rows)
    best_dropped = by_row.masked_fill(grid, float("-inf")).max(dim=-1).values
    worse = (worst_kept < best_dropped).nonzero()
    if len(worse):
        prompt, row = worse[0].tolist()
        pytest.fail(f"R={r}: {where(prompt, row, tiny.grid_size)} keeps a patch and drops a "
                    f"better-scored one of the same row (on {len(worse)} rows in all): a row "
                    f"keeps its best patches", pytrace=False)


@pytest.mark.parametrize("r, num_images, batch_size", CASES)
def test_extra_patches_are_the_best_of_the_rest(tiny, r, num_images, batch_size):
    kept, scores, num_keep = run(tiny, num_images, batch_size, r)
    grid = kept_grid(kept, scores.shape[1], tiny.grid_size)
    by_row = scores.view(grid.shape)
    per_row = num_keep // grid.shape[1]
    # Each row's per_row best are guaranteed; the others kept are the extras.
    rank_in_row = by_row.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = the row's best
    extra = grid & (rank_in_row >= per_row)
    short = int((grid.sum(dim=-1) < per_row).sum())
    require(not short, f"R={r}: {short} rows keep fewer than their share of {patches(per_row)} "
                       f"(see test_every_row_keeps_its_share), so there are no extras to check")
    for prompt in range(batch_size):
        if extra[prompt].any() and not grid[prompt].all():
            worst_extra, best_dropped = (by_row[prompt][extra[prompt]].min(),
                                         by_row[prompt][~grid[prompt]].max())
            require(worst_extra >= best_dropped,
                    f"R={r}, prompt {prompt}: one of the {int(extra[prompt].sum())} extra "
                    f"patches (kept beyond its row's share of {per_row}) scores lower than a "
                    f"patch you drop: the extras are the best-scored patches left over, wherever "
                    f"they are")


def test_spreads_more_than_fastv(tiny):
    """FastV alone leaves some row with fewer than its share (the tiny model's last token has
    favourites)."""
    kept, scores, num_keep = run(tiny, 1, 1, 0.5)
    fastv = scores.topk(num_keep, dim=-1).indices
    rows = tiny.tokens_per_image // tiny.grid_size
    fastv_counts = kept_grid(fastv, scores.shape[1], tiny.grid_size).sum(-1)
    # the premise of the exercise holds on this model
    assert int(fastv_counts.min()) < num_keep // rows
    counts = kept_grid(kept, scores.shape[1], tiny.grid_size).sum(-1)[0]
    uneven = (counts != num_keep // rows).nonzero()[:, 0].tolist()
    if uneven:
        pytest.fail(f"FastV's own choice here leaves row {int(fastv_counts.argmin()) + 1} with "
                    f"{patches(int(fastv_counts.min()))}; yours keeps {int(counts[uneven[0]])} in "
                    f"row {uneven[0] + 1}, where every row should keep {num_keep // rows} "
                    f"({num_keep} over {rows} rows, none left over)", pytrace=False)
