"""Built-in models and user model factories."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from gradwatch.spec import CharTransformerModel, CNNModel, MLPModel, ModelSpec
from workers.data import DataBundle, load_factory

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}


class MLP(nn.Module):
    def __init__(
        self,
        in_features: int,
        hidden: list[int],
        out_features: int,
        activation: str = "relu",
        dropout: float = 0.0,
        init_gain: float = 1.0,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)
        if init_gain != 1.0:
            with torch.no_grad():
                for module in self.net:
                    if isinstance(module, nn.Linear):
                        module.weight.mul_(init_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        channels: list[int],
        kernel_size: int,
        hidden: int,
        out_features: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        c, h, w = input_shape if len(input_shape) == 3 else (1, *input_shape)
        convs: list[nn.Module] = []
        for out_c in channels:
            convs += [nn.Conv2d(c, out_c, kernel_size, padding=kernel_size // 2), nn.ReLU()]
            if min(h, w) >= 4:
                convs.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out_c
        self.features = nn.Sequential(*convs)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_features)
        )
        self._shape = (c, *input_shape[-2:]) if len(input_shape) == 3 else (1, *input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.head(self.features(x))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = nn.MultiheadAttention(n_embd, n_head, dropout=dropout, batch_first=True)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class CharTransformer(nn.Module):
    """A small GPT: token + position embeddings, pre-norm causal blocks, tied output head."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float = 0.0):
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=idx.device), diagonal=1)
        x = self.drop(self.tok(idx) + self.pos(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


def build_model(spec: ModelSpec, data: DataBundle) -> nn.Module:
    """The spec's `model` section and the data's shape -> an nn.Module."""
    if isinstance(spec, MLPModel):
        return MLP(
            math.prod(data.input_shape), spec.hidden, data.num_outputs, spec.activation, spec.dropout, spec.init_gain
        )
    if isinstance(spec, CNNModel):
        return CNN(data.input_shape, spec.channels, spec.kernel_size, spec.hidden, data.num_outputs, spec.dropout)
    if isinstance(spec, CharTransformerModel):
        block = data.input_shape[0]
        if spec.block_size < block:
            raise ValueError(f"model.block_size ({spec.block_size}) is shorter than data.block_size ({block})")
        return CharTransformer(data.num_outputs, spec.block_size, spec.n_layer, spec.n_head, spec.n_embd, spec.dropout)
    model = load_factory(spec.name)(**spec.options, data_info=data)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {spec.name} must return a torch.nn.Module, got {type(model).__name__}")
    return model


def loss_and_correct(task: str, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean loss of the batch and, for classification tasks, the number of correct predictions."""
    if task == "regression":
        return F.mse_loss(logits.float(), y.float()), None
    if task == "language_model":
        flat = logits.float().reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, y.reshape(-1)), (flat.argmax(-1) == y.reshape(-1)).sum()
    logits = logits.float()
    return F.cross_entropy(logits, y), (logits.argmax(-1) == y).sum()
