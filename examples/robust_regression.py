"""A complete custom fitness plug-in: discover a regression loss that is robust to outliers.

Run it with:
    python -m engine run --fitness examples/robust_regression.py:RobustRegression --pop 4 --gens 3
"""
import torch

from fitness import Descriptor, Fitness, Interface, Score, Seed


class RegressionInterface(Interface):
    signature = "def loss(pred, target)"
    description = (
        "Write a regression loss. pred and target are float tensors of shape (batch,); return the "
        "per-example losses, shape (batch,), differentiable with respect to pred. 10% of the "
        "training targets are corrupted by large outliers."
    )
    example = "def mse(pred, target):\n    return (pred - target) ** 2\n"
    arg_counts = (2,)

    def sample_inputs(self, batch_size, generator):
        pred = torch.randn(batch_size, generator=generator).requires_grad_()
        target = 3 * torch.randn(batch_size, generator=generator)
        return {"pred": pred, "target": target}


class RobustRegression(Fitness):
    name = "robust-regression"
    interface = RegressionInterface()
    baseline = "mse"
    # One behaviour axis: how much faster than linearly the loss grows for big residuals.
    descriptor_space = (Descriptor("growth", 0.0, 4.0, 4, "log2 of loss(8) / loss(4)"),)
    fitness_floor = -10.0

    def seeds(self):
        return [
            Seed("mse", "def mse(pred, target):\n    return (pred - target) ** 2\n", "squared error"),
            Seed("mae", "def mae(pred, target):\n    return (pred - target).abs()\n", "absolute error"),
        ]

    def descriptors(self, fn):
        big = fn(torch.tensor([8.0]), torch.tensor([0.0])).item()
        small = fn(torch.tensor([4.0]), torch.tensor([0.0])).item()
        return {"growth": float(torch.log2(torch.tensor(abs(big) / max(abs(small), 1e-9))))}

    def evaluate(self, fn, seed):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(256, 5, generator=generator)
        true_w = torch.randn(5, generator=generator)
        y = x @ true_w + 0.1 * torch.randn(256, generator=generator)
        outliers = torch.rand(256, generator=generator) < 0.1
        y_train = torch.where(outliers, y + 30 * torch.randn(256, generator=generator), y)
        w = torch.zeros(5, requires_grad=True)
        optimiser = torch.optim.Adam([w], lr=0.05)
        for _ in range(200):
            optimiser.zero_grad()
            fn(x @ w, y_train).mean().backward()
            optimiser.step()
        error = ((w.detach() - true_w) ** 2).sum().item()
        # Higher is better: the negative log10 of the weight error on the clean model.
        return Score(fitness=-float(torch.log10(torch.tensor(error + 1e-12))), metrics={"weight_error": error})
