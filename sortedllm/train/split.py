"""Split optimizer streams: the last exit's gradient and the intermediate exits' gradient each get their own AdamW
moments, so the full model receives the update SFT would give it and the sub-models theirs on top.

Why: AdamW gives every parameter one update of about the learning rate per step, split between the gradients it
sums in proportion to their size. In the shared decoder layers the intermediate exits' gradients are 2-4x the last
exit's on the default model (their losses are 5-15x larger and the final norm rescales the shallower, smaller hidden
states up), so under the paper's joint loss the last exit gets a small share of each update and its loss lags
SFT's. With two streams, each normalised by its own second moment, neither starves the other.

    loss_last, loss_rest = ...                     # from one forward
    optimizer.add_rest(autograd.grad(loss_rest, params, retain_graph=True))
    loss_last.backward(); optimizer.step()         # AdamW on .grad (the last exit), then the rest stream

Weight decay and the learning-rate schedule apply once; the rest stream follows the same schedule (times
`rest_lr_scale`). The rest stream is clipped to `rest_max_grad_norm` on its own and, across data-parallel ranks,
averaged here (DDP averages `.grad` itself; the rest stream never enters `.grad`). Written by hand because no
optimizer in torch or transformers keeps per-source moments for one set of parameters.
"""

from __future__ import annotations

import torch


class SplitAdamW(torch.optim.AdamW):
    """AdamW on `.grad` plus a second, independent AdamW stream fed through `add_rest` (no weight decay there)."""

    def __init__(self, params, *, rest_lr_scale: float = 1.0, rest_max_grad_norm: float | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.rest_lr_scale = rest_lr_scale
        self.rest_max_grad_norm = rest_max_grad_norm
        # accumulated rest-stream gradients until the next step; kept out of `state`, whose emptiness tells AdamW
        # that a parameter is new
        self.rest_grads: dict[torch.nn.Parameter, torch.Tensor] = {}

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def add_rest(self, grads) -> None:
        """Accumulate one micro-batch's rest-stream gradients, in `parameters()` order (None = not reached)."""
        for p, g in zip(self.parameters(), grads):
            if g is None:
                continue
            if p in self.rest_grads:
                self.rest_grads[p].add_(g)
            else:
                self.rest_grads[p] = g.detach().clone()

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self._rest_step()
        return loss

    def _rest_grads(self) -> list[tuple[torch.nn.Parameter, torch.Tensor, dict]]:
        found = [(p, self.rest_grads.pop(p), group) for group in self.param_groups for p in group["params"]
                 if p in self.rest_grads]
        if not found:
            return found
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flat = torch.cat([g.reshape(-1) for _, g, _ in found])
            torch.distributed.all_reduce(flat)
            flat /= torch.distributed.get_world_size()
            offset = 0
            for _, g, _ in found:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        if self.rest_max_grad_norm:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for _, g, _ in found]))
            scale = (self.rest_max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for _, g, _ in found:
                g.mul_(scale)
        return found

    def _rest_step(self) -> None:
        for p, g, group in self._rest_grads():
            beta1, beta2 = group["betas"]
            state = self.state[p]
            if "rest_step" not in state:
                state["rest_step"] = 0
                state["rest_exp_avg"] = torch.zeros_like(p)
                state["rest_exp_avg_sq"] = torch.zeros_like(p)
            state["rest_step"] += 1
            t = state["rest_step"]
            m, v = state["rest_exp_avg"], state["rest_exp_avg_sq"]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
            lr = float(group["lr"]) * self.rest_lr_scale / (1 - beta1 ** t)
            p.addcdiv_(m, denom, value=-lr)
