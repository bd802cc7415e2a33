"""The runtime's attention: its oneDNN bf16 paths give float32 SDPA's answer within bf16 tolerance and are taken
where the rules say (bf16 inference on a CPU without AMX, by size); prepare() installs it in a model's attention
layers, and an unprepared model runs the models' plain SDPA."""

import pytest
import torch
import torch.nn.functional as F

import plainsd
from plainsd import runtime
from plainsd.models import layers
from plainsd.models.vae import AttnBlock
from plainsd.pipeline import txt2img
from plainsd.runtime import attention as rt

fused = pytest.mark.skipif(not rt._fused_exp_available(), reason="torch has no oneDNN linear with a fused sigmoid "
                           "(torch.ops.mkldnn._linear_pointwise) or this CPU has no oneDNN bf16 kernels")


@pytest.fixture(autouse=True)
def _without_amx(monkeypatch):
    """The oneDNN paths are the ones taken on CPUs without AMX; they are tested on every CPU (AMX ones too)."""
    monkeypatch.setattr(rt, "_amx", lambda: False)


def _split(t, heads):
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _sdpa(q, k, v, heads):
    """torch's SDPA on [B, N, C] tensors in their own dtype."""
    out = F.scaled_dot_product_attention(_split(q, heads), _split(k, heads), _split(v, heads))
    return out.transpose(1, 2).reshape(q.shape)


def _errors(got, q, k, v, heads):
    """Relative errors of `got` and of bf16 SDPA against float32 SDPA."""
    ref = _sdpa(q.float(), k.float(), v.float(), heads)
    bf16 = _sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads)
    rel = lambda o: ((o.float() - ref).norm() / ref.norm()).item()
    return rel(got), rel(bf16)


def _spy(monkeypatch, names):
    calls = []
    for name in names:
        real = getattr(rt, name)
        monkeypatch.setattr(rt, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    return calls


@fused
@pytest.mark.parametrize("n, m, c, heads, path", [
    (1024, 1024, 80, 2, "_attention_fused"),  # self-attention at 1024 tokens, heads of 40 as SD1.5's first level
    (4096, 77, 80, 2, "_attention_fused"),  # the text's 77 keys (padded to 80) at 4096 tokens
    (1024, 77, 80, 2, "_attention_batched"),  # the text at 1024 tokens: few scores, one batched product
    (1024, 1024, 128, 2, "_attention_fused"),  # SD2's heads of 64
    (1024, 1024, 512, 1, "_attention_fused"),  # the VAE's single head of 512
])
def test_bf16_attention_paths_within_bf16_tolerance(monkeypatch, n, m, c, heads, path):
    torch.manual_seed(0)
    calls = _spy(monkeypatch, ["_attention_fused", "_attention_batched"])
    q, k, v = torch.randn(2, n, c), torch.randn(2, m, c), torch.randn(2, m, c)
    got = rt.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=heads)
    assert calls == [path] and got.dtype == torch.bfloat16 and got.shape == q.shape
    err, err_sdpa = _errors(got, q, k, v, heads)
    assert err < 0.01 and err < 2 * err_sdpa, (err, err_sdpa)  # as close to float32 as bf16 SDPA is


@fused
@pytest.mark.parametrize("scale", [3, 20])
def test_fused_attention_with_large_scores(scale):
    """Scores in the tens (peaked attention) and in the thousands (one-hot): the bound is looser, the
    exponentials smaller, the answer as good."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 1024, 80) * scale, torch.randn(1, 1024, 80) * scale, torch.randn(1, 1024, 80)
    got = rt._attention_fused(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=2)
    err, err_sdpa = _errors(got, q, k, v, 2)
    assert err < 2 * err_sdpa, (err, err_sdpa)


@pytest.mark.parametrize("n, m", [(4096, 4096), (4096, 77), (256, 77)])
def test_with_amx_bf16_attention_is_sdpa(monkeypatch, n, m):
    """Where the CPU has AMX tiles, torch's SDPA kernel is the fastest bf16 attention (benchmarks/attention.py):
    no oneDNN path is taken."""
    monkeypatch.setattr(rt, "_amx", lambda: True)
    calls = _spy(monkeypatch, ["_attention_fused", "_attention_batched"])
    sdpa_calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: sdpa_calls.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    q, k, v = torch.randn(1, n, 80), torch.randn(1, m, 80), torch.randn(1, m, 80)
    got = rt.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=2)
    assert calls == [] and sdpa_calls == [1]
    err, err_sdpa = _errors(got, q, k, v, 2)
    assert err == err_sdpa


@fused
def test_a_traced_graph_keeps_sdpa():
    """OpenVINO converts plainsd's UNet from a trace: the oneDNN ops (which it cannot read) stay out of it."""
    q, k, v = (torch.randn(1, 1024, 80).bfloat16() for _ in range(3))
    with torch.no_grad():
        graph = str(torch.jit.trace(lambda q, k, v: rt.attention(q, k, v, heads=2), (q, k, v)).graph)
    assert "scaled_dot_product_attention" in graph and "mkldnn" not in graph


