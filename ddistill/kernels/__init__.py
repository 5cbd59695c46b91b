"""Fused linear + vocabulary-loss kernels (Triton) with pure-torch references (``impl="torch"``) and a row-chunked
cuBLAS path that forms the gradient in the forward (``impl="chunked"``, ``chunked.py``).

Every public loss takes plain tensors (hidden states, a possibly padded output weight of shape (V_pad, d), an
optional bias, the real ``vocab_size``) and returns a scalar; none of them owns parameters, so they work under
ZeRO-2 and inside a ZeRO-3 module's forward (with a gathered weight).
"""

import os

import torch

# Without a GPU the kernels only run in Triton's interpreter, which must be on before triton is first imported
# (triton.language's own @jit helpers such as tl.sum are decorated at import time).
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

from ddistill.kernels.distill import dimo_generator_loss, distill_loss  # noqa: E402
from ddistill.kernels.masked_diffusion import masked_diffusion_loss  # noqa: E402
from ddistill.kernels.uniform_elbo import uniform_elbo_loss  # noqa: E402

__all__ = ["dimo_generator_loss", "distill_loss", "masked_diffusion_loss", "uniform_elbo_loss"]
