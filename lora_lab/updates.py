"""What a trained LoRA update looks like (chapter 10).

Its size next to the weight it changes, layer by layer; the directions it uses and how two
adapters share them (Hu et al. 2021, section 7.2); how it sits inside the weight (their
section 7.3: the weight projected onto the update's directions, and the amplification
factor); and how far AdamW moves one entry in one step. Matrices are compared in float64 on
the CPU, so rounding never passes for structure.
"""

import contextlib

import torch

from .validate import int_at_least, int_between, matrix, module

# ----------------------------------------------------------------------------- inputs


def _lora_layer(name, layer):
    from .lora import LoRALinear

    if not isinstance(layer, LoRALinear):
        raise TypeError(f"{name} must be a lora_lab LoRALinear, got {type(layer).__name__}")


# ----------------------------------------------------------------------------- one layer


def weight_of(layer):
    """The frozen weight W of a LoRALinear as (out, in) in float64 (a Conv1D's is transposed)."""
    _lora_layer("layer", layer)
    W = layer.base_layer.weight.detach().cpu().double()
    return W.T if layer.fan_in_fan_out else W  # Conv1D stores (in, out)


def delta_of(layer):
    """The update ``scaling * B @ A`` of a LoRALinear as (out, in), in float64 from the factors."""
    _lora_layer("layer", layer)
    A = layer.lora_A.weight.detach().cpu().double()  # (r, in)
    B = layer.lora_B.weight.detach().cpu().double()  # (out, r)
    return layer.scaling * (B @ A)


def top_directions(M, r):
    """The top ``r`` left and right singular vectors of ``M``, as columns: (out, r) and (in, r)."""
    matrix("M", M)
    int_between("r", r, 1, min(M.shape))
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)  # (out, k), (k,), (k, in)
    return U[:, :r], Vh[:r].T


def projection_norm(W, U, V):
    """``||U^T W V||_F``: how much of W acts from the columns of V into those of U."""
    matrix("W", W)
    matrix("U", U)
    matrix("V", V)
    if U.shape[0] != W.shape[0] or V.shape[0] != W.shape[1]:
        raise ValueError(
            f"U must have W's {W.shape[0]} rows and V its {W.shape[1]} columns as rows, got "
            f"U {tuple(U.shape)} and V {tuple(V.shape)} for W {tuple(W.shape)}"
        )
    return torch.linalg.matrix_norm(U.T @ W @ V).item()


def amplification_factor(W, delta, r):
    """``||delta||_F / ||U^T W V||_F`` with U, V the top ``r`` singular directions of ``delta``.

    Hu et al. (2021, section 7.3 and appendix H.4): how strongly the update amplifies the
    directions it acts on, against what W already does along them.
    """
    matrix("W", W)
    matrix("delta", delta)
    if W.shape != delta.shape:
        raise ValueError(f"W {tuple(W.shape)} and delta {tuple(delta.shape)} must match")
    U, V = top_directions(delta, r)
    return (torch.linalg.matrix_norm(delta) / projection_norm(W, U, V)).item()


def random_projection_norm(W, r, *, trials=10, generator=None):
    """Mean ``||U^T W V||_F`` over ``trials`` random r-dimensional subspaces U and V (chance).

    On average ``||U^T W V||_F^2 = r^2 ||W||_F^2 / (d_out d_in)``: each side keeps r/d of W.
    """
    matrix("W", W)
    int_between("r", r, 1, min(W.shape))
    int_at_least("trials", trials)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
    out, inp = W.shape
    kw = {"generator": generator, "dtype": torch.float64}
    U = torch.linalg.qr(torch.randn(trials, out, r, **kw))[
        0
    ]  # orthonormal columns, (trials, out, r)
    V = torch.linalg.qr(torch.randn(trials, inp, r, **kw))[0]  # (trials, in, r)
    return torch.linalg.matrix_norm(U.transpose(1, 2) @ W.double().cpu() @ V).mean().item()


def compare_with_weight(layer, *, trials=10, generator=None):
    """The LoRA paper's Table 7 for one LoRALinear, at its own rank r.

    ``||U^T W V||_F`` with U, V the top r directions of the update, of W itself (the most any
    r directions can hold) and of random subspaces (chance), next to ``||delta||_F``, and the
    amplification factor ``||delta||_F / ||U^T W V||_F`` of the update's directions.
    """
    W, delta, r = weight_of(layer), delta_of(layer), layer.rank
    own = projection_norm(W, *top_directions(delta, r))
    return {
        "||dW||_F": torch.linalg.matrix_norm(delta).item(),
        "dW's directions": own,
        "W's directions": projection_norm(W, *top_directions(W, r)),
        "random directions": random_projection_norm(W, r, trials=trials, generator=generator),
        "amplification": torch.linalg.matrix_norm(delta).item() / own,
    }


# ----------------------------------------------------------------------------- two subspaces


