"""The samplers: each filter keeps exactly its set, draws never leave it, temperature 0 is greedy, and the
same seed gives the same draws. The expected sets are computed here from the definitions, one token at a
time, independently of the vectorised code in llama_ref.generation.sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from llama_ref.errors import InputError
from llama_ref.generation.sampling import (SamplingParams, allowed_tokens, apply_repetition_penalty, draw,
                                log_prob, log_softmax, next_token_distribution, sample, softmax)

logits_strategy = arrays(np.float32, st.integers(2, 40),
                         elements=st.floats(-20, 20, width=32, allow_nan=False, allow_infinity=False))
fast = settings(max_examples=60, deadline=None)


def ranking(probs):
    """Token ids from most to least likely, equal probabilities by id."""
    return sorted(range(len(probs)), key=lambda i: (-probs[i], i))


def expected_set(probs, top_k, top_p, min_p):
    """The allowed set from the definitions: top-k ranks, then the nucleus of those, then min-p."""
    ranks = ranking(probs)
    kept = ranks[:top_k] if top_k > 0 else ranks
    if top_p < 1.0:
        total = sum(probs[i] for i in kept)
        nucleus, mass = [], 0.0
        for i in kept:
            if mass >= top_p:  # the tokens so far already cover top_p
                break
            nucleus.append(i)
            mass += probs[i] / total
        kept = nucleus
    if min_p > 0:
        kept = [i for i in kept if probs[i] >= min_p * probs[ranks[0]]]
    return set(kept) | {ranks[0]}


@fast
@given(logits_strategy, st.integers(0, 10), st.floats(0.05, 1.0), st.floats(0.0, 0.9),
       st.floats(0.3, 3.0), st.integers(0, 2**32 - 1))
def test_draws_never_leave_the_allowed_set(logits, top_k, top_p, min_p, temperature, seed):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    probs = softmax(logits.astype(np.float64) / temperature)
    allowed = allowed_tokens(probs, top_k, top_p, min_p)
    expected = expected_set(list(probs), top_k, top_p, min_p)
    # Float rounding of cumulative sums may move a token sitting exactly on the top-p edge; nothing else.
    differ = set(np.flatnonzero(allowed)) ^ expected
    ranks = ranking(list(probs))
    for i in differ:
        before = sum(probs[j] for j in ranks[:ranks.index(i)])
        assert top_p < 1 and math.isclose(before, top_p * sum(probs[j] for j in ranks[:top_k or None]),
                                          rel_tol=1e-9, abs_tol=1e-12), (i, differ)
    if top_k:
        assert allowed.sum() <= top_k
    rng = np.random.default_rng(seed)
    for _ in range(30):
        assert allowed[sample(logits, params, rng)]
    dist = next_token_distribution(logits, params)
    assert np.all(dist[~allowed] == 0) and math.isclose(dist.sum(), 1.0, rel_tol=1e-12)


@fast
@given(logits_strategy, st.integers(0, 10), st.floats(0.05, 1.0), st.floats(0.0, 1.0), st.floats(0.5, 2.0))
def test_temperature_zero_is_greedy_whatever_the_filters(logits, top_k, top_p, min_p, penalty):
    params = SamplingParams(temperature=0.0, top_k=top_k, top_p=top_p, min_p=min_p)
    rng = np.random.default_rng(0)
    assert sample(logits, params, rng) == int(np.argmax(logits))
    assert rng.random() == np.random.default_rng(0).random()  # greedy consumes no random numbers
    # With a repetition penalty, greedy is the argmax of the penalised logits.
    seen = [0, 1]
    penalised = SamplingParams(temperature=0.0, top_k=top_k, repetition_penalty=penalty)
    assert sample(logits, penalised, rng, seen) == int(np.argmax(apply_repetition_penalty(logits, seen, penalty)))


@fast
@given(logits_strategy, st.integers(0, 2**32 - 1))
def test_same_seed_same_draws(logits, seed):
    params = SamplingParams(temperature=1.0, top_p=0.9)
    a = [sample(logits, params, np.random.default_rng(seed)) for _ in range(3)]
    r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
    assert [sample(logits, params, r1) for _ in range(10)] == [sample(logits, params, r2) for _ in range(10)]
    assert len(set(a)) == 1


def allowed_by_ranking_all(probs, top_k, top_p, min_p):
    """allowed_tokens as it was before session 62, every token ranked (one lexsort of all V): the sets and
    the float steps that the seeds' draws followed."""
    V = probs.size
    order = np.lexsort((np.arange(V), -probs))
    keep_ranked = np.ones(V, dtype=bool)
    if top_k > 0:
        keep_ranked[top_k:] = False
    if top_p < 1.0:
        ranked = np.where(keep_ranked, probs[order], 0.0)
        ranked = ranked / ranked.sum()
        keep_ranked &= (np.cumsum(ranked) - ranked) < top_p
    keep = np.zeros(V, dtype=bool)
    keep[order] = keep_ranked
    if min_p > 0:
        keep &= probs >= min_p * probs[order[0]]
    keep[order[0]] = True
    return keep


@fast
@given(st.integers(2, 400), st.integers(1, 6), st.integers(0, 2**32 - 1), st.integers(0, 12), st.floats(0.05, 1.0),
       st.sampled_from([0.0, 0.05, 0.3]), st.booleans())
def test_ranking_only_the_ranks_a_filter_reads_keeps_every_set(V, levels, seed, top_k, top_p, min_p, float32):
    """allowed_tokens sorts only the first top_k ranks (none without top-k and top-p): the same sets, bit for bit,
    as ranking every token, ties at the k-th rank included (few distinct probabilities: many ties)."""
    rng = np.random.default_rng(seed)
    logits = rng.integers(0, levels, V) + (rng.standard_normal(V) if levels == 6 else 0)
    probs = softmax(logits)
    probs = probs.astype(np.float32) if float32 else probs
    for k in (top_k, V - 1, V, V + 3):
        for p in (top_p, 1.0):
            assert np.array_equal(allowed_tokens(probs, k, p, min_p), allowed_by_ranking_all(probs, k, p, min_p))


