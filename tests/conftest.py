"""Shared test set-up: a fresh random seed per session (printed, and settable through
FLASHTILE_TEST_SEED to replay a failure), and the device the kernels run on."""

import os
import random

import pytest
import torch

import flashtile  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without a GPU)
from flashtile.kernels import configs, plans
from flashtile.testing import device

SEED = int(os.environ.get("FLASHTILE_TEST_SEED", random.SystemRandom().randrange(2**31)))
ON_GPU = torch.cuda.is_available()
# the Gluon kernels (kernels/hopper.py, hopper_backward.py) run on Hopper only
ON_HOPPER = ON_GPU and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (sm_90)")


def record_calls(monkeypatch, entries, note=lambda name, args: name) -> list:
    """Wrap each (module, function name) of `entries` so that a call first appends
    note(name, positional args) to the list returned, then runs the function: which entry
    points a call went through, for the tests of the paths a dispatch chose."""
    calls = []
    for module, name in entries:
        entry = getattr(module, name)

        def recording(*args, name=name, entry=entry, **kwargs):
            calls.append(note(name, args))
            return entry(*args, **kwargs)

        monkeypatch.setattr(module, name, recording)
    return calls


def pytest_report_header(config):
    where = torch.cuda.get_device_name() if ON_GPU else "CPU, Triton interpreter"
    return f"flashtile: seed {SEED} (FLASHTILE_TEST_SEED to replay), kernels on {where}"


@pytest.fixture(autouse=True)
def _seed(request):
    # A different, reproducible stream for every test.
    torch.manual_seed(SEED + sum(map(ord, request.node.nodeid)))


@pytest.fixture
def dev():
    return device()


# On a GPU every test runs the first candidate config of each kernel and head dim
# (FLASHTILE_AUTOTUNE=0, configs.autotuning): tuning would compile every candidate for every
# shape bucket and flag set, minutes per test. test_candidates.py checks each candidate, forced,
# and the tuned path itself (it sets FLASHTILE_AUTOTUNE=1 where it tunes).
@pytest.fixture(autouse=True)
def _untuned(monkeypatch):
    if ON_GPU:
        monkeypatch.setenv("FLASHTILE_AUTOTUNE", "0")


# The library reads short key ranges through pointers (configs.TMA_FORWARD_MIN_SEQLEN_K), which
# would leave the forward's TMA path to the few tests with thousands of keys: tests take it from
# the first key, wherever the layout allows it. The pointer path stays covered by the head dims
# and strides TMA cannot take, and the default threshold by test_attention's own test.
TMA_FORWARD_MIN_SEQLEN_K = configs.TMA_FORWARD_MIN_SEQLEN_K  # the library's default


@pytest.fixture(autouse=True)
def _tma_at_every_length(monkeypatch):
    monkeypatch.setattr(configs, "TMA_FORWARD_MIN_SEQLEN_K", 0)


# A plan (kernels/plans.py, configs.features["replay"]) is keyed by what a call decides its
# launches from; the module thresholds and config tables that tests change are not in that key.
@pytest.fixture(autouse=True)
def _no_plans_across_tests():
    plans.forget()
