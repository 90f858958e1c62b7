"""Unit tests of tandem.sampling: the batched logits filters against hand-computed expectations,
the empirical distribution of `sample` against the renormalized target distribution (chi-square
with a hard-coded critical value, so no scipy), seeding, and greedy rows inside sampling batches.

Everything is seeded, so a failure here is reproducible, never flaky.
"""
from __future__ import annotations

import math

import pytest
import torch

from tandem.plugins import PluginManager
from tandem.plugins.samplers import (apply_min_p, apply_repetition_penalty, apply_temperature, apply_top_k,
                                     apply_top_p)
from tandem.sampling import LogitsProcessor, SamplingBatch, make_generator
from tandem.sampling_params import SamplingParams

# The built-in processors only; a vocabulary larger than any test row, so top_k is never "all".
PIPELINE = PluginManager(entry_points=False).sampler_pipeline(vocab_size=1 << 20)


def process_logits(logits, params, histories):
    out, failures = PIPELINE.process(logits, SamplingBatch(params, histories))
    assert not failures
    return out


def sample(logits, params, generators, histories):
    return PIPELINE.sample(logits, SamplingBatch(params, histories, (), generators)).tokens

NEG_INF = float("-inf")


def rows(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def kept(logits: torch.Tensor) -> list[list[int]]:
    """Indices of the tokens a filter left in, per row (sorted)."""
    return [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in logits]


# -- apply_repetition_penalty ------------------------------------------------------------------

def test_repetition_penalty_divides_positive_multiplies_negative_and_leaves_unseen_alone():
    logits = rows([2.0, -2.0, 1.0, -1.0, 0.0, 3.0])
    out = apply_repetition_penalty(logits, [[0, 1, 4, 0, 1]], rows(2.0))  # duplicates count once
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.0, 3.0]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, -1.0, 0.0, 3.0]]  # input not modified


def test_repetition_penalty_below_one_boosts_seen_tokens():
    out = apply_repetition_penalty(rows([2.0, -2.0, 1.0]), [[0, 1]], rows(0.5))
    assert out.tolist() == [[4.0, -1.0, 1.0]]


def test_repetition_penalty_is_per_row():
    logits = rows([4.0, -4.0, 1.0], [4.0, -4.0, 1.0], [4.0, -4.0, 1.0])
    out = apply_repetition_penalty(logits, [[0, 1], [0, 1], []], rows(2.0, 1.0, 4.0))
    assert out.tolist() == [[2.0, -8.0, 1.0],   # penalized
                            [4.0, -4.0, 1.0],   # penalty 1 = off
                            [4.0, -4.0, 1.0]]   # nothing seen


# -- apply_temperature -------------------------------------------------------------------------

def test_temperature_divides_each_row_and_leaves_greedy_rows_alone():
    logits = rows([2.0, -1.0, 0.5], [2.0, -1.0, 0.5], [2.0, -1.0, 0.5])
    out = apply_temperature(logits, rows(0.5, 2.0, 0.0))
    assert out.tolist() == [[4.0, -2.0, 1.0], [1.0, -0.5, 0.25], [2.0, -1.0, 0.5]]


# -- apply_top_k -------------------------------------------------------------------------------

def test_top_k_per_row_in_one_batch():
    base = [0.5, 3.0, -1.0, 2.0, 1.0, 0.0]  # ranking: 1, 3, 4, 0, 5, 2
    logits = rows(base, base, base, base)
    out = apply_top_k(logits, torch.tensor([2, 0, 1, 5]))
    assert kept(out) == [[1, 3], [0, 1, 2, 3, 4, 5], [1], [0, 1, 3, 4, 5]]
    # kept values are untouched
    assert out[0, 1].item() == 3.0 and out[0, 3].item() == 2.0


