"""A classification task with a planted low-rank structure, and a model that sees it.

Inputs are ``x = z·A + ε``: ``r`` latent factors spread over ``d`` features (``A`` has
orthogonal rows), plus isotropic noise; labels depend on ``z`` only. ``Net`` maps the
inputs through an orthogonal (frozen) ``d × d`` layer, so its hidden covariance is the
planted rank-``r`` signal over isotropic noise: RMT-KD should narrow that layer to ``r``.
"""

import torch
from torch import nn

RANK = 4


def planted(n=4000, d=48, r=RANK, classes=4, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(d, r, generator=g))[0].T * 3
    z = torch.randn(n, r, generator=g)
    x = z @ a + noise * torch.randn(n, d, generator=g)
    y = (z @ torch.randn(r, classes, generator=g)).argmax(1)
    return x, y


class Net(nn.Module):
    def __init__(self, d=48, classes=4, depth=1):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.head = nn.Linear(d, classes)
        for layer in self.hidden:
            nn.init.orthogonal_(layer.weight)

    def forward(self, x):
        for layer in self.hidden:
            x = layer(x)
        return self.head(x)


def task(batch=100):
    """(train batches, val batches) of the planted task."""
    x, y = planted()
    train = [(x[i:i + batch], y[i:i + batch]) for i in range(0, 3000, batch)]
    val = [(x[i:i + 500], y[i:i + 500]) for i in range(3000, 4000, 500)]
    return train, val


def trained(depth=1, seed=0):
    """A ``Net`` whose head is trained on the planted task (hidden layers frozen, orthogonal)."""
    import fxcompress

    torch.manual_seed(seed)
    net = Net(depth=depth)
    for p in net.hidden.parameters():
        p.requires_grad_(False)
    train, _ = task()
    fxcompress.distill(net, None, train, fxcompress.DistillConfig(alpha=1, epochs=5, lr=1e-2, progress=False))
    for p in net.hidden.parameters():
        p.requires_grad_(True)
    return net
