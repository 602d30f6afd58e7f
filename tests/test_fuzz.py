"""Property-based fuzzing of every public op and every backend that runs on the CPU, against float64.

Each op is a :class:`Op`: ``make(case)`` builds its inputs from a case (sizes, dtypes, temperature, seed:
hypothesis draws the case, the tensors come from a seeded generator, never zeros), ``run(inputs,
backend)`` calls the op and returns its outputs (the loss, then the input gradients of Σ g·loss for
random g, or the state it writes), ``oracle(inputs)`` the same in float64 (tests/oracle.py for InfoNCE,
the momentum update and the queue; moco_fast/reference.py's official formulations on float64 inputs
for the others, which compute in float64 then), and ``official(inputs)`` the official formulation in
the inputs' dtype (fp32 for 16-bit inputs, as the official code would), for the side-by-side table.

Shapes include 1 and odd sizes, K = 0 for InfoNCE, every dtype mix, temperatures 0.01–1. Backends:
"torch", "reference" and "triton" (the interpreter on CPU tensors, tiny shapes, few examples) where the
op's backend declares support (moco_fast.backends.refusal). Error model (docs/design.md, "Numerics"):
‖out − ref‖ ≤ rtol·‖ref‖ + atol, rtol by dtype class (:func:`rtol_for`), atol a few ulps of the
logit scale (the error no fp32 logit can avoid; :func:`Op.atol`). NaN never passes: a non-finite output
fails every comparison, and :func:`test_nonfinite_input_never_gives_a_finite_loss` poisons one input
element with NaN/±Inf and requires an error or a non-finite loss or gradient.

``python tests/test_fuzz.py [--cases N]`` prints the worst relative error per op × backend × dtype mix
over a fixed random sample (seeded, larger shapes), with the official formulation's error on the same
cases: the table of the README's "Numerics" section.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():  # before anything imports triton (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `python tests/test_fuzz.py` finds oracle.py
import oracle  # noqa: E402

import moco_fast  # noqa: E402
from moco_fast import backends  # noqa: E402
from moco_fast import reference as ref  # noqa: E402

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
HALF = (BF16, F16)
DTYPES = (F32, BF16, F16)
EPS = {F64: 2.0**-52, F32: 2.0**-23, BF16: 2.0**-8, F16: 2.0**-11}
#: the subnormal spacing: an output element in a 16-bit dtype cannot be closer than half of it
TINY = {F64: 2.0**-1074, F32: 2.0**-149, BF16: 2.0**-133, F16: 2.0**-24}
CPU = torch.device("cpu")
BACKENDS = ("torch", "reference", "triton")


def rtol_for(dtypes, backend: str) -> float:
    """The documented rtol (docs/design.md "Numerics"): fp32 1e-5, any 16-bit input 1e-2 (outputs and
    gradients returned in a 16-bit dtype carry its rounding; Triton rounds p to the half type for the dot
    of two equal half types)."""
    return 1e-2 if any(d in HALF for d in dtypes) else 1e-5


# ------------------------------------------------------------------------------------------------
# cases and inputs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """What hypothesis draws: sizes (op-specific meaning), dtypes (op-specific), temperature, seed, flags."""

    sizes: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    temperature: float
    seed: int
    flag: bool = False


def unit(gen: torch.Generator, n: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, d) random unit rows (float64 normal, normalized) rounded to ``dtype``."""
    return F.normalize(torch.randn(n, d, generator=gen, dtype=F64), dim=1).to(dtype)


def weights(gen: torch.Generator, n: int) -> torch.Tensor:
    """Upstream gradient weights in [0.5, 1.5] (float64; cast by the caller)."""
    return 0.5 + torch.rand(n, generator=gen, dtype=F64)


def grads_of(fn: Callable, leaves: list[torch.Tensor], w: torch.Tensor | None, wrt: list[bool]) -> list[torch.Tensor]:
    """[value, d(Σ w·value)/d leaf for each leaf marked in ``wrt``]: leaves are cloned (so a poisoned or
    half input is used as given) and made to require grad where marked."""
    xs = [x.detach().clone().requires_grad_(g) for x, g in zip(leaves, wrt)]
    out = fn(*xs)
    total = out.double().sum() if w is None else (out.double() * w.to(out.device)).sum()
    need = [x for x in xs if x.requires_grad]
    gs = torch.autograd.grad(total, need) if need else ()
    return [out.detach()] + [g.detach() for g in gs]