def test_top_k_larger_than_vocab_keeps_everything():
    logits = rows([0.5, 3.0, -1.0, 2.0, 1.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    out = apply_top_k(logits, torch.tensor([10, 6]))
    assert torch.equal(out, logits)


def test_top_k_keeps_ties_at_the_kth_value():
    logits = rows([3.0, 1.0, 2.0, 2.0, 0.0, 2.0])
    assert kept(apply_top_k(logits, torch.tensor([2]))) == [[0, 2, 3, 5]]
    assert kept(apply_top_k(logits, torch.tensor([1]))) == [[0]]


# -- apply_top_p -------------------------------------------------------------------------------

# Probabilities 0.4, 0.3, 0.15, 0.1, 0.04, 0.01 placed at shuffled positions so the sort matters.
TOP_P_PROBS = [0.1, 0.01, 0.4, 0.15, 0.04, 0.3]
TOP_P_LOGITS = [math.log(p) for p in TOP_P_PROBS]


def test_top_p_keeps_smallest_set_reaching_p_per_row():
    logits = rows(*[TOP_P_LOGITS] * 5)
    out = apply_top_p(logits, rows(0.5, 0.8, 0.9, 0.97, 1.0))
    assert kept(out) == [
        [2, 5],              # 0.4 + 0.3 = 0.7 reaches 0.5
        [2, 3, 5],           # + 0.15 = 0.85 reaches 0.8 (0.7 does not)
        [0, 2, 3, 5],        # + 0.1 = 0.95 reaches 0.9
        [0, 2, 3, 4, 5],     # + 0.04 = 0.99 reaches 0.97
        [0, 1, 2, 3, 4, 5],  # p = 1: off
    ]
    assert out[1, 2].item() == logits[1, 2].item()  # kept values untouched


def test_top_p_always_keeps_the_most_likely_token():
    logits = rows(TOP_P_LOGITS, [5.0, 5.0 - 1e-3, 0.0, 0.0, 0.0, 0.0])
    assert kept(apply_top_p(logits, rows(1e-6, 1e-9))) == [[2], [0]]


def test_top_p_exact_mass_boundary_with_ties():
    # four equal tokens: two of them reach exactly 0.5 (exact in binary), so exactly two stay
    out = apply_top_p(rows([1.0, 1.0, 1.0, 1.0]), rows(0.5))
    assert len(kept(out)[0]) == 2


def test_top_p_off_row_is_not_filtered_by_batch_mates():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 49152, generator=gen) * 3
    logits[0, 0] = 30.0  # a confident model: the cumulative mass saturates in fp32
    alone = process_logits(logits, [SamplingParams(top_p=1.0)], [[]])
    batched = process_logits(torch.cat([logits, logits]), [SamplingParams(top_p=1.0), SamplingParams(top_p=0.5)],
                             [[], []])
    assert torch.isfinite(alone).all()
    assert torch.equal(batched[0], alone[0])


# -- apply_min_p -------------------------------------------------------------------------------

MIN_P_LOGITS = [math.log(p) for p in (0.125, 0.5, 0.0625, 0.25, 0.0625)]


def test_min_p_threshold_is_relative_to_the_top_probability_per_row():
    logits = rows(*[MIN_P_LOGITS] * 4)
    out = apply_min_p(logits, rows(0.0, 0.2, 0.3, 0.6))
    assert kept(out) == [
        [0, 1, 2, 3, 4],  # off
        [0, 1, 3],        # threshold 0.1: 0.125 in, 0.0625 out
        [1, 3],           # threshold 0.15: 0.125 out
        [1],              # threshold 0.3: 0.25 out
    ]


def test_min_p_keeps_a_token_exactly_at_the_threshold():
    # probabilities exactly 0.5, 0.5, 0: with min_p=1 the threshold equals both top probabilities
    out = apply_min_p(rows([0.0, 0.0, NEG_INF], [2.0, 2.0, 1.0]), rows(1.0, 1.0))
    assert kept(out) == [[0, 1], [0, 1]]


# -- process_logits: order of application -----------------------------------------------------

def test_temperature_is_applied_before_top_p():
    # at T=1 the nucleus of p=0.9 is three tokens (0.644, 0.237, 0.087); at T=0.5 it is two (0.865, 0.117)
    logits = rows([2.0, 1.0, 0.0, -1.0])
    out = process_logits(logits, [SamplingParams(temperature=0.5, top_p=0.9)], [[]])
    assert out.tolist() == [[4.0, 2.0, NEG_INF, NEG_INF]]
    out = process_logits(logits, [SamplingParams(temperature=1.0, top_p=0.9)], [[]])
    assert kept(out) == [[0, 1, 2]]


def test_repetition_penalty_is_applied_before_top_k():
    # token 0 is the best until penalized by 4: 3.0 -> 0.75, which drops it out of the top 2
    out = process_logits(rows([3.0, 2.0, 1.0, -1.0]), [SamplingParams(repetition_penalty=4.0, top_k=2)], [[0, 3]])
    assert out.tolist() == [[NEG_INF, 2.0, 1.0, NEG_INF]]


def test_process_logits_with_defaults_is_identity():
    logits = rows([0.5, 3.0, -1.0, 2.0], [1.0, 1.0, 1.0, 1.0])
    out = process_logits(logits, [SamplingParams(), SamplingParams()], [[0, 1], []])
    assert torch.equal(out, logits)


# -- sample: empirical distribution ------------------------------------------------------------

# Ten tokens with hand-picked probabilities, placed at shuffled vocabulary positions.
PROBS_SORTED = [0.30, 0.20, 0.15, 0.12, 0.08, 0.06, 0.04, 0.03, 0.015, 0.005]
POSITIONS = [3, 7, 0, 9, 5, 1, 8, 2, 6, 4]  # token id of the i-th most likely token
PROBS = [0.0] * 10
for _rank, _pos in enumerate(POSITIONS):
    PROBS[_pos] = PROBS_SORTED[_rank]
LOGITS = rows([math.log(p) for p in PROBS])
DRAWS = 10_000

# 0.999 quantiles of the chi-square distribution by degrees of freedom (standard tables). The test is
# seeded, so it is deterministic; the generous quantile just keeps the seed choice from mattering.
CHI2_CRITICAL_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
                     8: 26.124, 9: 27.877}


