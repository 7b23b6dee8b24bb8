"""DeepSets set function: rho(SUM_x concat(psi(x), x))."""
import torch
import torch.nn as nn


class SetFunction(nn.Module):
    """psi: Linear(d, 2d) -> ReLU -> Linear(2d, 2d) -> ReLU; rho: Linear(3d, 2d) -> ReLU -> Linear(2d, out).

    forward(x): x (..., set_size, d) -> (..., out). The set is pooled by a *sum* (not a mean) of
    concat(psi(x), x), psi's output first.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.psi = nn.Sequential(nn.Linear(in_dim, 2 * in_dim), nn.ReLU(),
                                 nn.Linear(2 * in_dim, 2 * in_dim), nn.ReLU())
        self.rho = nn.Sequential(nn.Linear(3 * in_dim, 2 * in_dim), nn.ReLU(),
                                 nn.Linear(2 * in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.cat([self.psi(x), x], dim=-1).sum(dim=-2)  # (..., 3d)
        return self.rho(z)  # (..., out)
