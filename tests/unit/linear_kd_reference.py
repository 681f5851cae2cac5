"""float64 reference for the KD loss fused with the output layer, computed another way: both models' full
logits materialised, torch.log_softmax / cross_entropy, and plain autograd for the gradients."""
import torch

from kd_reference import reference_logit_loss


def make_linear_inputs(tokens, student_hidden, teacher_hidden, vocab, seed, dtype=torch.float32):
    """Hidden states and output weights whose logits are correlated (like a pruned student) and O(3)."""
    gen = torch.Generator().manual_seed(seed)
    h_t = torch.randn(tokens, teacher_hidden, generator=gen, dtype=torch.float64)
    w_t = torch.randn(vocab, teacher_hidden, generator=gen, dtype=torch.float64) * (3.0 / teacher_hidden ** 0.5)
    projection = torch.randn(teacher_hidden, student_hidden, generator=gen, dtype=torch.float64) / teacher_hidden ** 0.5
    h_s = h_t @ projection + 0.3 * torch.randn(tokens, student_hidden, generator=gen, dtype=torch.float64)
    w_s = w_t @ projection * (teacher_hidden / student_hidden) + 0.5 * torch.randn(
        vocab, student_hidden, generator=gen, dtype=torch.float64) / student_hidden ** 0.5
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    weights = (torch.rand(tokens, generator=gen) > 0.3).double() * (0.5 + torch.rand(tokens, generator=gen))
    return [x.to(dtype) for x in (h_s, w_s, h_t, w_t)] + [labels, weights]


def reference_linear_kd(h_s, w_s, h_t, w_t, kind, temperature=1.0, scale_by_temperature_squared=True,
                        token_weight=None, labels=None, kd_weight=1.0, lm_weight=0.0):
    """(per-token kd, per-token lm or None, total, d total / d h_s, d total / d w_s), all float64.
    Shapes: h [N, H], w [V, H] (the whole vocabulary), token_weight [N] (0 = masked), labels [N]."""
    hs = h_s.detach().double().requires_grad_(True)
    ws = w_s.detach().double().requires_grad_(True)
    z_s = hs @ ws.t()
    z_t = h_t.detach().double() @ w_t.detach().double().t()
    kd = reference_logit_loss(z_s, z_t, kind, temperature, scale_by_temperature_squared)
    weight = torch.ones(h_s.shape[0], dtype=torch.float64) if token_weight is None else token_weight.double()
    keep = weight != 0
    kd = torch.where(keep, kd, torch.zeros_like(kd))
    total = kd_weight * (kd * weight).sum()
    lm = None
    if labels is not None:
        lm = torch.nn.functional.cross_entropy(z_s, labels, reduction="none")
        lm = torch.where(keep, lm, torch.zeros_like(lm))
        total = total + lm_weight * (lm * weight).sum()
    grad_h, grad_w = torch.autograd.grad(total, (hs, ws))
    return kd.detach(), (lm.detach() if lm is not None else None), total.detach(), grad_h, grad_w