@fused
def test_fused_attention_takes_strided_inputs():
    """[B, N, C] views of [B, C, N] tensors (as the VAE's attention makes them) give the contiguous answer."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 80, 1024).bfloat16().transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    got = rt._attention_fused(q, k, v, heads=2)
    ref = rt._attention_fused(q.contiguous(), k.contiguous(), v.contiguous(), heads=2).float()
    assert ((got.float() - ref).norm() / ref.norm()).item() < 1e-3  # (the bound's float sums in another order)


@fused
def test_fused_attention_keeps_the_shift_exact_for_scores_in_the_thousands():
    """Two keys whose scores, near 3000, differ by about one: their weights must keep the ratio e. A shift
    rounded to one bf16 number (spacing 16 there) would leave some rows' largest exponent near 0, where the
    sigmoid is no exponential; the shift's second column keeps it exact."""
    n = m = 512
    torch.manual_seed(4)
    q = torch.zeros(1, n, 40)
    q[0, :, 0], q[0, :, 1] = torch.linspace(100, 140, n), 1.0
    k, v = torch.randn(1, m, 40) * 0.5, torch.randn(1, m, 40)
    k[0, :2] = 0.0
    k[0, :2, 0], k[0, 1, 1] = 148.0, -6.3125  # scores q0 * 148 / sqrt(40) and about 1 less
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    worst = lambda o: ((o.float() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()  # noqa: E731
    # the worst row: three bf16 roundings (P, S, O) against SDPA's one, 0.4-0.6%; with the shift in one bf16
    # column, 1.7% and more
    assert worst(rt.attention(q, k, v, heads=1)) < 0.01


@fused
def test_fused_attention_bound_holds_where_the_keys_share_a_large_offset():
    """Keys far from the origin (all at 200 along one axis, spread along another): q . c is in the thousands,
    where a bf16 product is off by up to 8. The bound must stay above every query's largest score; below it,
    the top exponents come near 0, where the sigmoid is no exponential."""
    n = m = 512
    torch.manual_seed(5)
    q, k, v = torch.zeros(1, n, 40), torch.zeros(1, m, 40), torch.randn(1, m, 40)
    q[0, :, 0], q[0, :, 1] = torch.linspace(12, 16, n) * 40 ** 0.5, 1000 * 40 ** 0.5  # (q is scaled by 1/sqrt(d))
    k[0, :, 0], k[0, :, 1] = 200.0, torch.linspace(-1, 1, m)  # neighbouring keys' scores about 4 apart
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    got = rt._attention_fused(q, k, v, heads=1)
    # the worst row: 0.3-0.4% (1.7% with a bound whose q . c came from a bf16 product, rounding not allowed for)
    assert ((got.float() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item() < 0.01


def _far_key_case(see_it):
    """One key far out along a direction the queries in see_it point at and the others ignore: for those the
    bound |q| max|k - c| is ~200 above their real scores, and every exponential would underflow."""
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 512, 40), torch.randn(1, 512, 40) * 0.1, torch.randn(1, 512, 40)
    k[0, 0, 0] = 200.0
    q[0, :, 0] = 0.0
    q[0, see_it, 0] = 30.0
    return q, k, v


@fused
@pytest.mark.parametrize("see_it, exact_rows", [
    (slice(0, None, 2), [256]),  # the sampled queries (every 16th) are tight: odd rows underflow, done again
    (slice(1, None, 2), [512]),  # the sampled ones are loose: the whole head takes the exact maximum at once
])
def test_fused_attention_takes_the_exact_maximum_where_the_bound_is_loose(monkeypatch, see_it, exact_rows):
    q, k, v = _far_key_case(see_it)
    rows = []
    real = rt._exact_shift
    monkeypatch.setattr(rt, "_exact_shift", lambda x, *a: rows.append(x.shape[0]) or real(x, *a))
    got = rt.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=1)
    assert rows == exact_rows
    err, err_sdpa = _errors(got, q, k, v, 1)
    assert err < 2 * err_sdpa, (err, err_sdpa)


@fused
def test_without_the_exact_maximum_the_far_key_case_fails(monkeypatch):
    """The case above is a real one: with the bound alone, the odd rows are 0/0."""
    q, k, v = _far_key_case(slice(0, None, 2))
    monkeypatch.setattr(rt, "_MIN_SUM", 0.0)
    assert torch.isnan(rt.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=1)[0, 1::2]).all()


@fused
def test_the_bound_is_tight_on_a_trained_unet(monkeypatch):
    """The shipped model at 256x256 (1024 tokens in its UNet's first level, heads of 16, and in its VAE's
    single head of 128): trained keys are no isotropic cloud, and the UNet's bound leaves no query to the
    exact maximum. (Cauchy-Schwarz is looser for the VAE's one wide head; that may take the exact path.)"""
    fused_calls, exact = [], []
    real_fused, real_exact = rt._attention_fused, rt._exact_shift
    monkeypatch.setattr(rt, "_attention_fused", lambda q, k, v, heads, *a: fused_calls.append(q.shape[2] // heads)
                        or real_fused(q, k, v, heads, *a))
    monkeypatch.setattr(rt, "_exact_shift", lambda x, kp, d, m: exact.append(d) or real_exact(x, kp, d, m))
    sd = runtime.prepare(plainsd.load(dtype=torch.bfloat16))
    txt2img(sd, "a red circle and a blue square", steps=3, seed=1, width=256, height=256)
    assert fused_calls.count(16) >= 8 and 16 not in exact


def test_float32_and_training_keep_sdpa(monkeypatch):
    torch.manual_seed(0)
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append("sdpa") or real_sdpa(*a, **kw))
    q, k, v = torch.randn(2, 1024, 80), torch.randn(2, 1024, 80), torch.randn(2, 1024, 80)
    rt.attention(q, k, v, heads=2)  # float32
    qg = q.bfloat16().requires_grad_()
    rt.attention(qg, k.bfloat16(), v.bfloat16(), heads=2).float().sum().backward()  # gradients needed
    assert calls == ["sdpa", "sdpa"] and qg.grad is not None


def _paths(monkeypatch):
    """Spies on the runtime's oneDNN paths and on torch's SDPA: a list of (path, queries, keys) per call."""
    calls = []
    real_fused, real_batched, real_sdpa = rt._attention_fused, rt._attention_batched, F.scaled_dot_product_attention
    monkeypatch.setattr(rt, "_attention_fused", lambda q, k, v, heads, *a:
                        calls.append(("fused", q.shape[1], k.shape[1])) or real_fused(q, k, v, heads, *a))
    monkeypatch.setattr(rt, "_attention_batched", lambda q, k, v:  # [B, heads, N, d]
                        calls.append(("batched", q.shape[2], k.shape[2])) or real_batched(q, k, v))
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw:
                        calls.append(("sdpa", q.shape[2], k.shape[2])) or real_sdpa(q, k, v, **kw))
    return calls


