"""MoCo v3 style MLP heads (docs/method.md §4): the projector and the predictor."""
from torch import nn


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Bias-free linears with BatchNorm+ReLU between them and a BatchNorm without affine
    after the last one (SimCLR's design, as MoCo v3 and PatchMix use it)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
        if last:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        else:
            layers += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def build_projector(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    """3-layer projector: replaces the ViT classifier head on both encoders."""
    return build_mlp(3, in_dim, hidden_dim, out_dim)


def build_predictor(dim: int = 256, hidden_dim: int = 4096) -> nn.Sequential:
    """2-layer predictor on the base encoder only: maps a projection to a projection (dim → dim)."""
    return build_mlp(2, dim, hidden_dim, dim)
