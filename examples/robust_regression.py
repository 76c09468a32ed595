"""A complete custom fitness plug-in: discover a regression loss that is robust to outliers.

Run it with:
    python -m engine run --fitness examples/robust_regression.py:RobustRegression --pop 4 --gens 3

It follows the two-phase contract (docs/plugins.md): ``train`` fits a linear model with the
candidate loss on data with outliers and returns the weights; ``score`` compares them with the
clean weights, which only the trusted phase holds (``self.held_out``).
"""
import torch

from fitness import Descriptor, Fitness, Interface, Score, Seed
from fitness.base import TensorSpec


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

    # -- data: what training sees, and the clean weights only scoring sees --------------------
    def _make(self, seed):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(256, 5, generator=generator)
        true_w = torch.randn(5, generator=generator)
        y = x @ true_w + 0.1 * torch.randn(256, generator=generator)
        outliers = torch.rand(256, generator=generator) < 0.1
        y_train = torch.where(outliers, y + 30 * torch.randn(256, generator=generator), y)
        return x, y_train, true_w

    def _training_data(self, seed):
        cached = self.__dict__.get("_training")
        if cached is None or cached[0] != seed:
            x, y_train, true_w = self._make(seed)
            cached = self._training = (seed, x, y_train)
            if not self.held_out.wiped:  # in a genome's process it is wiped: never refill it there
                self.held_out.put(seed, true_w)
        return cached[1], cached[2]

    def prepare(self, seed):
        self._training_data(seed)  # built once in the warm worker, inherited by each genome's process

    # -- the two phases ------------------------------------------------------------------------
    def artefact_spec(self, seed):
        return {"w": TensorSpec((5,), torch.float32)}

    def train(self, fn, seed):
        """Untrusted: 200 Adam steps on the mean of the candidate's per-example losses."""
        x, y_train = self._training_data(seed)
        w = torch.zeros(5, requires_grad=True)
        optimiser = torch.optim.Adam([w], lr=0.05)
        for _ in range(200):
            optimiser.zero_grad()
            fn(x @ w, y_train).mean().backward()
            optimiser.step()
        return {"w": w.detach()}

    def score(self, artefacts, seed):
        """Trusted: how close the trained weights are to the clean ones."""
        true_w = self.held_out.get(seed, lambda: self._make(seed)[2])
        error = ((artefacts["w"] - true_w) ** 2).sum().item()
        # Higher is better: the negative log10 of the weight error on the clean model.
        return Score(fitness=-float(torch.log10(torch.tensor(error + 1e-12))), metrics={"weight_error": error})