def subspace_similarity(U, V):
    """``phi(i, j) = ||U[:, :i]^T V[:, :j]||_F^2 / min(i, j)`` for every i and j, as a tensor.

    U (d, p) and V (d, q) have orthonormal columns, strongest first (Hu et al. 2021, section
    7.2). Returns (p, q): entry [i-1, j-1] is phi(i, j), 1 when one subspace holds the other,
    0 when they are orthogonal.
    """
    matrix("U", U)
    matrix("V", V)
    if U.shape[0] != V.shape[0]:
        raise ValueError(
            f"U and V must live in the same space (same rows), got {tuple(U.shape)} and "
            f"{tuple(V.shape)}"
        )
    cos2 = (U.T @ V).square()  # (p, q) squared cosines between single directions
    captured = cos2.cumsum(0).cumsum(1)  # ||U_i^T V_j||_F^2 for every (i, j)
    i = torch.arange(1, U.shape[1] + 1, device=U.device)[:, None]
    j = torch.arange(1, V.shape[1] + 1, device=U.device)[None, :]
    return captured / torch.minimum(i, j)


def chance_similarity(d, p, q):
    """Expected ``phi(i, j)`` between random subspaces of R^d: ``max(i, j) / d``, as (p, q)."""
    int_at_least("d", d)
    int_between("p", p, 1, d)
    int_between("q", q, 1, d)
    i = torch.arange(1, p + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, q + 1, dtype=torch.float64)[None, :]
    return torch.maximum(i, j) / d


# ----------------------------------------------------------------------------- a whole model


def block_and_module(spec, name):
    """'model.layers.3.mlp.down_proj' -> (3, 'down_proj') for a model of ``spec``.

    The module keeps its parent's name where two of a block's layers end alike (GPT-2's
    'attn.c_proj' and 'mlp.c_proj').
    """
    from .specs import ModelSpec

    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    relative = list(spec.linear_layers())
    for i in range(spec.num_layers):
        prefix = spec.layer_prefix(i)
        if name.startswith(prefix) and name[len(prefix) :] in relative:
            rel = name[len(prefix) :]
            last = rel.rsplit(".", 1)[-1]
            unique = sum(r.rsplit(".", 1)[-1] == last for r in relative) == 1
            return i, last if unique else rel
    raise ValueError(
        f"name {name!r} is no linear layer of a block; those are named like "
        f"{spec.layer_prefix(0) + relative[0]!r}"
    )


def relative_update(model):
    """DataFrame (blocks x modules) of ``||delta||_F / ||W||_F`` for every LoRA layer of ``model``."""
    import pandas as pd

    from .lora import lora_layers
    from .specs import ModelSpec

    module("model", model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear layers (call apply_lora first)")
    spec = ModelSpec.from_model(model)
    rows = {}
    for name, layer in layers.items():
        block, kind = block_and_module(spec, name)
        size = torch.linalg.matrix_norm(delta_of(layer)) / torch.linalg.matrix_norm(
            weight_of(layer)
        )
        rows.setdefault(block, {})[kind] = size.item()
    return pd.DataFrame.from_dict(rows, orient="index").sort_index()


# ----------------------------------------------------------------------------- AdamW's steps


def adam_step_sizes(gradients, *, betas=(0.9, 0.999), eps=1e-8):
    """``|step| / lr`` of each step torch's AdamW takes on one number fed ``gradients`` in turn.

    That is ``|m_hat / (sqrt(v_hat) + eps)|``: 1 at the first step, and after it whatever the
    history of the gradient makes it (no weight decay, a constant learning rate).
    """
    values = [float(g) for g in gradients]
    if not values:
        raise ValueError("gradients must hold at least one number, got none")
    theta = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.AdamW([theta], lr=1.0, betas=betas, eps=eps, weight_decay=0.0)
    sizes = []
    for g in values:
        before = theta.detach().clone()
        theta.grad = torch.tensor([g], dtype=torch.float64)
        optimizer.step()
        sizes.append((theta.detach() - before).abs().item())  # lr = 1
    return sizes


@contextlib.contextmanager
def largest_steps(params):
    """Within the block, record the largest |change| of any entry of ``params`` at each step.

    Yields a list that grows by one number per ``optimizer.step()`` (any torch optimizer,
    through torch's global step hooks), so a training loop needs no change to be watched.
    """
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    params = list(params)
    if not params or not all(isinstance(p, torch.Tensor) for p in params):
        raise ValueError("params must be a non-empty iterable of tensors (the trained ones)")
    steps, before = [], []

    def snapshot(optimizer, args, kwargs):
        before[:] = [p.detach().clone() for p in params]

    def measure(optimizer, args, kwargs):
        steps.append(
            max((p.detach() - b).abs().max().item() for p, b in zip(params, before, strict=True))
        )

    hooks = (register_optimizer_step_pre_hook(snapshot), register_optimizer_step_post_hook(measure))
    try:
        yield steps
    finally:
        for hook in hooks:
            hook.remove()
