"""
Muon (Jordan et al. 2024, as modded-nanogpt and nanochat use it): the hidden weight matrices take
momentum steps whose update is orthogonalised; everything else (embeddings, the output head, norm
gains) takes AdamW steps. One optimizer object holds both kinds of parameter group, so the training
loop sees a single optimizer.

Why. A gradient step on a matrix is dominated by a few directions (its largest singular values);
replacing the update G = U S V^T by its orthogonal part U V^T gives every direction the same step
size, so directions that the plain update neglects learn too. Five Newton-Schulz iterations
approximate U V^T with matrix products only (no SVD), cheap next to a forward and backward pass.
Embedding and head rows are not hidden transforms (each row is one token), so they stay on AdamW.
"""

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of Jordan et al.: fast to converge near 0


def orthogonalize(g, steps=5):
    """Approximately U V^T for g = U S V^T, by the Newton-Schulz iteration X <- aX + (bA + cA^2)X with
    A = X X^T. The singular values of X / ||X|| lie in (0, 1] and the quintic pushes each towards 1
    (to within about 0.7..1.2, which works as well as exact orthogonality and needs fewer steps)."""
    a, b, c = NS_COEFFICIENTS
    x = g.float() if g.device.type == "cpu" else g.bfloat16()  # bf16 on GPUs, as Muon's authors do
    wide = x.shape[0] > x.shape[1]
    if wide:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return (x.T if wide else x).to(g.dtype)


class MuonWithAdamW(torch.optim.Optimizer):
    """Parameter groups with use_muon=True take Muon steps (lr, momentum, weight_decay); the others
    AdamW steps (lr, betas, eps, weight_decay). A group's lr is what the loop sets it to each step."""

    def __init__(self, groups):
        for group in groups:
            group.setdefault("use_muon", False)
            if group["use_muon"]:
                group.setdefault("momentum", 0.95)
            else:
                group.setdefault("betas", (0.9, 0.95))
                group.setdefault("eps", 1e-8)
        super().__init__(groups, dict(lr=0.02, weight_decay=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (self._muon if group["use_muon"] else self._adamw)(group)

    def _muon(self, group):
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - group["momentum"])
            update = p.grad.lerp(buf, group["momentum"])  # Nesterov: look one momentum step ahead
            # an orthogonal [rows, cols] update has entries of size ~1/sqrt(max(rows, cols)): scaling
            # by sqrt(rows/cols) for tall matrices keeps the per-entry step the same for every shape
            scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(orthogonalize(update), alpha=-group["lr"] * scale)

    def _adamw(self, group):
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0  # a Python number: reading a tensor's would sync the GPU every step
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = state["step"]
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** step))
