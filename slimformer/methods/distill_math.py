"""Training losses as pure tensor functions: KD divergences on cached top-k teacher logits, hidden-state losses, a chunked head loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

KD_LOSSES = ("kl", "reverse_kl", "js")
HIDDEN_LOSSES = ("mse", "cosine")


def teacher_topk(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the cache keeps of teacher logits ``(N, V)``: top-k of ``logits / T`` (values, int32 indices) and their log-sum-exp."""
    z = logits.float() / temperature
    values, index = z.topk(min(k, z.shape[-1]), dim=-1)
    return values, index.to(torch.int32), torch.logsumexp(z, -1)


def _buckets(student: torch.Tensor, index: torch.Tensor, temperature: float, full: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Student log-probabilities of the cached top-k tokens ``(N, k)`` and of all other tokens together ``(N,)``."""
    z = student.float() / temperature
    lse = torch.logsumexp(z, -1, keepdim=True)
    index = index.long()
    top = z.gather(-1, index) - lse
    if full:
        return top, None
    rest = torch.logsumexp(z.scatter(-1, index, float("-inf")), -1) - lse[:, 0]
    return top, rest


def kd_divergence(student: torch.Tensor, values: torch.Tensor, index: torch.Tensor, lse: torch.Tensor,
                  kind: str = "kl", temperature: float = 1.0) -> torch.Tensor:
    """Summed KD loss of student logits ``(N, V)`` against cached teacher top-k ``values``/``index`` ``(N, k)`` and ``lse`` ``(N,)``.

    Hinton et al.'s logit distillation at temperature ``T``, scaled by ``T²`` so its gradient keeps
    its size as ``T`` changes. ``kind``: ``kl`` is KL(teacher ‖ student) (forward), ``reverse_kl``
    KL(student ‖ teacher) (mode-seeking, as MiniLLM argues for generative students), ``js`` the
    Jensen-Shannon divergence. With ``k = V`` this is the divergence of the full distributions; with
    ``k < V`` both distributions are coarsened to the teacher's top-k tokens plus one bucket for all
    the others, which is exact on the top-k mass and, by the data-processing inequality, a lower
    bound of the full divergence: what a top-k cache can give without storing every logit.
    Returns the sum over the ``N`` rows (callers divide by the token count).
    """
    full = values.shape[-1] >= student.shape[-1]
    log_p = values.float() - lse.float()[:, None]  # teacher log-probabilities of its top-k
    log_q, log_q_rest = _buckets(student, index, temperature, full)
    p, q = log_p.exp(), log_q.exp()
    if not full:
        # the teacher's mass outside its top-k; floored so a log of it stays finite when top-k holds it all
        p_rest = (1 - p.sum(-1)).clamp(min=1e-12)
        log_p, log_q = torch.cat([log_p, p_rest.log()[:, None]], -1), torch.cat([log_q, log_q_rest[:, None]], -1)
        p, q = torch.cat([p, p_rest[:, None]], -1), log_q.exp()
    if kind == "kl":
        loss = (p * (log_p - log_q)).sum(-1)
    elif kind == "reverse_kl":
        loss = (q * (log_q - log_p)).sum(-1)
    elif kind == "js":
        log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0))
        loss = 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (q * (log_q - log_m)).sum(-1)
    else:
        raise ValueError(f"unknown KD loss '{kind}'; choose one of {', '.join(KD_LOSSES)}")
    return loss.sum() * temperature**2


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Mean hidden-state distance between student and teacher block outputs ``(..., H)``.

    ``mse``: the mean squared error divided by the teacher's mean square (a constant per batch), so
    blocks whose outputs carry large activations do not outweigh the others; ``cosine``: the mean
    of ``1 − cos`` over tokens.
    """
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return (s - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-12)
    if kind == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean()
    raise ValueError(f"unknown hidden-state loss '{kind}'; choose one of {', '.join(HIDDEN_LOSSES)}")


class _ChunkedHeadLoss(torch.autograd.Function):
    """A loss of the head's logits, with its gradient computed chunk by chunk in the forward pass.

    The ``(N, V)`` logits never exist at once (400 MB in float32 for a 2048-token window of a
    49k vocabulary): each chunk's logits are made, its loss and gradient taken, and freed. The
    gradients of the hidden states and of the head's trainable parameters are kept and scaled by
    the incoming gradient in the backward pass, so nothing is computed twice.
    """

    @staticmethod
    def forward(ctx, hidden, head: Callable, loss: Callable, chunk: int, *params):
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        trainable = [p for p in params if p.requires_grad]
        grads = [torch.zeros_like(p) for p in trainable]
        total = hidden.new_zeros((), dtype=torch.float32)
        for a in range(0, hidden.shape[0], chunk):
            with torch.enable_grad():
                h = hidden[a : a + chunk].detach().requires_grad_(hidden.requires_grad)
                value = loss(head(h), a, a + h.shape[0])
                wrt = ([h] if hidden.requires_grad else []) + trainable
                found = torch.autograd.grad(value, wrt, allow_unused=True) if wrt else ()
            if hidden.requires_grad:
                grad_hidden[a : a + chunk] = found[0]
                found = found[1:]
            for g, f in zip(grads, found):
                if f is not None:
                    g += f
            total += value.detach()
        ctx.trainable = [p.requires_grad for p in params]
        ctx.save_for_backward(*([grad_hidden] if grad_hidden is not None else []), *grads)
        ctx.has_hidden = grad_hidden is not None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        grad_hidden = saved.pop(0) * grad_out if ctx.has_hidden else None
        grads = iter(saved)
        params = [next(grads) * grad_out if t else None for t in ctx.trainable]
        return (grad_hidden, None, None, None, *params)


def chunked_head_loss(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                      loss: Callable[[torch.Tensor, int, int], torch.Tensor], params: Sequence[torch.Tensor],
                      chunk: int = 512) -> torch.Tensor:
    """``Σ loss(head(hidden[a:b]), a, b)`` over row chunks of ``hidden`` ``(N, H)``, differentiable in ``hidden`` and ``params``.

    ``head`` maps hidden rows to logits using ``params`` (the head's parameters, trainable or not);
    ``loss`` gets a chunk's logits and its row range and returns that chunk's scalar share.
    """
    return _ChunkedHeadLoss.apply(hidden, head, loss, chunk, *params)


def next_token_ce(targets: torch.Tensor) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    """The chunk loss of :func:`chunked_head_loss` for summed next-token cross-entropy against ``targets`` ``(N,)``."""

    def loss(logits: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.float(), targets[a:b], reduction="sum")

    return loss