def draw_counts(params: SamplingParams, seed: int = 1234, logits: torch.Tensor = LOGITS) -> list[int]:
    """DRAWS tokens: 20 steps of a batch of 500 identical rows, each row with its own seeded generator
    (batched because one `sample` call per draw is 5x slower)."""
    batch, steps = 500, DRAWS // 500
    generators = [make_generator(seed + row) for row in range(batch)]
    counts = [0] * logits.shape[1]
    for _ in range(steps):
        for token in sample(logits.expand(batch, -1), [params] * batch, generators, [[]] * batch):
            counts[token] += 1
    return counts


def chi_square(counts: list[int], expected_probs: list[float]) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom over the tokens with expected probability > 0;
    bins expected to get fewer than 5 draws are merged into one."""
    total = sum(counts)
    cells, small_obs, small_exp = [], 0, 0.0
    for c, p in zip(counts, expected_probs):
        if p <= 0:
            continue
        if p * total < 5:
            small_obs, small_exp = small_obs + c, small_exp + p * total
        else:
            cells.append((c, p * total))
    if small_exp > 0:
        cells.append((small_obs, small_exp))
    return sum((o - e) ** 2 / e for o, e in cells), len(cells) - 1


def renormalized(keep: set[int], probs: list[float] = PROBS) -> list[float]:
    mass = sum(probs[i] for i in keep)
    return [p / mass if i in keep else 0.0 for i, p in enumerate(probs)]


def assert_matches(counts: list[int], expected: list[float]) -> None:
    outside = {i: c for i, c in enumerate(counts) if c and expected[i] == 0}
    assert not outside, f"tokens drawn outside the allowed set: {outside}"
    stat, dof = chi_square(counts, expected)
    assert stat < CHI2_CRITICAL_999[dof], f"chi2={stat:.1f} dof={dof} counts={counts} expected={expected}"
    assert max(abs(c / DRAWS - p) for c, p in zip(counts, expected)) < 0.02


def test_sample_default_params_follows_softmax():
    assert_matches(draw_counts(SamplingParams()), PROBS)


def test_sample_top_p_never_leaves_the_nucleus_and_matches_renormalized_probs():
    # sorted cumulative mass 0.30, 0.50, 0.65, 0.77, 0.85: the 5th token takes it past 0.8
    nucleus = set(POSITIONS[:5])
    counts = draw_counts(SamplingParams(top_p=0.8))
    assert {i for i, c in enumerate(counts) if c} == nucleus
    assert_matches(counts, renormalized(nucleus))


def test_sample_top_k_matches_renormalized_probs():
    counts = draw_counts(SamplingParams(top_k=3))
    assert_matches(counts, renormalized(set(POSITIONS[:3])))


def test_sample_min_p_matches_renormalized_probs():
    # threshold 0.3 * 0.30 = 0.09: keeps 0.30, 0.20, 0.15, 0.12; drops 0.08 and below
    counts = draw_counts(SamplingParams(min_p=0.3))
    assert_matches(counts, renormalized(set(POSITIONS[:4])))


def test_sample_temperature_half_sharpens_to_softmax_of_doubled_logits():
    squared = [p * p for p in PROBS]  # softmax(log p / 0.5) = p^2 / sum p^2
    expected = [s / sum(squared) for s in squared]
    counts = draw_counts(SamplingParams(temperature=0.5))
    assert_matches(counts, expected)
    stat, dof = chi_square(counts, PROBS)  # and the test can tell: the untempered distribution is rejected
    assert stat > 10 * CHI2_CRITICAL_999[dof]


def test_sample_combined_filters_stay_in_their_intersection():
    # top_k=4 then top_p=0.6 over the 4 survivors (0.30, 0.20, 0.15, 0.12)/0.77: cumulative 0.39, 0.649
    counts = draw_counts(SamplingParams(top_k=4, top_p=0.6), seed=99)
    assert_matches(counts, renormalized(set(POSITIONS[:2])))


# -- seeds -------------------------------------------------------------------------------------

FLAT = rows([0.1 * i for i in range(10)])


def draw_sequence(seed: int | None, steps: int = 50, params: SamplingParams | None = None) -> list[int]:
    generator, params = make_generator(seed), params or SamplingParams()
    return [sample(FLAT, [params], [generator], [[]])[0] for _ in range(steps)]


def test_same_seed_gives_identical_draws():
    assert draw_sequence(42) == draw_sequence(42)
    assert draw_sequence(2**63 - 1) == draw_sequence(2**63 - 1)  # largest seed SamplingParams allows


def test_different_seeds_give_different_draws():
    assert draw_sequence(42) != draw_sequence(43)


def test_unseeded_generators_differ():
    assert draw_sequence(None) != draw_sequence(None)


def test_seeded_row_is_independent_of_its_batch_mates():
    params = SamplingParams(seed=7, top_k=8)
    alone_gen = make_generator(params.seed)
    alone = [sample(FLAT, [params], [alone_gen], [[]])[0] for _ in range(50)]

    batch_logits = torch.cat([FLAT, rows([5.0, 0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 1.0, 2.0, 3.0])])
    mate = SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    gens = [make_generator(params.seed), make_generator(None)]
    batched = [sample(batch_logits, [params, mate], gens, [[], [0, 4]])[0] for _ in range(50)]
    assert batched == alone

    # and the same row placed second, behind a seeded mate with another seed
    gens = [make_generator(8), make_generator(params.seed)]
    second = [sample(batch_logits.flip(0), [SamplingParams(seed=8), params], gens, [[], []])[1] for _ in range(50)]
    assert second == alone


# -- greedy rows -------------------------------------------------------------------------------

def test_greedy_rows_return_argmax_while_other_rows_sample():
    logits = rows([0.1 * i for i in range(10)],                         # argmax 9
                  [1.0, 4.0, 2.0, 3.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # argmax 1
                  [1.0, 4.0, 2.0, 3.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])   # argmax 3 after penalty on 1
    params = [SamplingParams(temperature=1.0, seed=3),
              SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.5),
              SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    gens = [make_generator(3), make_generator(None), make_generator(None)]
    histories = [[], [1], [1]]
    draws = [sample(logits, params, gens, histories) for _ in range(200)]
    assert all(d[1] == 1 for d in draws)
    assert all(d[2] == 3 for d in draws)
    assert len({d[0] for d in draws}) > 5  # the sampling row really samples
    assert all(isinstance(t, int) for t in draws[0])


def test_greedy_accepts_low_precision_logits():
    logits = rows([0.5, 3.0, -1.0, 2.0]).to(torch.bfloat16)
    assert sample(logits, [SamplingParams(temperature=0)], [make_generator(0)], [[]]) == [1]


@pytest.mark.parametrize("temperature", [1e-46, 1e-40])
def test_tiny_positive_temperature_behaves_greedily(temperature):
    logits = rows([1.0, 3.0, 2.0])
    params = SamplingParams(temperature=temperature)
    draws = [sample(logits, [params], [make_generator(seed)], [[]])[0] for seed in range(50)]
    assert set(draws) == {1}


# -- one row's failure stays in its row (issue 15) ------------------------------------------------
def _pipeline_with(*processors):
    from tandem.sampling import SamplerPipeline

    return SamplerPipeline(list(processors), vocab_size=8)


class _Poison(LogitsProcessor):
    """Turns its rows into what an underflowing penalty produces: NaN, or nothing finite."""

    name = "poison"

    def validate(self, how: str = "nan"):
        return how

    def __call__(self, logits, args, batch):
        out = logits.clone()
        for row, how in enumerate(args):
            if how is not None:
                out[row] = float("nan") if how == "nan" else float("-inf")
        return out


@pytest.mark.parametrize("how", ["nan", "-inf"])
def test_a_row_that_cannot_be_sampled_fails_alone(how):
    """Regression: torch.multinomial raised outside the per-processor guard and the whole batch
    (every request in the step) failed."""
    from tandem.sampling import RandomStream, SamplingBatch

    pipe = _pipeline_with(_Poison())
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, logits_processors={"poison": {"how": how}}),
              SamplingParams(temperature=0), SamplingParams(temperature=0, logits_processors={"poison": {"how": how}})]
    batch = SamplingBatch(params, [[1, 2]] * 4, [2] * 4, [RandomStream(i).at(0) for i in range(4)])
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    result = pipe.sample(logits, batch)
    assert sorted(result.failures) == [1, 3]
    assert "NaN or no finite value" in str(result.failures[1])
    assert result.tokens[2] == int(logits[2].argmax())
    assert 0 <= result.tokens[0] < 8


def test_random_stream_is_addressed_by_position_not_by_history():
    from tandem.sampling import RandomStream

    a, b = RandomStream(42), RandomStream(42)
    for i in range(5):  # a draws a varying amount at each position; b jumps straight to 5
        torch.rand(i + 1, generator=a.at(i))
    assert torch.equal(torch.rand(4, generator=a.at(5)), torch.rand(4, generator=b.at(5)))
    assert not torch.equal(torch.rand(4, generator=a.at(5)), torch.rand(4, generator=a.at(6)))
    assert not torch.equal(torch.rand(4, generator=RandomStream(43).at(5)), torch.rand(4, generator=b.at(5)))


def test_invalid_rows_is_the_full_check_in_one_reduction():
    """The row-maximum shortcut flags exactly the rows the full check (any NaN, or no finite
    value) flags, +inf rows included."""
    from tandem.sampling import SamplerPipeline

    inf, nan = float("inf"), float("nan")
    rows = torch.tensor([[0.0, 1.0, 2.0], [0.0, nan, 2.0], [-inf, -inf, -inf], [inf, 1.0, 0.0], [inf, inf, inf],
                         [inf, -inf, -inf], [-inf, 3.0, -inf], [nan, inf, -inf], [inf, nan, 1.0]])
    full = rows.isnan().any(dim=-1) | ~rows.isfinite().any(dim=-1)
    flagged = SamplerPipeline.invalid_rows(rows, {})
    assert sorted(flagged) == full.nonzero().flatten().tolist() == [1, 2, 4, 5, 7, 8]
