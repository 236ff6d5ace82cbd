"""
The optimizer of a run (make_optimizer): AdamW (--optimizer adamw, happy-llm's), or Muon for the
hidden matrices with AdamW for the rest (--optimizer muon).

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

from core.runtime import bf16_supported

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of Jordan et al.: fast to converge near 0


def orthogonalize(g, steps=5, dtype=torch.bfloat16):
    """Approximately U V^T for g = U S V^T, by the Newton-Schulz iteration X <- aX + (bA + cA^2)X with
    A = X X^T. The singular values of X / ||X|| lie in (0, 1] and the quintic pushes each towards 1
    (to within about 0.7..1.2, which works as well as exact orthogonality and needs fewer steps).
    dtype: bf16, as Muon's authors run it, where the hardware has it (twice the matmul speed)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return (x.T if tall else x).to(g.dtype)


class MuonWithAdamW(torch.optim.Optimizer):
    """Parameter groups with use_muon=True take Muon steps (lr, momentum, weight_decay); the others
    AdamW steps (lr, betas, eps, weight_decay). A group's lr is what the loop sets it to each step."""

    def __init__(self, groups):
        device = next(p for group in groups for p in group["params"]).device
        self.ns_dtype = torch.bfloat16 if bf16_supported(device) else torch.float32
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
            p.add_(orthogonalize(update, dtype=self.ns_dtype), alpha=-group["lr"] * scale)

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


def make_optimizer(model, cfg, device):
    # decay the matrices (embeddings, linear layers) only: shrinking norm gains and biases towards
    # zero fights the normalisation and gains nothing
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    vectors = [p for p in params.values() if p.dim() < 2]
    if cfg.optimizer == "muon":
        # the hidden matrices take Muon steps; the embedding (tied to the head) stays on AdamW, at its
        # own rate (--embedding_lr): Adam moves each entry by about the rate per step whatever the
        # gradient's scale, and the entries start at ~0.02, so at the rate of the rest a row takes tens
        # of steps to move by its own size (nanochat and modded-nanogpt also give the embedding a rate
        # far above the rest's; measured in bench/RESULTS.md, "Learning quality").
        # lr_scale: the loop sets every group's lr from one schedule, times the group's scale
        per_token = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        per_token.add(id(model.output.weight))
        hidden = [p for p in params.values() if p.dim() >= 2 and id(p) not in per_token]
        rows = [p for p in params.values() if p.dim() >= 2 and id(p) in per_token]
        embedding_lr = cfg.learning_rate if cfg.embedding_lr is None else cfg.embedding_lr
        return MuonWithAdamW([
            {"params": hidden, "use_muon": True, "weight_decay": cfg.weight_decay,
             "lr_scale": cfg.muon_lr / cfg.learning_rate},
            {"params": rows, "weight_decay": cfg.weight_decay,
             "lr_scale": embedding_lr / cfg.learning_rate},
            {"params": vectors, "weight_decay": 0.0}])
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    # fused: one kernel for the whole update instead of several per parameter
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type in ("cuda", "cpu"))
