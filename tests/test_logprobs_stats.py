"""sloth.linear_logprobs_stats (and linear_logprobs' softcap / logit_scale) against plain PyTorch on the CPU:
log-probs, entropies and their gradients, and the no-grad statistics TRL's fused LM head reports."""

import pytest
import torch

import sloth


def reference(h, w, b, t, temperature, softcap, scale):
    z = (h @ w.t() + (0 if b is None else b)) * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    lp = torch.log_softmax(z, -1)
    pad = t == -100
    logp = lp.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1).masked_fill(pad, 0)
    ent = -(lp.exp() * lp).sum(-1)
    stats = {"is_top1": z.argmax(-1) == t, "mean_logits": z.mean(-1), "log_sum_sq_probs": torch.logsumexp(2 * lp, -1)}
    return logp, ent, stats


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_stats_and_grads(softcap, temperature, bias):
    g = torch.Generator().manual_seed(0)
    n, hd, v = 37, 16, 101
    h = torch.randn(n, hd, generator=g).requires_grad_()
    w = (torch.randn(v, hd, generator=g) * 0.5).requires_grad_()
    b = torch.randn(v, generator=g).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[3] = -100
    out = sloth.linear_logprobs_stats(h, w, t, bias=b, temperature=temperature, softcap=softcap, logit_scale=1.3,
                                      stats=("is_top1", "mean_logits", "log_sum_sq_probs"), chunk_size=8)
    lp, ent, st = reference(h, w, b, t, temperature, softcap, 1.3)
    torch.testing.assert_close(out["log_probs"], lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["entropy"], ent, rtol=1e-5, atol=3e-5)  # both fp32: sums over 101 terms
    assert out["is_top1"].equal(st["is_top1"]) and not out["is_top1"][3]
    for k in ("mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(out[k], st[k], rtol=1e-5, atol=3e-5, msg=k)
        assert not out[k].requires_grad
    keep = t != -100  # padding rows get no gradient (the entropy of a padding row is reported, not trained)
    c1, c2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    params = [p for p in (h, w, b) if p is not None]
    got = torch.autograd.grad((out["log_probs"] * c1).sum() + (out["entropy"] * c2 * keep).sum(), params)
    want = torch.autograd.grad((lp * c1).sum() + (ent * c2 * keep).sum(), params)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=5e-5)  # fp32 vs fp32, entries of order 1
    # linear_logprobs takes the same scaling
    lp2 = sloth.linear_logprobs(h, w, t, bias=b, temperature=temperature, softcap=softcap, logit_scale=1.3)
    torch.testing.assert_close(lp2, lp, rtol=1e-5, atol=1e-5)


def test_unknown_stat():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown statistic"):
        sloth.linear_logprobs_stats(h, w, t, stats=("top5",))
    out = sloth.linear_logprobs_stats(h.view(2, 2, 8), w, t.view(2, 2))
    assert set(out) == {"log_probs", "entropy"} and out["log_probs"].shape == (2, 2)
