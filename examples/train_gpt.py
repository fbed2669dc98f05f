"""Train a small character-level GPT with flashtile's attention or torch's SDPA, and compare.

The model is nanoGPT's: token and position embeddings, pre-LayerNorm blocks of causal
self-attention and a 4x MLP, a final LayerNorm and an LM head tied to the token embedding. The
only switch is the attention call inside `CausalSelfAttention`:

    flashtile: flashtile.flash_attn_func(q, k, v, causal=True)           q: (B, T, H, D)
    sdpa:      F.scaled_dot_product_attention(q, k, v, is_causal=True)   q: (B, H, T, D)

`--attention both` trains the same model twice, from the same seed and on the same batches in
the same order, so that the two loss curves differ only by the attention kernel. In float32
they agree to rounding, about 1e-7 relative, for the first steps; AdamW carries the rounding
into the weights, so the gap grows slowly with the step count (up to ~1e-4 over the 30 tiny
steps). bfloat16 rounds far more coarsely: expect larger gaps there. The run prints tokens/s,
peak memory and that agreement, and writes `loss.png` and `results.json` to --out.

    python examples/train_gpt.py --tiny        # CPU, Triton interpreter: about a minute
    python examples/train_gpt.py               # GPU: nanoGPT's shakespeare-char size, bfloat16

Needs matplotlib and tqdm besides flashtile's own dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

import flashtile

DATA = Path(__file__).resolve().parent / "data" / "persuasion.txt"
# sdpa-efficient: SDPA with its memory-efficient backend forced, another exact attention with
# its own rounding. Beside flashtile vs sdpa it shows how far two exact kernels drift apart.
ATTENTIONS = ("flashtile", "sdpa", "sdpa-efficient")

# -- the model ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    attention: str = "flashtile"


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head}")
        if cfg.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {cfg.attention!r}")
        self.n_head = cfg.n_head
        self.attention = cfg.attention
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # Strided views of c_attn's output, no copy: flashtile takes any stride but the last.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head)  # (B, T, H, D)
                   for t in self.c_attn(x).split(C, dim=2))
        if self.attention == "flashtile":
            y = flashtile.flash_attn_func(q, k, v, causal=True)  # (B, T, H, D)
        else:
            forced = (sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)
                      if self.attention == "sdpa-efficient" else contextlib.nullcontext())
            with forced:
                y = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, T, D)
                    is_causal=True,
                ).transpose(1, 2)  # (B, T, H, D)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: the projections into the residual stream are scaled down by sqrt(2 n_layer),
        # so that the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """idx, targets: (B, T) token ids; returns the mean cross-entropy."""
        _, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# -- data --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CharData:
    vocab: str
    train: torch.Tensor  # (N,) token ids, int64, on the CPU
    val: torch.Tensor


def load_chars(path: Path = DATA, val_fraction: float = 0.1) -> CharData:
    """The text as character ids; the last `val_fraction` of it is held out."""
    text = path.read_text(encoding="utf-8")
    vocab = "".join(sorted(set(text)))
    stoi = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    n_train = int(len(ids) * (1 - val_fraction))
    return CharData(vocab, ids[:n_train], ids[n_train:])


def get_batch(ids: torch.Tensor, batch_size: int, block_size: int, gen: torch.Generator,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of block_size + 1 characters: inputs and next-character targets, (B, T).

    The offsets come from `gen` alone, never from the global generator that initialises the
    model, so that two runs with the same seed see the same batches in the same order."""
    starts = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=gen)
    window = torch.stack([ids[s:s + block_size + 1] for s in starts.tolist()])
    window = window.to(device)
    return window[:, :-1], window[:, 1:]


# -- training ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    lr: float
    warmup_steps: int  # excluded from tokens/s and peak memory: GPU autotuning happens here
    eval_batches: int
    seed: int
    dtype: str
    device: str


# nanoGPT's Shakespeare-char model, and one that the Triton interpreter runs in about a minute on
# two cores (head dim 16, the smallest tl.dot size). The tiny lr is high enough that the loss falls
# from ln(75) = 4.32 to about the unigram entropy (3.07) in 30 steps; 1e-2 makes it spike.
FULL = dict(steps=300, batch_size=64, block_size=256, n_layer=6, n_head=6, n_embd=384,
            lr=1e-3, warmup_steps=5, eval_batches=20)
TINY = dict(steps=30, batch_size=2, block_size=64, n_layer=2, n_head=2, n_embd=32,
            lr=5e-3, warmup_steps=1, eval_batches=2)


