"""CFGDenoiser with prompt schedules and AND parts: the step of each call, A1111's combination of weighted parts."""

import torch

from plainsd.diffusion.guidance import CFGDenoiser, Conditioning, ScheduledCond
from plainsd.diffusion.samplers import sample_dpm_2, sample_euler, sample_heun


class _Recorder:
    """A denoiser whose prediction is each row's text state (a number), recording the sigmas and states it saw."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cond):
        self.calls.append((float(sigma[0]), cond[:, 0, 0].tolist()))
        return x * 0 + cond[:, :1, :1, None]


def _states(value, rows=1):
    return torch.full((rows, 3, 2), float(value))


def test_schedule_picks_the_first_entry_ending_at_or_after_the_step():
    s = ScheduledCond([(3, _states(1)), (10, _states(2))])
    assert [float(s.at(i)[0, 0, 0]) for i in (0, 3, 4, 10, 12)] == [1, 1, 2, 2, 2]


def test_each_call_gets_its_steps_text_from_its_sigma():
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    cond = Conditioning([(1.0, ScheduledCond([(i, _states(10 + i)) for i in range(4)]))])
    for sampler, want in ((sample_euler, [10, 11, 12, 13]),
                          (sample_dpm_2, [10, 10, 11, 11, 12, 12, 13]),   # midpoints stay in their step
                          (sample_heun, [10, 11, 11, 12, 12, 13, 13])):   # the correction at the next sigma
        inner = _Recorder()
        sampler(CFGDenoiser(inner, 1.0, sigmas), torch.zeros(1, 1, 1, 1), sigmas, extra_args={"cond": cond})
        assert [c[1][0] for c in inner.calls] == want, sampler.__name__


def test_img2img_pass_counts_its_steps_from_zero():
    sigmas = torch.tensor([2.0, 1.0, 0.0])  # the last two steps of a longer schedule
    cond = Conditioning([(1.0, ScheduledCond([(0, _states(1)), (9, _states(2))]))])
    inner = _Recorder()
    sample_euler(CFGDenoiser(inner, 1.0, sigmas), torch.zeros(1, 1, 1, 1), sigmas, extra_args={"cond": cond})
    assert [c[1] for c in inner.calls] == [[1.0], [2.0]]


def test_weighted_parts_combine_as_a1111():
    inner = _Recorder()
    cond = Conditioning([(1.0, ScheduledCond([(5, _states(2))])), (0.5, ScheduledCond([(5, _states(6))]))])
    uncond = ScheduledCond([(5, _states(1))])
    x = torch.zeros(2, 1, 1, 1)
    out = CFGDenoiser(inner, 3.0)(x, torch.tensor([1.0, 1.0]), cond=cond, uncond=uncond)
    # 1 + 3 * 1 * (2 - 1) + 3 * 0.5 * (6 - 1) = 11.5, all in one batch: uncond, then each part, a row per image
    assert torch.equal(out, torch.full_like(x, 11.5))
    assert inner.calls[0][1] == [1.0, 1.0, 2.0, 2.0, 6.0, 6.0]
    one = CFGDenoiser(inner, 1.0)(x, torch.tensor([1.0, 1.0]), cond=cond, uncond=uncond)
    assert torch.equal(one, torch.full_like(x, 1 + 1 + 0.5 * 5))  # at scale 1 several parts still need uncond


def test_one_part_of_weight_one_is_plain_cfg_bit_for_bit():
    torch.manual_seed(0)
    cond, uncond = torch.randn(2, 3, 2), torch.randn(2, 3, 2)
    net = lambda x, s, cond: x * cond.mean() + cond.sum() * 0.37 + s.reshape(-1, 1, 1, 1)  # noqa: E731
    x, s = torch.randn(2, 4, 2, 2), torch.tensor([3.0, 3.0])
    both = net(torch.cat([x, x]), torch.cat([s, s]), torch.cat([uncond, cond]))
    d_uncond, d_cond = both.chunk(2)
    plain = d_uncond + (d_cond - d_uncond) * 7.5
    scheduled = Conditioning([(1.0, ScheduledCond([(9, cond)]))])
    assert torch.equal(CFGDenoiser(net, 7.5)(x, s, cond=scheduled, uncond=ScheduledCond([(9, uncond)])), plain)
    assert torch.equal(CFGDenoiser(net, 7.5)(x, s, cond=cond, uncond=uncond), plain)


def test_after_the_cutoff_the_first_part_stands_in_for_uncond():
    inner = _Recorder()
    sigmas = torch.tensor([4.0, 2.0, 1.0, 0.0])
    cond = Conditioning([(1.0, ScheduledCond([(5, _states(2))])), (0.5, ScheduledCond([(5, _states(6))]))])
    cfg = CFGDenoiser(inner, 3.0, sigmas, guidance_until=0.5)
    x = torch.zeros(1, 1, 1, 1)
    late = cfg(x, torch.tensor([1.0]), cond=cond, uncond=ScheduledCond([(5, _states(1))]))
    assert inner.calls[-1][1] == [2.0, 6.0] and torch.equal(late, torch.full_like(x, 2 + 0.5 * 4))


def test_ngms_skips_the_negative_prompt_every_second_call_below_its_sigma():
    """A1111's s_min_uncond: a call with an odd count whose sigma is below it computes the prompt's half alone,
    which stands in for the negative one (the prompt's prediction at scale 1); calls above it, or even, are guided."""
    inner = _Recorder()
    cfg = CFGDenoiser(inner, 3.0, min_uncond=6.0)
    x = torch.zeros(1, 1, 1, 1)
    out = [float(cfg(x, torch.tensor([s]), cond=_states(2), uncond=_states(1))) for s in (10.0, 8.0, 5.0, 4.0, 2.0)]
    assert out == [1 + 3 * (2 - 1), 4.0, 4.0, 2.0, 4.0]   # call 1 is above 6, call 3 odd and below: cond alone
    assert [len(states) for _, states in inner.calls] == [2, 2, 2, 1, 2] and cfg.skipped
    plain = CFGDenoiser(_Recorder(), 3.0)
    assert [float(plain(x, torch.tensor([s]), cond=_states(2), uncond=_states(1))) for s in (5.0, 4.0)] == [4.0, 4.0]
    assert not plain.skipped
