"""float64 references for the KD-loss tests: plain log_softmax / autograd, a different computation from the
chunked, analytic-gradient code under test; and a recorder of the largest tensor the code under test makes."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensorRecorder(TorchDispatchMode):
    """Largest tensor (elements) any op produces among those ``counts(tensor)`` selects: memory claims
    (chunking, no [T, V] logits) checked rather than assumed."""

    def __init__(self, counts):
        super().__init__()
        self.counts = counts
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and self.counts(t):
                self.largest = max(self.largest, t.numel())
        return out


def reference_logit_loss(student, teacher, kind, temperature=1.0, scale_by_temperature_squared=True):
    """Per-token loss in float64 from full-vocabulary logits (student may require grad)."""
    s = student.double()
    t = teacher.detach().double()
    if kind in ("forward_kl", "reverse_kl"):
        log_p_s = torch.log_softmax(s / temperature, dim=-1)
        log_p_t = torch.log_softmax(t / temperature, dim=-1)
        if kind == "forward_kl":
            kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
        else:
            kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
        return kl * (temperature ** 2 if scale_by_temperature_squared else 1.0)
    if kind == "mse":
        return ((s - t) ** 2).mean(-1)
    if kind == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-30)
    raise ValueError(kind)


def reference_loss_and_grad(student, teacher, kind, upstream, **kwargs):
    """(per-token loss, d sum(upstream * loss) / d student), float64."""
    leaf = student.detach().double().requires_grad_(True)
    loss = reference_logit_loss(leaf, teacher, kind, **kwargs)
    (grad,) = torch.autograd.grad((loss * upstream.double()).sum(), leaf)
    return loss.detach(), grad


def make_logits(shape, seed, dtype=torch.float32, spread=3.0):
    """Student/teacher logits that are correlated (like a pruned student) but not equal."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(shape, generator=gen, dtype=torch.float64) * spread
    student = teacher + torch.randn(shape, generator=gen, dtype=torch.float64) * spread * 0.5
    return student.to(dtype), teacher.to(dtype)


def reference_kl_with_neg_inf(student, teacher, kind, upstream, temperature=1.0, scale_by_temperature_squared=True):
    """(per-token KL, gradient) in float64 for logits holding -inf, computed row by row on the finite columns
    only: each softmax over its own finite logits, the KL summed over the columns the weighting distribution
    (teacher for forward, student for reverse) gives nonzero probability. Columns outside get gradient 0."""
    s_all = student.detach().double().reshape(-1, student.shape[-1])
    t_all = teacher.detach().double().reshape(-1, teacher.shape[-1])
    leaf = s_all.clone().requires_grad_(True)
    losses = []
    for row in range(s_all.shape[0]):
        s_cols = torch.isfinite(s_all[row]).nonzero().squeeze(1)
        t_cols = torch.isfinite(t_all[row]).nonzero().squeeze(1)
        log_p_s = torch.full_like(s_all[row], float("-inf")).index_put(
            (s_cols,), torch.log_softmax(leaf[row, s_cols] / temperature, dim=0))
        log_p_t = torch.full_like(t_all[row], float("-inf")).index_put(
            (t_cols,), torch.log_softmax(t_all[row, t_cols] / temperature, dim=0))
        support = t_cols if kind == "forward_kl" else s_cols
        p, q = (log_p_t, log_p_s) if kind == "forward_kl" else (log_p_s, log_p_t)
        losses.append((p[support].exp() * (p[support] - q[support])).sum())
    loss = torch.stack(losses) * (temperature ** 2 if scale_by_temperature_squared else 1.0)
    (grad,) = torch.autograd.grad((loss * upstream.double().reshape(-1)).sum(), leaf)
    return loss.detach().reshape(student.shape[:-1]), grad.reshape(student.shape)


def with_neg_inf(student, teacher, kind, seed, padded=3, extra_fraction=0.4):
    """Copies of the logits with -inf where a real vocabulary has it: the last ``padded`` columns of both
    (a padded vocabulary), plus a random ``extra_fraction`` of columns -inf only on the side whose
    probability weights the KL (teacher for forward KL: top-k / masked teacher logits; student for reverse)."""
    gen = torch.Generator().manual_seed(seed)
    student, teacher = student.clone(), teacher.clone()
    student[..., -padded:] = float("-inf")
    teacher[..., -padded:] = float("-inf")
    extra = torch.rand(student.shape, generator=gen) < extra_fraction
    extra[..., 0] = False  # every row keeps a finite logit
    (teacher if kind == "forward_kl" else student)[extra] = float("-inf")
    return student, teacher
