"""Token choice: tempered log-probs, top-k / top-p truncation, per-row seeded sampling."""

import pytest
import torch

from repo_megatron.engines.base import SamplingParams
from repo_megatron.engines.sampling import nucleus_mask, sample_tokens

LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def draw(params, seeds, logits=LOGITS):
    rows = logits.expand(len(seeds), -1)
    return sample_tokens(rows, [params] * len(seeds),
                         [torch.Generator().manual_seed(s) for s in seeds])


def test_nucleus_mask_keeps_top_k_and_the_top_p_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3)
    mask = nucleus_mask(probs, torch.tensor([4, 2, 4]), torch.tensor([0.6, 1.0, 0.5]))
    assert mask.tolist() == [[True, True, False, False],    # 0.5 < 0.6: the second one stays
                             [True, True, False, False],    # top-k = 2
                             [True, False, False, False]]   # 0.5 already reaches 0.5


def test_samples_follow_the_tempered_distribution():
    tokens, _ = draw(SamplingParams(temperature=1.0), range(4000))
    freq = torch.bincount(torch.tensor(tokens), minlength=4) / 4000
    assert freq.tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.03)


def test_truncated_tokens_are_never_sampled_and_logprobs_are_untruncated():
    tokens, logprobs = draw(SamplingParams(temperature=2.0, top_p=0.6), range(500))
    assert set(tokens) == {0, 1}
    tempered = torch.log_softmax(LOGITS[0] / 2.0, -1)
    assert logprobs == pytest.approx([tempered[t].item() for t in tokens])


def test_greedy_and_top_k_one_take_the_argmax():
    assert draw(SamplingParams(temperature=0), [1, 2])[0] == [0, 0]
    tokens, logprobs = draw(SamplingParams(temperature=0.7, top_k=1), range(20))
    assert set(tokens) == {0}
    assert logprobs[0] == pytest.approx(torch.log_softmax(LOGITS[0] / 0.7, -1)[0].item())


def test_a_row_samples_the_same_alone_or_with_other_rows():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.0, top_k=20), SamplingParams(temperature=0.5),
              SamplingParams(temperature=0), SamplingParams(top_p=0.3), SamplingParams()]
    together, _ = sample_tokens(logits, params, [torch.Generator().manual_seed(s) for s in range(5)])
    alone = [sample_tokens(logits[i:i + 1], params[i:i + 1], [torch.Generator().manual_seed(i)])[0][0]
             for i in range(5)]
    assert together == alone


def test_float_noise_in_near_uniform_logits_almost_never_changes_the_pick():
    # a random model's logits are nearly flat; another batch composition perturbs them by
    # rounding, which must not reshuffle the samples (eager and lazy schedules rely on it).
    # (top-k / top-p cut-offs among near-ties are fragile however the CDF is ordered.)
    logits = 1e-3 * torch.randn(200, 5000, generator=torch.Generator().manual_seed(0))
    noisy = logits + 1e-7 * torch.randn(200, 5000, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams()] * 200
    a, _ = sample_tokens(logits, params, [torch.Generator().manual_seed(s) for s in range(200)])
    b, _ = sample_tokens(noisy, params, [torch.Generator().manual_seed(s) for s in range(200)])
    assert sum(x != y for x, y in zip(a, b)) <= 2