def promote(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the official code computes in: the promotion of the inputs, at least fp32."""
    dt = F32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


# ------------------------------------------------------------------------------------------------
# the ops
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    name: str
    make: Callable[[Case], dict]  # inputs (tensors and scalars) of one case
    run: Callable[[dict, str], list]  # outputs of the op on a backend
    oracle: Callable[[dict], list]  # the same outputs in float64
    official: Callable[[dict], list] | None  # the official formulation (None: no official counterpart)
    contract_op: str | None  # the backend op name of backends.SUPPORT (None: one implementation, "torch")
    sizes: Callable  # hypothesis strategy of Case.sizes (small: Triton interpreter)
    ndtypes: int  # how many dtypes a case draws
    dtype_choices: tuple = DTYPES
    scale: Callable[[dict], float] | None = None  # the logit bound S of the atol (None: no atol)
    grad_scale: Callable[[dict], float] | None = None  # the gradients' (default S/T)
    flag_means: str = ""  # what Case.flag switches (documentation)
    normalizes: bool = False  # normalizes its inputs in their dtype (the logits carry a 16-bit rounding)

    def backends(self) -> tuple[str, ...]:
        return BACKENDS if self.contract_op is not None else ("torch",)

    def supported(self, backend: str, case: Case) -> str | None:
        """None when ``backend`` can run this case here, else why not."""
        if self.contract_op is None:
            return None if backend == "torch" else "one implementation"
        dims = case.sizes[-1] if self.name != "momentum_update" else None
        mode = ("exact" if case.flag else "lerp") if self.name == "momentum_update" else None
        return backends.refusal(backend, self.contract_op, CPU, case.dtypes, dims, True, mode)

    def atol(self, inputs: dict, dtype: torch.dtype, gradient: bool) -> float:
        """8 ulps (of ``dtype``, fp32 at best) of the scale of the loss (S, the norm over rows of the
        logit bound |q_i|·max|x|/T) or of a gradient (S/T): no implementation can do better than the
        rounding of its logits, and an exactly-zero result (one key, one prototype) is held to it."""
        if self.scale is None:
            return 0.0
        s = self.scale(inputs)
        if gradient:
            s = self.grad_scale(inputs) if self.grad_scale is not None else s / inputs["T"]
        return 8.0 * max(EPS[dtype], EPS[F32]) * s


def _sizes(rows=(1, 7), keys=(0, 13), dim=(1, 33)):
    return st.tuples(st.integers(*rows), st.integers(*keys), st.integers(*dim))


TEMPS = st.sampled_from([0.01, 0.03, 0.07, 0.1, 0.2, 0.5, 1.0]) | st.floats(0.01, 1.0)


# --- InfoNCE ------------------------------------------------------------------------------------


def _infonce_make(c: Case) -> dict:
    g = torch.Generator().manual_seed(c.seed)
    B, K, d = c.sizes
    return {
        "q": unit(g, B, d, c.dtypes[0]),
        "k": unit(g, B, d, c.dtypes[0]),
        "n": unit(g, K, d, c.dtypes[1]),
        "w": weights(g, B),
        "T": c.temperature,
        "neg_grad": c.flag,
    }


def _infonce_run(x: dict, backend: str) -> list:
    fn = lambda q, k, n: moco_fast.info_nce(q, k, n, x["T"], reduction="none", backend=backend)  # noqa: E731
    return grads_of(fn, [x["q"], x["k"], x["n"]], x["w"], [True, True, x["neg_grad"]])


def _infonce_oracle(x: dict) -> list:
    fwd = oracle.infonce_forward(x["q"], x["k"], x["n"], 1.0 / x["T"])
    dq, dk, dn = oracle.infonce_grads(x["q"], x["k"], x["n"], 1.0 / x["T"], x["w"], negatives=x["neg_grad"])
    return [fwd.loss, dq, dk] + ([dn] if x["neg_grad"] else [])


def _infonce_official(x: dict) -> list:
    fn = lambda q, k, n: ref.reference_info_nce(q, k, n, x["T"], reduction="none")[0]  # noqa: E731
    return grads_of(fn, [x["q"], x["k"], x["n"]], x["w"], [True, True, x["neg_grad"]])


def _scale_qk(*names):
    """S = ‖(|row_i|·max|key|/T)_i‖ over the query rows (the norm of the logit bound)."""

    def scale(x):
        rows = x[names[0]] if len(names) == 1 else torch.cat([x[n] for n in names])
        return float(rows.double().norm(dim=1).norm()) / x["T"]

    return scale


# --- the contrastive cross-entropy and its losses -----------------------------------------------


def _cce_make(c: Case) -> dict:
    g = torch.Generator().manual_seed(c.seed)
    M, N, d = c.sizes
    N = max(N, 1)
    target = torch.randint(N, (M,), generator=g)
    exclude = torch.randint(-1, N, (M,), generator=g)
    exclude = torch.where(exclude == target, torch.full_like(exclude, -1), exclude)
    return {
        "q": unit(g, M, d, c.dtypes[0]),
        "keys": unit(g, N, d, c.dtypes[1]),
        "target": target,
        "exclude": exclude if c.flag else None,
        "w": weights(g, M),
        "T": c.temperature,
    }


def _cce_fn(x: dict, backend: str | None):
    if backend is None:  # the official formulation
        return lambda q, k: ref.reference_contrastive_cross_entropy(q, k, x["target"], x["T"], x["exclude"], "none")[0]
    return lambda q, k: moco_fast.contrastive_cross_entropy(
        q, k, x["target"], x["T"], exclude=x["exclude"], reduction="none", backend=backend
    )


def _cce_run(x, backend):
    return grads_of(_cce_fn(x, backend), [x["q"], x["keys"]], x["w"], [True, True])


def _cce_oracle(x):
    return grads_of(_cce_fn(x, None), [x["q"].double(), x["keys"].double()], x["w"], [True, True])


def _cce_official(x):
    return grads_of(_cce_fn(x, None), [x["q"], x["keys"]], x["w"], [True, True])


def _pair_make(c: Case) -> dict:
    """Two (N, d) views (nt_xent's z0, z1; mocov3's q, k), dtypes[0] and dtypes[1]."""
    g = torch.Generator().manual_seed(c.seed)
    N, _, d = c.sizes
    return {"a": unit(g, N, d, c.dtypes[0]), "b": unit(g, N, d, c.dtypes[1]), "T": c.temperature}


def _pair_op(fn_ours, fn_official, grad_b: bool):
    def run(x, backend):
        return grads_of(lambda a, b: fn_ours(a, b, x["T"], backend), [x["a"], x["b"]], None, [True, grad_b])

    def oracle_(x):
        a, b = x["a"].double(), x["b"].double()
        return grads_of(lambda a, b: fn_official(a, b, x["T"]), [a, b], None, [True, grad_b])

    def official(x):
        return grads_of(lambda a, b: fn_official(a, b, x["T"]), [x["a"], x["b"]], None, [True, grad_b])

    return run, oracle_, official


_ntx = _pair_op(
    lambda a, b, T, be: moco_fast.nt_xent(a, b, T, backend=be),
    lambda a, b, T: ref.reference_nt_xent(a, b, T),
    grad_b=True,
)
_v3 = _pair_op(
    lambda a, b, T, be: moco_fast.mocov3_loss(a, b, T, gather_distributed=False, backend=be),
    lambda a, b, T: ref.reference_mocov3_loss(a, b, T),
    grad_b=False,  # k carries no gradient (MoCo v3's concat_all_gather)
)


def _cmc_make(c: Case) -> dict:
    g = torch.Generator().manual_seed(c.seed)
    B, V, d = c.sizes
    views = [unit(g, B, d, c.dtypes[i % 2]) for i in range(V)]
    return {"views": views, "T": c.temperature}


def _cmc(fn):
    def call(x, wrap):
        V = len(x["views"])
        return grads_of(lambda *v: fn(list(v), x["T"]), [wrap(v) for v in x["views"]], None, [True] * V)

    return call


def _cmc_run(x, backend):
    return _cmc(lambda v, T: moco_fast.cmc_loss(v, T, backend=backend))(x, lambda t: t)


def _cmc_oracle(x):
    return _cmc(ref.reference_cmc_loss)(x, lambda t: t.double())


def _cmc_official(x):
    return _cmc(ref.reference_cmc_loss)(x, lambda t: t)


# --- the memory bank ----------------------------------------------------------------------------


def _bank_make(c: Case) -> dict:
    g = torch.Generator().manual_seed(c.seed)
    B, N, d = c.sizes
    N = max(N, 2)
    return {
        "f": torch.randn(B, d, generator=g, dtype=F64).to(c.dtypes[0]),  # the head normalizes
        "bank": unit(g, N, d, c.dtypes[1]),
        "idx": torch.randint(N, (B,), generator=g),
        "m": float(torch.rand((), generator=g, dtype=F64)),
        "negatives": None if not c.flag else int(torch.randint(1, N, (), generator=g)),
        "seed": c.seed,
        "T": c.temperature,
    }


def _bank_run(x, backend):
    N, d = x["bank"].shape
    head = moco_fast.MemoryBankHead(
        N, d, x["T"], x["m"], x["negatives"], bank_dtype=x["bank"].dtype, gather_distributed=False, backend=backend
    )
    head.bank.bank.copy_(x["bank"])
    f = x["f"].clone().requires_grad_()
    torch.manual_seed(x["seed"])  # the sampled negatives: the oracle draws the same
    loss = head(f, x["idx"])
    (df,) = torch.autograd.grad(loss, f)
    return [loss.detach(), df, head.bank.bank.clone()]


def _bank_formulation(x, wrap):
    bank = wrap(x["bank"])
    f = wrap(x["f"]).clone().requires_grad_()
    fn = F.normalize(f, dim=1)
    if x["negatives"] is None:
        loss = ref.reference_memory_bank_loss(fn, bank, x["idx"], x["T"])
    else:
        torch.manual_seed(x["seed"])
        sampled = torch.randint(bank.shape[0], (x["negatives"],))
        loss = ref.reference_info_nce(fn, bank[x["idx"]], bank[sampled], x["T"])[0]
    (df,) = torch.autograd.grad(loss, f)
    after = bank.clone()
    ref.reference_memory_bank_update(after, x["idx"], fn.detach(), x["m"])
    return [loss.detach(), df, after]


def _bank_oracle(x):
    return _bank_formulation(x, lambda t: t.double())


def _bank_official(x):
    return _bank_formulation(x, lambda t: t)


def _bank_scale(x):
    return math.sqrt(x["f"].shape[0]) / x["T"]


# --- DINO ---------------------------------------------------------------------------------------


def _dino_make(c: Case) -> dict:
    g = torch.Generator().manual_seed(c.seed)
    B, P, b = c.sizes
    P = max(P, 2)  # (P = 1: the loss is 0 exactly, nothing to measure)
    S, Tv = (3, 2) if c.flag else (2, 2)
    return {
        "hs": [unit(g, B, b, c.dtypes[0]) for _ in range(S)],
        "ht": [unit(g, B, b, c.dtypes[0]) for _ in range(Tv)],
        "W": (torch.randn(P, b, generator=g, dtype=F64) * 0.7).to(c.dtypes[1]),
        "Wt": (torch.randn(P, b, generator=g, dtype=F64) * 0.7).to(c.dtypes[1]),
        "c": (torch.randn(P, generator=g, dtype=F64) * 0.3).float(),
        "Ts": c.temperature,
        "Tt": max(0.01, c.temperature * 0.4),
        "T": c.temperature * 0.4,  # (the atol's temperature: the sharper one)
    }


def _dino_run(x, backend):
    S = len(x["hs"])

    def fn(*a):
        return moco_fast.dino_loss(
            list(a[:S]), x["ht"], a[S], x["c"], teacher_prototypes=x["Wt"], student_temp=x["Ts"],
            teacher_temp=x["Tt"], backend=backend,
        )  # fmt: skip

    return grads_of(fn, x["hs"] + [x["W"]], None, [True] * (S + 1))


def _dino_formulation(x, wrap):
    S = len(x["hs"])
    ht, Wt, c = [wrap(h) for h in x["ht"]], wrap(x["Wt"]), wrap(x["c"])

    def fn(*a):
        dt = promote(a[0], a[S]) if wrap(x["W"]).dtype != F64 else F64
        t_out = [h.to(dt) @ Wt.to(dt).T for h in ht]
        s_out = [h.to(dt) @ a[S].to(dt).T for h in a[:S]]
        return ref.reference_dino_loss(t_out, s_out, c.to(dt), x["Tt"], x["Ts"])

    return grads_of(fn, [wrap(h) for h in x["hs"]] + [wrap(x["W"])], None, [True] * (S + 1))


def _dino_scale(x):
    w = max(float(x["W"].double().norm(dim=1).max()), float(x["Wt"].double().norm(dim=1).max()))
    return w * math.sqrt(x["hs"][0].shape[0]) / (x["T"] or 1.0)


def _dinoloss_make(c: Case) -> dict:
    g = torch.Generator().manual_seed(c.seed)
    B, P, _ = c.sizes
    P = max(P, 1)
    return {
        "t": [torch.randn(B, P, generator=g, dtype=F64).to(c.dtypes[0]) for _ in range(2)],
        "s": [torch.randn(B, P, generator=g, dtype=F64).to(c.dtypes[0]) for _ in range(3 if c.flag else 2)],
        "c": (torch.randn(P, generator=g, dtype=F64) * 0.3).float(),
        "m": float(torch.rand((), generator=g, dtype=F64)),
        "Ts": c.temperature,
        "Tt": max(0.01, c.temperature * 0.4),
        "T": c.temperature * 0.4,
    }


def _dinoloss_run(x, backend):
    P = x["c"].shape[0]
    loss_fn = moco_fast.DINOLoss(P, x["Tt"], x["Tt"], 0, x["Ts"], x["m"])
    loss_fn.center.copy_(x["c"].reshape(1, 1, P))
    out = grads_of(lambda *s: loss_fn(x["t"], list(s)), x["s"], None, [True] * len(x["s"]))
    return out + [loss_fn.center.reshape(P).clone()]


def _dinoloss_formulation(x, wrap):
    t, c = [wrap(v) for v in x["t"]], wrap(x["c"])
    dt = promote(t[0], c)
    out = grads_of(
        lambda *s: ref.reference_dino_loss([v.to(dt) for v in t], [v.to(dt) for v in s], c.to(dt), x["Tt"], x["Ts"]),
        [wrap(v) for v in x["s"]],
        None,
        [True] * len(x["s"]),
    )
    mean = torch.stack([v.to(dt) for v in t]).mean(dim=(0, 1))
    return out + [c.to(dt) * x["m"] + mean * (1 - x["m"])]


def _logits_scale(x):
    return float(torch.stack(list(x["s"]) + list(x["t"])).double().abs().max()) * math.sqrt(x["t"][0].shape[0])


# --- SwAV, BYOL ---------------------------------------------------------------------------------


def _sinkhorn_make(c: Case) -> dict:
    g = torch.Generator().manual_seed(c.seed)
    B, P, _ = c.sizes
    scores = (2 * torch.rand(B, max(P, 1), generator=g, dtype=F64) - 1).to(c.dtypes[0])  # cosines
    return {"s": scores, "it": int(torch.randint(0, 5, (), generator=g)), "eps": c.temperature, "T": c.temperature}


def _sinkhorn_run(x, backend):
    return [moco_fast.sinkhorn(x["s"], x["it"], x["eps"])]


def _sinkhorn_oracle(x):
    return [ref.reference_sinkhorn(x["s"].double(), x["it"], x["eps"])]


def _sinkhorn_official(x):
    return [ref.reference_sinkhorn(x["s"].clone(), x["it"], x["eps"])]


def _byol_scale(x):
    # ‖p̂ − ẑ‖² from fp32 unit vectors: each rounded by ~eps32, so an absolute error ~2·eps32·‖p̂_i − ẑ_i‖
    # per row (what no fp32 formulation avoids; 2 − 2·cos instead errs by eps32 whatever the loss).
    d = F.normalize(x["p"].double(), dim=1) - F.normalize(x["z"].double(), dim=1)
    return float(d.norm(dim=1).norm())


def _inv_norm(x):
    return float((1.0 / x["p"].double().norm(dim=1).clamp_min(1e-30)).norm())


def _sinkhorn_scale(x):
    # L = s/ε rounded in fp32: a relative error of the codes of ~eps32·max|L| per rescaling (3 per iteration)
    return float(x["s"].double().abs().max()) * (3 * x["it"] + 2) * math.sqrt(x["s"].numel())


def _byol_make(c: Case) -> dict:
    g = torch.Generator().manual_seed(c.seed)
    B, _, d = c.sizes
    p = torch.randn(B, d, generator=g, dtype=F64)
    z = p + 1e-3 * torch.randn(B, d, generator=g, dtype=F64) if c.flag else torch.randn(B, d, generator=g, dtype=F64)
    return {"p": p.to(c.dtypes[0]), "z": z.to(c.dtypes[1]), "w": weights(g, B), "T": 1.0}


def _byol_run(x, backend):
    return grads_of(lambda p, z: moco_fast.byol_loss(p, z, reduction="none"), [x["p"], x["z"]], x["w"], [True, False])


def _byol_official_fn(p, z):
    dt = promote(p, z) if p.dtype != F64 else F64
    return 2 - 2 * F.cosine_similarity(p.to(dt), z.to(dt), dim=1)  # BYOL's loss_fn, lightly's form


def _byol_oracle(x):
    # ‖p̂ − ẑ‖² in float64 (2 − 2·cos cancels even in float64: an absolute 2e-16 at cos = 1)
    fn = lambda p, z: (F.normalize(p, dim=1) - F.normalize(z, dim=1)).square().sum(dim=1)  # noqa: E731
    return grads_of(fn, [x["p"].double(), x["z"].double()], x["w"], [True, False])


def _byol_official(x):
    return grads_of(_byol_official_fn, [x["p"], x["z"]], x["w"], [True, False])


def _cos_run(x, backend):
    return grads_of(moco_fast.NegativeCosineSimilarity(), [x["p"], x["z"]], None, [True, True])


def _cos_formulation(x, wrap):
    fn = lambda p, z: -F.cosine_similarity(p, z, dim=1).mean()  # noqa: E731
    return grads_of(fn, [wrap(x["p"]), wrap(x["z"])], None, [True, True])


def _cos_official(x):
    # lightly's NegativeCosineSimilarity in the inputs' dtype (a mix promotes)
    dt = torch.promote_types(x["p"].dtype, x["z"].dtype)
    fn = lambda p, z: -F.cosine_similarity(p.to(dt), z.to(dt), dim=1).mean()  # noqa: E731
    return grads_of(fn, [x["p"], x["z"]], None, [True, True])


# --- momentum update, queue ---------------------------------------------------------------------


def _momentum_make(c: Case) -> dict:
    g = torch.Generator().manual_seed(c.seed)
    n, _, d = c.sizes
    dt = c.dtypes[0]
    shapes = [(n, d), (d,), (1,)]
    return {
        "t": [torch.randn(s, generator=g, dtype=F64).to(dt) for s in shapes],
        "s": [torch.randn(s, generator=g, dtype=F64).to(dt) for s in shapes],
        "m": float(torch.rand((), generator=g, dtype=F64)),
        "exact": c.flag,
    }


def _momentum_run(x, backend):
    t = [v.clone() for v in x["t"]]
    moco_fast.momentum_update(t, x["s"], x["m"], exact=x["exact"], backend=backend)
    return [torch.cat([v.flatten() for v in t])]


def _momentum_oracle(x):
    return [torch.cat([oracle.ema64(t, s, x["m"]).flatten() for t, s in zip(x["t"], x["s"])])]


def _momentum_official(x):
    return [torch.cat([oracle.official_momentum(t, s, x["m"]).flatten() for t, s in zip(x["t"], x["s"])])]


def _queue_make(c: Case) -> dict:
    g = torch.Generator().manual_seed(c.seed)
    B, K, d = c.sizes
    K = max(K, 1)
    batches = [
        torch.randn(int(torch.randint(1, K + 1, (), generator=g)), d, generator=g, dtype=F64).to(c.dtypes[0])
        for _ in range(1 + B % 4)
    ]
    return {"K": K, "d": d, "qdtype": c.dtypes[1], "batches": batches, "normalize": c.flag}


def _queue_run(x, backend):
    queue = moco_fast.KeyQueue(x["K"], x["d"], x["qdtype"], False, normalize=x["normalize"], backend=backend)
    for b in x["batches"]:
        queue.enqueue(b)
    state = torch.tensor([float(queue.ptr), float(queue.count)], dtype=F64)
    return [queue.keys.clone(), state]


def _queue_oracle(x):
    model = oracle.RingModel(x["K"], x["d"], torch.zeros(x["K"], x["d"], dtype=F64))
    for b in x["batches"]:
        model.enqueue(b, normalize=x["normalize"])
    return [model.rows, torch.tensor([model.ptr, model.count], dtype=F64)]


OPS = {
    op.name: op
    for op in [
        Op("info_nce", _infonce_make, _infonce_run, _infonce_oracle, _infonce_official, "info_nce", _sizes(), 2,
           scale=_scale_qk("q"), flag_means="negatives require grad"),
        Op("contrastive_cross_entropy", _cce_make, _cce_run, _cce_oracle, _cce_official, "contrast", _sizes(), 2,
           scale=_scale_qk("q"), flag_means="exclude"),
        Op("nt_xent", _pair_make, *_ntx, "contrast", _sizes(), 2, scale=_scale_qk("a", "b")),
        Op("mocov3_loss", _pair_make, *_v3, "contrast", _sizes(), 2, scale=_scale_qk("a"), normalizes=True),
        Op("cmc_loss", _cmc_make, _cmc_run, _cmc_oracle, _cmc_official, "contrast",
           _sizes(keys=(2, 3)), 2, scale=lambda x: len(x["views"]) * _scale_qk("views")(
               {"views": torch.cat(x["views"]), "T": x["T"]})),
        Op("MemoryBankHead", _bank_make, _bank_run, _bank_oracle, _bank_official, "contrast", _sizes(keys=(1, 13)), 2,
           scale=_bank_scale, flag_means="sampled negatives", normalizes=True),
        Op("dino_loss", _dino_make, _dino_run, lambda x: _dino_formulation(x, lambda t: t.double()),
           lambda x: _dino_formulation(x, lambda t: t), "dino_loss", _sizes(keys=(1, 13)), 2,
           scale=_dino_scale, flag_means="3 student views"),
        Op("DINOLoss", _dinoloss_make, _dinoloss_run, lambda x: _dinoloss_formulation(x, lambda t: t.double()),
           lambda x: _dinoloss_formulation(x, lambda t: t), None, _sizes(keys=(1, 13)), 1,
           scale=lambda x: _logits_scale(x) / x["T"] / x["T"], flag_means="3 student views"),
        Op("sinkhorn", _sinkhorn_make, _sinkhorn_run, _sinkhorn_oracle, _sinkhorn_official, None,
           _sizes(keys=(1, 13)), 1, scale=lambda x: _sinkhorn_scale(x) / x["eps"] * x["T"]),
        Op("byol_loss", _byol_make, _byol_run, _byol_oracle, _byol_official, None, _sizes(), 2,
           scale=_byol_scale, grad_scale=_inv_norm, flag_means="z near p (cos → 1)"),
        Op("NegativeCosineSimilarity", _byol_make, _cos_run, lambda x: _cos_formulation(x, lambda t: t.double()),
           _cos_official, None, _sizes(), 2, scale=lambda x: 1.0, grad_scale=lambda x: _inv_norm(x) / len(x["p"]),
           flag_means="z near p (cos → 1)"),
        Op("momentum_update", _momentum_make, _momentum_run, _momentum_oracle, _momentum_official,
           "momentum_update", _sizes(), 1, flag_means="exact=True"),
        Op("KeyQueue.enqueue", _queue_make, _queue_run, _queue_oracle, None, "enqueue", _sizes(), 2,
           flag_means="normalize=True"),
    ]
}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# comparison
# ------------------------------------------------------------------------------------------------


def errors(op: Op, inputs: dict, outs: list, refs: list) -> list[tuple[float, float]]:
    """Per output: (‖out − ref‖/‖ref‖, the bound rtol·‖ref‖ + atol over ‖ref‖ is checked by the caller) —
    returned as (relative error, error / bound-without-rtol); NaN where the output is not finite."""
    res = []
    for i, (o, r) in enumerate(zip(outs, refs)):
        o64, r64 = o.detach().double().cpu(), r.detach().double().cpu()
        assert o64.shape == r64.shape, f"{op.name} output {i}: shape {tuple(o64.shape)} != {tuple(r64.shape)}"
        if not torch.isfinite(o64).all():
            res.append((math.nan, math.nan))
            continue
        err = float((o64 - r64).norm())
        res.append((err / max(float(r64.norm()), 1e-300), err))
    return res


def check_case(op: Op, case: Case, backend: str) -> None:
    """The property: every output of ``op`` on ``backend`` within the documented bound of float64."""
    inputs = op.make(case)
    outs = op.run(inputs, backend)
    refs = op.oracle(inputs)
    assert len(outs) == len(refs), (len(outs), len(refs))
    rtol = rtol_for(case.dtypes, backend)
    for i, ((relerr, err), r) in enumerate(zip(errors(op, inputs, outs, refs), refs)):
        assert not math.isnan(relerr), f"{op.name}/{backend} output {i} is not finite for {case}"
        if op.name == "momentum_update":
            t = outs[0]
            exact = oracle.official_momentum if inputs["exact"] else oracle.lerp
            want = torch.cat([exact(a, b, inputs["m"]).flatten() for a, b in zip(inputs["t"], inputs["s"])])
            if inputs["exact"]:
                assert torch.equal(t, want), f"exact momentum is not the official formula bit for bit: {case}"
            else:
                assert oracle.close_1ulp(t, want), f"lerp momentum off by more than one rounding: {case}"
            continue
        if op.name == "KeyQueue.enqueue" and i == 0:
            assert oracle.close_1ulp(outs[0], refs[0].to(outs[0].dtype)), f"queue rows differ: {case}"
            continue
        dtype = max(case.dtypes, key=lambda d: EPS[d])
        bound = rtol * float(r.double().norm()) + op.atol(
            inputs, dtype if backend == "triton" or op.normalizes else F32, i > 0
        )
        bound += math.sqrt(outs[i].numel()) * TINY[outs[i].dtype]
        assert err <= bound, (
            f"{op.name}/{backend} output {i}: ||out-ref|| = {err:.3e} > {bound:.3e} "
            f"(rel {relerr:.2e}, rtol {rtol:g}) for {case}"
        )


# ------------------------------------------------------------------------------------------------
# the properties
# ------------------------------------------------------------------------------------------------


def cases(op: Op, backend: str) -> st.SearchStrategy:
    sizes = op.sizes
    if backend == "triton":  # the interpreter: tiny
        sizes = st.tuples(st.integers(1, 4), st.integers(0 if op.name == "info_nce" else 1, 7), st.integers(1, 17))
        if op.name == "cmc_loss":
            sizes = st.tuples(st.integers(1, 4), st.integers(2, 3), st.integers(1, 17))
    return st.builds(
        Case,
        sizes=sizes,
        dtypes=st.tuples(*[st.sampled_from(op.dtype_choices)] * op.ndtypes),
        temperature=TEMPS,
        seed=st.integers(0, 2**31 - 1),
        flag=st.booleans(),
    )


EXAMPLES = {"torch": 60, "reference": 30, "triton": 10}
PARAMS = [(name, be) for name, op in OPS.items() for be in op.backends()]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name,backend", PARAMS)
def test_matches_float64(name, backend):
    op = OPS[name]
    if backend == "triton" and backends.unavailable_reason("triton") is not None:
        pytest.skip("triton is not available")

    @settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=cases(op, backend))
    def prop(case):
        why = op.supported(backend, case)
        hypothesis.assume(why is None)
        check_case(op, case, backend)

    prop()


# --- NaN / Inf never passes ---------------------------------------------------------------------

NONFINITE = (float("nan"), float("inf"), float("-inf"))
#: the inputs a poisoned element may land in, per op (the tensors its outputs depend on)
POISONABLE = {
    "info_nce": ("q", "k", "n"),
    "contrastive_cross_entropy": ("q", "keys"),
    "nt_xent": ("a", "b"),
    "mocov3_loss": ("a", "b"),
    "cmc_loss": ("views",),
    "MemoryBankHead": ("f",),
    "dino_loss": ("hs", "ht", "W", "Wt", "c"),
    "DINOLoss": ("t", "s"),
    "sinkhorn": ("s",),
    "byol_loss": ("p", "z"),
    "NegativeCosineSimilarity": ("p", "z"),
    "momentum_update": ("t", "s"),
}


def poison(inputs: dict, key: str, pick: int, value: float) -> dict:
    """A copy of ``inputs`` with one element (chosen by ``pick``) of input ``key`` set to ``value``."""
    x = dict(inputs)
    target = x[key]
    tensors = [t.clone() for t in target] if isinstance(target, list) else [target.clone()]
    t = tensors[pick % len(tensors)]
    if t.numel() == 0:
        return None
    t.view(-1)[(pick // len(tensors)) % t.numel()] = value
    x[key] = tensors if isinstance(target, list) else tensors[0]
    return x


def nonfinite_shows(op: Op, x: dict, backend: str) -> str:
    """ "raised" / "loss" / "gradient" / "" (nothing: the property fails) for a poisoned input."""
    try:
        outs = op.run(x, backend)
    except (ValueError, RuntimeError) as e:  # NonFinite*Error are ValueErrors
        assert str(e), "an error without a message"
        return "raised"
    if not torch.isfinite(outs[0]).all():
        return "loss"
    if any(not torch.isfinite(o).all() for o in outs[1:]):
        return "gradient"
    return ""


@pytest.mark.parametrize("name,backend", [p for p in PARAMS if p[0] in POISONABLE])
def test_nonfinite_input_never_gives_a_finite_loss(name, backend):
    op = OPS[name]
    if backend == "triton" and backends.unavailable_reason("triton") is not None:
        pytest.skip("triton is not available")

    @settings(
        max_examples=max(3, EXAMPLES[backend] // 2), deadline=None, derandomize=True,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(
        case=cases(op, backend),
        key=st.sampled_from(POISONABLE[name]),
        pick=st.integers(0, 10**6),
        value=st.sampled_from(NONFINITE),
    )
    def prop(case, key, pick, value):
        hypothesis.assume(op.supported(backend, case) is None)
        x = poison(op.make(case), key, pick, value)
        hypothesis.assume(x is not None)
        how = nonfinite_shows(op, x, backend)
        assert how in ("raised", "loss"), f"{name}/{backend}: a {value} in {key} gave a finite loss ({case}, {pick})"

    prop()


# --- stateful objects never absorb a non-finite value -------------------------------------------


def _state(obj) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in obj.state_dict().items()}


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    size=st.integers(1, 9),
    dim=st.integers(1, 9),
    dtype=st.sampled_from(DTYPES),
    skip=st.booleans(),
    prefill=st.integers(0, 12),
    value=st.sampled_from(NONFINITE),
    pick=st.integers(0, 10**6),
)
def test_stateful_objects_refuse_nonfinite(backend, size, dim, dtype, skip, prefill, value, pick):
    """A NaN/Inf anywhere in a batch: KeyQueue, SwaVQueue, MemoryBank and the DINO center keep their state
    exactly (on_nonfinite="raise": NonFinite*Error; "skip": num_skipped + 1, nothing else changes)."""
    if backend == "triton" and backends.unavailable_reason("triton") is not None:
        pytest.skip("triton is not available")
    mode = "skip" if skip else "raise"
    g = torch.Generator().manual_seed(pick)
    B = 1 + pick % size

    def bad(n, d):
        x = torch.randn(n, d, generator=g).to(dtype)
        x.view(-1)[pick % x.numel()] = value
        return x

    queue = moco_fast.KeyQueue(size, dim, dtype, False, on_nonfinite=mode, backend=backend)
    for _ in range(prefill % 3):
        queue.enqueue(torch.randn(1 + prefill % size, dim, generator=g).to(dtype))
    swav = moco_fast.SwaVQueue(2, size, dim, dtype=dtype, on_nonfinite=mode, backend=backend)
    bank = moco_fast.MemoryBank(size + 1, dim, 0.5, dtype, gather_distributed=False, on_nonfinite=mode, backend=backend)
    center = moco_fast.DINOLoss(dim, 0.04, 0.04, 0, 0.1, 0.9, on_nonfinite=mode)
    calls = [
        (queue, lambda: queue.enqueue(bad(B, dim))),
        (swav, lambda: swav.enqueue([torch.randn(B, dim, generator=g).to(dtype), bad(B, dim)])),
        (bank, lambda: bank.update(torch.randint(size + 1, (B,), generator=g), bad(B, dim))),
        (center, lambda: center([bad(B, dim), torch.randn(B, dim)], [torch.randn(B, dim)] * 2)),
    ]
    for obj, call in calls:
        before = _state(obj)
        if skip:
            call()
        else:
            with pytest.raises(ValueError, match="NaN or Inf"):
                call()
        after = _state(obj)
        counted = 0
        for key, v in before.items():
            if key.endswith("num_skipped"):  # "raise" on the CPU raises at once and counts nothing
                counted += int(after[key]) - int(v)
                assert int(after[key]) - int(v) in ((0, 1) if skip else (0,)), key
            else:
                assert torch.equal(after[key], v), f"{type(obj).__name__}.{key} changed by a refused batch"
        assert counted >= 1 if skip else counted == 0, f"{type(obj).__name__}: {counted} refusals counted"


# ------------------------------------------------------------------------------------------------
# the table: python tests/test_fuzz.py
# ------------------------------------------------------------------------------------------------


def _mix_name(op: Op, dtypes) -> str:
    short = {F32: "f32", BF16: "bf16", F16: "f16"}
    return "/".join(short[d] for d in dtypes)


def table(num_cases: int, seed: int = 0) -> list[tuple]:
    """Worst relative error (over every output: loss, gradients, state) per op × backend × dtype mix over
    ``num_cases`` seeded random cases per op and mix, and the official formulation's on the same cases."""
    import random

    rng = random.Random(seed)
    rows = []
    for name, op in OPS.items():
        mixes = [(a,) for a in op.dtype_choices] if op.ndtypes == 1 else [(a, b) for a in DTYPES for b in DTYPES]
        for mix in mixes:
            cases_ = []
            for _ in range(num_cases):
                B = rng.choice([1, 2, 3, 7, 16, 33])
                K = rng.choice([0, 1, 5, 31, 100]) if name == "info_nce" else rng.choice([1, 5, 31, 100])
                if name == "cmc_loss":
                    K = rng.choice([2, 3])
                d = rng.choice([1, 7, 16, 33, 64])
                T = math.exp(rng.uniform(math.log(0.01), 0.0))
                cases_.append(Case((B, K, d), mix, T, rng.randrange(2**31), rng.random() < 0.5))
            worst_off = 0.0
            for be in op.backends():
                worst = 0.0
                ran = 0
                for c in cases_:
                    if op.supported(be, c) is not None:
                        continue
                    if be == "triton" and c.sizes[0] * max(c.sizes[1], 1) * c.sizes[2] > 2000:
                        continue  # the interpreter: small cases only
                    x = op.make(c)
                    refs = op.oracle(x)
                    # relative errors of the outputs above the absolute floor (an exact 0 has no relative error)
                    keep = [float(r.double().norm()) > op.atol(x, F32, i > 0) for i, r in enumerate(refs)]
                    errs = [e for (e, _), k in zip(errors(op, x, op.run(x, be), refs), keep) if k]
                    worst = max([worst] + [(math.inf if math.isnan(e) else e) for e in errs])
                    ran += 1
                    if op.official is not None and be == op.backends()[0]:
                        off = [e for (e, _), k in zip(errors(op, x, op.official(x), refs), keep) if k]
                        worst_off = max([worst_off] + [(math.inf if math.isnan(e) else e) for e in off])
                if ran:
                    rows.append((name, be, _mix_name(op, mix), ran, worst, worst_off if op.official else None))
    return rows


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20, help="random cases per op and dtype mix")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"worst relative error vs float64 (max over loss, input gradients, state), {args.cases} cases per mix")
    print("| op | backend | dtypes | cases | worst rel. error | official formulation |")
    print("|---|---|---|---|---|---|")
    for name, be, mix, ran, worst, off in table(args.cases, args.seed):
        off_s = "—" if off is None else f"{off:.1e}"
        print(f"| {name} | {be} | {mix} | {ran} | {worst:.1e} | {off_s} |")


if __name__ == "__main__":
    main(sys.argv[1:])
