"""How large an adapter's numbers may be: weights within the serving dtype, a bounded effect on each layer.

A finite adapter can still break serving: weights beyond float16's range become
Inf in the GPU slot, and a huge `scaling * B @ A` turns activations into Inf and
then NaN, which poisons the KV cache. `load_adapter` refuses both with
`AdapterRangeError`, using these checks.
"""

import math
from dataclasses import dataclass

import torch

from multilora.errors import AdapterRangeError, AdapterWeightsError

# The largest effect an adapter may have on one layer: the spectral norm of scaling * B @ A (how many times
# the input's norm the layer's output can change by), and of A alone (the rank-r intermediate). Trained
# adapters measure 3 to 7 (models/demo-adapters); 1e3 leaves them two orders of magnitude and refuses
# weights that would overflow half precision or swamp the base model.
MAX_DELTA_NORM = 1e3
# The serving dtype whose range weights must fit when the caller does not name one: the narrowest we serve.
DEFAULT_SERVING_DTYPE = torch.float16


@dataclass(frozen=True)
class WeightLimits:
    finfo: torch.finfo        # of the serving dtype
    max_delta_norm: float


def frobenius_norms(tensors: list[torch.Tensor]) -> list[float]:
    """sqrt(sum of squares) of each tensor, accumulated in float32 whatever its dtype, in one call; for
    bfloat16 tensors an upper bound of it, at most 2% above (below).

    Non-finite when a value is NaN or Inf, or when the squares overflow float32 (values past ~1e19)."""
    if not tensors:
        return []
    if all(t.dtype == torch.bfloat16 for t in tensors):
        # Norms of bfloat16 tensors accumulate in float32 as well, and asked for in float32 they take ~2.5x
        # the time (an 8B adapter's: 15 ms against 6). Their bfloat16 result, within 2^-8 of the float32
        # norm (2^-7 if truncated), is raised by 2^-6 so that it still bounds it: each use is as a bound.
        return [norm * (1 + 2 ** -6) for norm in torch.stack(torch._foreach_norm(tensors, 2)).tolist()]
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).tolist()


def check_values(weights: torch.Tensor, shown: str, name: str, finfo: torch.finfo, norm: float) -> float:
    """Every value finite and representable in the serving dtype of `finfo`; returns the Frobenius norm.

    `norm`: the tensor's `frobenius_norms` entry (for bfloat16, a bound slightly above; returned as it is).
    A finite norm within the dtype's range bounds every value, so only otherwise are the values
    themselves looked at, to say exactly what is wrong.
    """
    if math.isfinite(norm) and norm <= finfo.max:
        return norm
    if not torch.isfinite(weights).all():
        raise AdapterWeightsError(
            f"adapter '{name}': tensor {shown} contains NaN or Inf values; fix or retrain the adapter")
    largest = weights.abs().max().item()
    if largest > finfo.max:
        raise AdapterRangeError(
            f"adapter '{name}': tensor {shown} holds {largest:.3g}, beyond the largest {finfo.dtype} "
            f"({finfo.max:.3g}) the engine may compute in; this is not a trained adapter, fix or retrain it")
    return torch.linalg.vector_norm(weights, dtype=torch.float64).item()   # squares past float32's range


def check_effect(a: torch.Tensor, b: torch.Tensor, scaling: float, module_key: str, name: str,
                 max_delta_norm: float, a_frobenius: float, b_frobenius: float) -> None:
    """Spectral norms of A and of scaling * B @ A at most `max_delta_norm`, without forming B @ A ([out, in]).

    `a_frobenius`, `b_frobenius`: their Frobenius norms (`check_values`), which bound the spectral
    ones from above: trained adapters pass on them, and only the others need the exact norms.
    """
    if a_frobenius <= max_delta_norm and scaling * a_frobenius * b_frobenius <= max_delta_norm:
        return
    # Exact, from r x r Gram matrices: ||A||^2 = max eig(A A^T), ||B A||^2 = max eig(S B^T B S) with
    # S = (A A^T)^(1/2). A and B are first divided by their largest value, so float32 cannot overflow
    # whatever the serving dtype allows, and the scales are multiplied back in Python floats.
    a, b = a.float(), b.float()
    a_max, b_max = a.abs().max().item() or 1.0, b.abs().max().item() or 1.0
    a1, b1 = a / a_max, b / b_max
    try:
        eigenvalues, vectors = torch.linalg.eigh(a1 @ a1.T)
        root = (vectors * eigenvalues.clamp(min=0).sqrt()) @ vectors.T
        a_norm = a_max * eigenvalues.max().clamp(min=0).sqrt().item()
        delta_unit = torch.linalg.eigvalsh(root @ (b1.T @ b1) @ root).max().clamp(min=0).sqrt().item()
        delta = scaling * a_max * b_max * delta_unit
    except torch.linalg.LinAlgError:     # no convergence: only for matrices far from anything trained
        a_norm = delta = float("nan")
    for what, norm in (("scaling * B @ A", delta), ("lora_A", a_norm)):
        if not norm <= max_delta_norm:   # NaN counts as too large
            raise AdapterRangeError(
                f"adapter '{name}': the spectral norm of {what} for '{module_key}' is {norm:.3g}, above the "
                f"limit {max_delta_norm:g} (trained adapters stay far below it); fix or retrain the adapter, "
                "or ask the operator to raise the limit")
