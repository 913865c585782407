"""Batch normalisation over the whole global batch, on any backend (gloo on CPU included).

With several processes, each ``BatchNorm`` would normalise with its own process's batch statistics, so a
two-process run would not be the one-process run with the whole batch, and the running statistics would
differ between processes. mmseg's UPerNet recipes use SyncBN for this. ``torch.nn.SyncBatchNorm`` runs on
GPUs only; :class:`GlobalBatchNorm` does the same with an autograd-aware all-reduce of the per-channel sums
(sum, sum of squares, count), so it also runs in the CPU tests. :func:`convert_batchnorm` swaps it in (torch's
SyncBatchNorm on CUDA, where its fused kernels are faster).
"""

from __future__ import annotations

import torch
from torch import nn


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm whose training statistics are those of the batch of every process together.

    Input (B, C, ...). In eval mode, or outside a process group of several processes, it is a plain
    BatchNorm. Running statistics are updated with the global mean and the unbiased global variance, the
    same on every process.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (B, C, ...), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        self._check_input_dim(input)
        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.training and several):
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x = input.float()
        count = torch.tensor([x.numel() / channels], dtype=torch.float32, device=x.device)
        # Two passes (the mean, then the squared deviations from it) rather than E[x^2] - E[x]^2, whose
        # cancellation in float32 would make the statistics depend on how the batch is split.
        packed = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        total = packed[-1]
        mean = packed[:channels] / total
        shape = [1, channels] + [1] * (input.dim() - 2)
        centered = x - mean.view(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims)) / total
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), momentum)
                self.num_batches_tracked += 1
        out = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, with the gradient summed back over processes: every process's loss depends on every
    process's statistics, so each input receives the gradient of all the losses (as in SyncBatchNorm)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        total = grad.clone()
        dist.all_reduce(total)
        return total


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by one that normalises over all processes (in place for
    children; returns the possibly new root). Parameters and running statistics are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        converted.to(module.running_mean.device if module.running_mean is not None else module.weight.device)
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        for new, old in zip(converted.parameters(), module.parameters()):
            new.requires_grad_(old.requires_grad)
        return converted
    for name, child in module.named_children():
        replaced = convert_batchnorm(child, device)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


__all__ = ["GlobalBatchNorm", "convert_batchnorm"]
