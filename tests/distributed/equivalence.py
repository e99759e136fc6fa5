"""The comparisons of the equivalence tests (tensor-parallel, 3D layouts): each returns what
failed, as lines, so a negative control can assert that exactly its check fails."""

from __future__ import annotations

import math


def rel(a: float, b: float) -> float:
    """|a - b| / |b|; infinite when the reference is 0 and the value is not."""
    diff = abs(a - b)
    if b == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / abs(b)


def rel_tensor(got, want) -> float:
    """||got - want|| / ||want||, with rel's convention for an all-zero reference."""
    diff, norm = float((got - want).norm()), float(want.norm())
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / norm


def within(r: float, tol: float) -> bool:
    return r <= tol  # False for NaN: a NaN loss or gradient fails every check


def step1_loss_failures(ref: dict, got: dict, tol: float) -> list[str]:
    r = rel(got["losses"][0], ref["losses"][0])
    if within(r, tol):
        return []
    return [f"step-1 loss {got['losses'][0]} vs {ref['losses'][0]}: rel {r:.2e}"]


def grad_failures(ref: dict, got: dict, tol: float) -> list[str]:
    """Every parameter's step-1 gradient, by one-process name; a parameter missing on either
    side fails too."""
    bad = []
    for name, g in ref["grads"].items():
        if name not in got["grads"]:
            bad.append(f"{name}: missing")
            continue
        r = rel_tensor(got["grads"][name], g)
        if not within(r, tol):
            bad.append(f"{name}: rel {r:.2e}")
    bad += [f"{name}: not in the reference" for name in got["grads"].keys() - ref["grads"].keys()]
    return bad


def step1_grad_failures(ref: dict, got: dict, tol: float) -> list[str]:
    """Every gradient and the global gradient norm of the first step."""
    bad = grad_failures(ref, got, tol)
    r = rel(got["grad_norms"][0], ref["grad_norms"][0])
    if not within(r, tol):
        bad.append(f"global grad norm at step 1: rel {r:.2e}")
    return bad


def trajectory_failures(ref: dict, got: dict, tol: float) -> list[str]:
    """Losses and gradient norms of every step."""
    bad = []
    for key in ("losses", "grad_norms"):
        for step, (a, b) in enumerate(zip(got[key], ref[key], strict=True), 1):
            if not within(rel(a, b), tol):
                bad.append(f"{key} step {step}: {a} vs {b} (rel {rel(a, b):.2e})")
    return bad
