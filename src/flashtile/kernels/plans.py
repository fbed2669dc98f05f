"""Plans: a call's launches recorded once, then made again for each later call of the same
signature, with configs.features["replay"] (docs/performance.md v7.7).

A training step calls attention with the same shapes, layouts and options every step. At short
lengths deciding and binding a call's launches costs the host as much as the GPU's work (v7.4,
v7.6): which kernel (Gluon or Triton), which config, which strides, flags and scalars, and
Launcher's signature key per launch. A plan is what one call launched, recorded through
launch.recording(): the kernels, grids and every argument but the call's tensors, whose places
launch.Replay keeps. The next call of the same signature allocates its outputs and launches.

The signature is everything those launches were decided from besides the tensors' addresses:
each tensor's shape, strides, dtype and 16-byte alignment, the device, the options, the
features and the config choice (overrides, autotuning). Module-level tables that a program (or
a test) changes at run time — the Gluon paths' thresholds, the TMA threshold — are not in it:
call `forget()` after changing one. Calls with tensors among their options (ALiBi slopes, a
mask, varlen lengths, a KV cache) or with dropout (a new seed every call) have no signature,
and neither has any call while a launch hook (a profiler's) is set: it must see every launch.
"""

from __future__ import annotations

from flashtile.kernels import configs, launch
from flashtile.kernels.params import AttnOptions

MAX_PLANS = 256  # signatures remembered per cache; past that the cache starts again
_caches: list[dict] = []


def cache() -> dict:
    """A new cache of plans by signature (one per launcher function)."""
    plans: dict = {}
    _caches.append(plans)
    return plans


def forget() -> None:
    """Drop every plan of every cache."""
    for plans in _caches:
        plans.clear()


def signature(tensors: tuple, opts: AttnOptions) -> tuple | None:
    """The signature of a call on `tensors` (q first) with `opts`, or None where no plan may
    stand for it (module docstring)."""
    if (opts.alibi_slopes is not None or opts.mask_mod is not None or opts.varlen is not None
            or opts.kvcache is not None or opts.dropout_p > 0 or launch.hooks_set()):
        return None
    layouts = tuple([(t.shape, t.stride(), t.dtype, t.data_ptr() & 15 == 0) for t in tensors])
    return (layouts, tensors[0].device, opts, tuple(configs.features.values()),
            configs.choice_state())


def replayed_or_recorded(plans: dict, key, inputs: tuple, launch_anew, make_plan,
                         launches: int):
    """A call's outputs: from its plan when `plans` has one for `key`; else from
    `launch_anew(*inputs)`, which returns (outputs, the call's tensors), recorded as
    `make_plan(recorded launches, tensors)` when it made exactly `launches` launches, each
    through a Launcher that had its signature (on a GPU, a call's first launches go through
    Triton's own path, so its second call records)."""
    plan = plans.get(key)
    if plan is not None:
        return plan(*inputs)
    with launch.recording() as recorded:
        outputs, tensors = launch_anew(*inputs)
    if recorded.complete and len(recorded) == launches:
        try:
            plan = make_plan(recorded, tensors)
        except LookupError:  # a launch read a tensor that is not the call's own: no plan
            return outputs
        if len(plans) >= MAX_PLANS:
            plans.clear()
        plans[key] = plan
    return outputs