def _today(n, m):
    """The path bf16 inference takes on a CPU without AMX, by the number of queries and keys (module doc)."""
    if n * m >= 1 << 18:
        return "fused"
    return "batched" if m < 1024 else "sdpa"


def _run(sd):
    """The UNet at 32x32 latents (1024 tokens in its first level: both oneDNN paths) and the VAE decoder's attention
    block at the size its decode of those latents gives it (the decoder's convolutions would only add time: bf16
    ones are slow on a CPU without bf16 kernels)."""
    x, t, c = torch.randn(2, 4, 32, 32), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 128)
    block = sd.vae.decoder.mid.attn_1
    with torch.no_grad():
        sd.unet(x.to(sd.dtype), t, c.to(sd.dtype))
        block(torch.randn(1, block.q.in_channels, 32, 32, dtype=sd.dtype))


@fused
def test_a_prepared_bf16_model_takes_the_runtime_attention_where_the_rules_say(monkeypatch):
    sd = runtime.prepare(plainsd.build("tiny", seed=0).to(torch.bfloat16)).sd
    cross = [m for m in sd.unet.modules() if isinstance(m, layers.CrossAttention)]
    blocks = [m for m in sd.vae.modules() if isinstance(m, AttnBlock)]
    assert cross and all(type(m) is rt.RuntimeCrossAttention for m in cross)
    assert blocks and all(type(m) is rt.RuntimeAttnBlock for m in blocks)
    assert not any(type(m).__module__.startswith("plainsd.runtime") for m in sd.text_encoder.modules())  # causal: SDPA
    calls = _paths(monkeypatch)
    _run(sd)
    assert len(calls) == len(cross) + 1  # the decoder's one attention block
    assert [path for path, _, _ in calls] == [_today(n, m) for _, n, m in calls]
    assert {path for path, _, _ in calls} == {"fused", "batched"}
    # float32 and AMX keep SDPA
    calls.clear()
    monkeypatch.setattr(rt, "_amx", lambda: True)
    _run(sd)
    assert calls and {path for path, _, _ in calls} == {"sdpa"}
    calls.clear()
    monkeypatch.setattr(rt, "_amx", lambda: False)
    _run(runtime.prepare(sd, precision="fp32").sd)
    assert calls and {path for path, _, _ in calls} == {"sdpa"}


def test_an_unprepared_model_runs_the_models_plain_sdpa(monkeypatch):
    sd = plainsd.build("tiny", seed=0).to(torch.bfloat16)
    assert not any(type(m).__module__.startswith("plainsd.runtime") for m in sd.modules())
    calls = _paths(monkeypatch)
    _run(sd)
    assert calls and {path for path, _, _ in calls} == {"sdpa"}


def test_the_runtime_attention_comes_off_and_leaves_the_weights_alone():
    sd = plainsd.build("tiny", seed=0)
    state = {k: v.clone() for k, v in sd.state_dict().items()}
    assert runtime.use_runtime_attention(sd) == runtime.use_plain_attention(sd) > 0
    assert not any(type(m).__module__.startswith("plainsd.runtime") for m in sd.modules())
    assert sd.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in sd.state_dict().items())