@fast
@given(st.sampled_from([70, 300, 2000, 5000]), st.sampled_from([0.01, 0.3, 3.0]), st.integers(0, 2**32 - 1),
       st.sampled_from([0, 40, 1500]), st.integers(1, 10**6), st.booleans())
def test_top_p_weighs_a_prefix_of_the_ranks_and_keeps_every_set(V, spread, seed, top_k, at, float32):
    """Top-p sums its ranks' probabilities in sequence only as far as it could keep one (a prefix growing from 64
    ranks): the same sets as the sum over every rank, with top_p on the very edge of a rank's mass (that mass, and
    the floats either side of it), far down the ranking too (flat distributions keep thousands of ranks)."""
    rng = np.random.default_rng(seed)
    probs = softmax(rng.standard_normal(V) * spread)
    probs = probs.astype(np.float32) if float32 else probs
    k = top_k if 0 < top_k < V else V
    order = np.lexsort((np.arange(V), -probs))
    ranked = np.where(np.arange(V) < k, probs[order], 0.0)
    ranked = ranked / ranked.sum()
    edge = (np.cumsum(ranked) - ranked)[1 + at % (k - 1)]  # the mass before a rank past the first
    for top_p in (edge, np.nextafter(edge, 0), np.nextafter(edge, 2)):
        if 0 < top_p < 1:
            assert np.array_equal(allowed_tokens(probs, top_k, float(top_p)),
                                  allowed_by_ranking_all(probs, top_k, float(top_p), 0.0))


@fast
@given(st.integers(1, 3000), st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.5, 0.99]))
def test_a_draw_sums_the_live_ids_only_and_picks_the_same_token(V, seed, dead):
    """draw adds up the probabilities of the live ids only: the same token as the cumulative sum over all V (its
    first bucket past u is always a live id's), for the same random number."""
    rng = np.random.default_rng(seed)
    probs = rng.random(V) ** 4 * (rng.random(V) >= dead)
    probs[rng.integers(V)] = 0.5  # at least one live id
    for s in range(5):
        cumulative = np.cumsum(probs)
        u = np.random.default_rng(seed + s).random() * cumulative[-1]
        index = int(np.searchsorted(cumulative, u, side="right"))
        if index >= V or probs[index] == 0:
            index = int(np.flatnonzero(probs)[-1])
        assert draw(probs, np.random.default_rng(seed + s)) == index


@fast
@given(logits_strategy, st.booleans(), st.data())
def test_log_prob_is_log_softmax_of_the_token_bit_for_bit(logits, wide, data):
    """Generation's logprobs take one token's log-softmax without the row (log_prob): the same float64."""
    z = logits.astype(np.float64) * 7 if wide else logits
    token, before = data.draw(st.integers(0, z.size - 1)), z.copy()
    assert log_prob(z, token) == log_softmax(z)[token]
    assert np.array_equal(z, before)  # shifted and exponentiated in a copy, not in the caller's logits


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8),
                                    SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
                                    SamplingParams(temperature=0.6, top_p=0.9)], ids=["greedy", "t", "cli", "top-p"])
def test_nan_logits_are_refused_clearly(params):
    """A NaN logit ranks against nothing: greedy took it and a draw picked garbage; now a clear error."""
    logits = np.zeros(100, np.float32)
    logits[5] = np.nan
    with pytest.raises(InputError, match="logits hold NaN .1 of 100, the first at token 5"):
        sample(logits, params, np.random.default_rng(0))
    with pytest.raises(InputError, match="logits hold NaN"):
        next_token_distribution(logits, params)


def test_draw_frequencies_follow_the_probabilities():
    probs = np.array([0.5, 0.0, 0.3, 0.15, 0.05])
    rng = np.random.default_rng(1234)
    counts = np.bincount([draw(probs, rng) for _ in range(20000)], minlength=5)
    assert counts[1] == 0
    # Within 4 standard deviations of the binomial count for each token.
    sd = np.sqrt(20000 * probs * (1 - probs))
    assert np.all(np.abs(counts - 20000 * probs) <= 4 * sd + 1e-9), counts


def test_top_p_and_min_p_by_hand():
    probs = np.array([0.1, 0.4, 0.3, 0.2])
    assert list(np.flatnonzero(allowed_tokens(probs, top_p=0.5))) == [1, 2]  # 0.4 < 0.5, 0.4 + 0.3 >= 0.5
    assert list(np.flatnonzero(allowed_tokens(probs, top_p=0.4))) == [1]
    assert list(np.flatnonzero(allowed_tokens(probs, top_k=3, top_p=0.8))) == [1, 2, 3]
    assert list(np.flatnonzero(allowed_tokens(probs, min_p=0.5))) == [1, 2, 3]  # >= 0.5 * 0.4
    assert list(np.flatnonzero(allowed_tokens(probs, min_p=0.6))) == [1, 2]


def test_repetition_penalty_follows_ctrl():
    logits = np.array([2.0, -1.0, 0.5, 3.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    # Seen tokens: positive logits halved, negative ones doubled; unseen ones untouched; repeats count once.
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]
    assert apply_repetition_penalty(logits, [0], 1.0).tolist() == logits.tolist()


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.1), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(min_p=-0.1), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
])
def test_bad_parameters_name_themselves(kwargs, name):
    with pytest.raises(InputError, match=name):
        SamplingParams(**kwargs)