@dataclasses.dataclass
class RunResult:
    attention: str
    losses: list[float]  # training loss at every step
    val_loss: float
    seconds: float  # wall time of the steps after warm-up
    tokens_per_s: float  # over the steps after warm-up
    peak_memory_bytes: int | None  # CUDA only: torch.cuda.max_memory_allocated after warm-up


def _autocast(cfg: TrainConfig):
    if cfg.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=getattr(torch, cfg.dtype))


def train(attention: str, cfg: TrainConfig, data: CharData, progress: bool = True) -> RunResult:
    """Train a fresh model with one attention; the same cfg gives the same init and batches."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(len(data.vocab), cfg.block_size, cfg.n_layer, cfg.n_head,
                          cfg.n_embd, attention)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.1)
    # float16 needs loss scaling; bfloat16 and float32 do not, and the scaler is then a no-op.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
    gen = torch.Generator().manual_seed(cfg.seed)
    cuda = device.type == "cuda"

    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"{attention:>9}", unit="step", disable=not progress)
    for step in bar:
        if step == cfg.warmup_steps:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        x, y = get_batch(data.train, cfg.batch_size, cfg.block_size, gen, device)
        with _autocast(cfg):
            loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())  # also the per-step sync that makes the timing honest
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    timed_steps = cfg.steps - cfg.warmup_steps
    peak = torch.cuda.max_memory_allocated() if cuda else None

    val_gen = torch.Generator().manual_seed(cfg.seed + 1)
    model.eval()
    with torch.no_grad(), _autocast(cfg):
        val = [model(*get_batch(data.val, cfg.batch_size, cfg.block_size, val_gen, device))
               .item() for _ in range(cfg.eval_batches)]
    return RunResult(
        attention=attention,
        losses=losses,
        val_loss=sum(val) / len(val),
        seconds=seconds,
        tokens_per_s=timed_steps * cfg.batch_size * cfg.block_size / seconds,
        peak_memory_bytes=peak,
    )


# -- comparison and reports --------------------------------------------------------------------


def compare(a: RunResult, b: RunResult) -> dict[str, float]:
    """How far apart two loss curves are, step by step and at the end."""
    diffs = [abs(x - y) for x, y in zip(a.losses, b.losses, strict=True)]
    rel = [d / abs(y) for d, y in zip(diffs, b.losses, strict=True)]
    return dict(
        max_abs_diff=max(diffs),
        max_rel_diff=max(rel),
        final_abs_diff=diffs[-1],
        val_abs_diff=abs(a.val_loss - b.val_loss),
    )


def _mib(n_bytes: int | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:,.1f} MiB"


def _max_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def plot(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = len(results) == 2
    fig, axes = plt.subplots(1, 2 if both else 1, figsize=(11 if both else 6, 4), squeeze=False)
    ax = axes[0, 0]
    for r, style in zip(results, ("-", "--")):
        ax.plot(range(1, len(r.losses) + 1), r.losses, style, label=r.attention)
    ax.set(xlabel="step", ylabel="training loss (nats/char)", title="Loss curves")
    ax.legend()
    if both:
        # The curves lie on top of each other; their difference is what shows agreement, on a
        # log scale against float32's epsilon. Bit-identical steps have no point on it.
        a, b = results
        rel = [abs(x - y) / abs(y) for x, y in zip(a.losses, b.losses)]
        steps = [i + 1 for i, r in enumerate(rel) if r > 0]
        ax = axes[0, 1]
        ax.semilogy(steps, [r for r in rel if r > 0], "o", markersize=4)
        ax.axhline(torch.finfo(torch.float32).eps, color="gray", linestyle=":",
                   label="float32 epsilon")
        ax.set_xlim(axes[0, 0].get_xlim())
        ax.set(xlabel="step", ylabel="relative difference of the losses",
               title=f"|{a.attention} - {b.attention}| / {b.attention}: "
                     f"{len(rel) - len(steps)} of {len(rel)} steps bit-identical")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _environment(device: torch.device) -> dict[str, str]:
    import triton

    return dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter",
        torch=torch.__version__,
        triton=triton.__version__,
        flashtile=flashtile.__version__,
        python=platform.python_version(),
    )


# -- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attention", choices=(*ATTENTIONS, "both", "all"), default="both",
                   help="both: flashtile and sdpa; all: also sdpa-efficient, whose distance "
                        "from sdpa is the drift between two exact kernels")
    p.add_argument("--tiny", action="store_true",
                   help="the CPU preset: 2 layers, 2 heads of dim 16, block 64, 30 steps")
    for name, kind in (("steps", int), ("batch-size", int), ("block-size", int),
                       ("n-layer", int), ("n-head", int), ("n-embd", int), ("lr", float),
                       ("warmup-steps", int), ("eval-batches", int)):
        key = name.replace("-", "_")
        p.add_argument(f"--{name}", type=kind,
                       help=f"default {FULL[key]:g}, with --tiny {TINY[key]:g}")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="autocast dtype; default bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--out", type=Path, default=Path("train_gpt_out"),
                   help="folder for loss.png and results.json (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {device}: flashtile runs on CUDA, or on the CPU through Triton's "
                "interpreter")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if device.type == "cpu" and dtype != "float32":
        p.error("on the CPU use --dtype float32: Triton's interpreter computes bfloat16 dots "
                "wrongly, and CPU autocast would only slow the comparison down")
    preset = TINY if args.tiny else FULL
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)}
    values = {k: preset[k] if v is None and k in preset else v for k, v in values.items()}
    cfg = TrainConfig(**{**values, "dtype": dtype, "device": str(device)})
    if not 0 <= cfg.warmup_steps < cfg.steps:
        p.error(f"--warmup-steps {cfg.warmup_steps} leaves none of the {cfg.steps} steps to time")
    if cfg.eval_batches < 1:
        p.error("--eval-batches must be at least 1")
    if device.type == "cpu" and not args.tiny:
        print("note: the full preset on the CPU runs through Triton's interpreter and will take "
              "hours; --tiny is the CPU-sized run", file=sys.stderr)
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    data = load_chars()
    attentions = {"both": ATTENTIONS[:2], "all": ATTENTIONS}.get(args.attention,
                                                                 (args.attention,))
    device = torch.device(cfg.device)
    env = _environment(device)
    print(f"{env['device']}; torch {env['torch']}, triton {env['triton']}, "
          f"flashtile {env['flashtile']}")
    print(f"data: {DATA.name}, {len(data.train):,} train / {len(data.val):,} val characters, "
          f"vocab {len(data.vocab)}")
    print(f"model: {cfg.n_layer} layers, {cfg.n_head} heads of dim {cfg.n_embd // cfg.n_head}, "
          f"block {cfg.block_size}; batch {cfg.batch_size}, {cfg.steps} steps, {cfg.dtype}, "
          f"seed {cfg.seed}")

    results = [train(a, cfg, data, progress=not args.no_progress) for a in attentions]

    print(f"\n{'attention':>9}  {'tokens/s':>10}  {'peak memory':>12}  {'final loss':>10}  "
          f"{'val loss':>8}")
    for r in results:
        print(f"{r.attention:>9}  {r.tokens_per_s:>10,.0f}  {_mib(r.peak_memory_bytes):>12}  "
              f"{r.losses[-1]:>10.6f}  {r.val_loss:>8.5f}")
    if device.type == "cuda":
        print(f"tokens/s over steps {cfg.warmup_steps + 1}-{cfg.steps}; peak memory is "
              "torch.cuda.max_memory_allocated over the same steps\n(model, AdamW state, "
              "activations)")
    else:
        print(f"tokens/s over steps {cfg.warmup_steps + 1}-{cfg.steps}; flashtile runs through "
              "Triton's interpreter here, so its tokens/s says nothing about the kernel's speed.\n"
              "Peak memory per run is n/a on the CPU; the process's max RSS, all runs and the "
              f"interpreter together, was {_mib(_max_rss_bytes())}")

    comparison = None
    by_name = {r.attention: r for r in results}
    pairs = [(x, "sdpa") for x in ("flashtile", "sdpa-efficient") if x in by_name]
    if "sdpa" in by_name and pairs:
        comparisons = {f"{x} vs sdpa": compare(by_name[x], by_name["sdpa"]) for x, _ in pairs}
        comparison = comparisons["flashtile vs sdpa" if "flashtile" in by_name
                                 else "sdpa-efficient vs sdpa"]
        for label, c in comparisons.items():
            a, b = label.split(" vs ")
            print(f"\nloss curves, {label}, over {cfg.steps} steps: max |diff| "
                  f"{c['max_abs_diff']:.3g} (max relative {c['max_rel_diff']:.3g}); final "
                  f"losses {by_name[a].losses[-1]:.6f} and {by_name[b].losses[-1]:.6f}; val "
                  f"losses {by_name[a].val_loss:.6f} and {by_name[b].val_loss:.6f}")

    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "loss.png")
    report = dict(
        config=dataclasses.asdict(cfg),
        environment=env,
        data=dict(file=DATA.name, train_chars=len(data.train), val_chars=len(data.val),
                  vocab_size=len(data.vocab)),
        runs={r.attention: dataclasses.asdict(r) for r in results},
        comparison=comparison,
        comparisons=comparisons if comparison is not None else None,
        process_max_rss_bytes=_max_rss_bytes() if device.type == "cpu" else None,
    )
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'loss.png'} and {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
