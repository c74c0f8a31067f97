"""What ``benchmarks/distributed_training.py`` trains: the runs, their models, and their dropout masks.

A run is named ``MODEL[+LORA]/DTYPE[/adapters-DTYPE][/dropout-P]``:

- ``gemmbridge``, ``torch``: a transformer of embedding, blocks (LayerNorm, qkv and proj ``Linear``, causal SDPA,
  an ``MLP`` d → 4d → d with tanh GELU) and a ``Linear`` head, built from gemmbridge's modules or from plain
  ``nn.Linear`` ones (the same parameter names, so the same seed gives the same weights). Full training, or with
  ``+apply_lora`` LoRA on qkv and proj. ``bf16``: float32 weights under ``torch.autocast``.
- ``llama``: a random ``transformers`` Llama (built from a config, no download) with LoRA on q, k, v, o, gate, up
  and down through ``+peft`` (PEFT alone), ``+bridge`` (PEFT with ``gemmbridge.torch.peft.use_gemmbridge``) or
  ``+apply_lora`` (``gemmbridge.torch.apply_lora``). ``bf16``: the weights cast to bfloat16, as PEFT recipes do.
- ``adapters-fp32`` / ``adapters-bf16``: the adapters' dtype (PEFT's default is float32: ``autocast_adapter_dtype``).
- ``dropout-P``: LoRA dropout. Under ``RowMasks`` every process draws, for its rows of the batch, the masks one
  process with the whole batch draws for them.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import peft
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import gemmbridge.torch as gt
from gemmbridge.torch.peft import use_gemmbridge

# PEFT 0.21 asks transformers 5 for is_gradient_checkpointing, deprecated there: one warning per model, every process
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Size:
    """Model and batch sizes. ``batch``: sequences per step, in all (``per_rank``: per process); ``kv_heads``: the
    Llama's key and value heads."""

    d: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq: int
    batch: int
    r: int
    per_rank: bool = False


SIZES = {
    "blocks": {
        "test": Size(d=64, layers=2, heads=4, kv_heads=4, ffn=256, vocab=97, seq=32, batch=8, r=4),
        "bench": Size(d=1024, layers=8, heads=16, kv_heads=16, ffn=4096, vocab=4096, seq=1024, batch=16, r=8),
    },
    "llama": {  # bench: examples/finetune_lora.py's Llama, 8 × 2048 tokens per GPU
        "test": Size(d=32, layers=2, heads=4, kv_heads=2, ffn=48, vocab=64, seq=16, batch=4, r=4),
        "bench": Size(
            d=2048, layers=4, heads=16, kv_heads=16, ffn=5632, vocab=32000, seq=2048, batch=8, r=16, per_rank=True
        ),
    },
}


@dataclass(frozen=True)
class Run:
    """One thing to train, by name (the module's docstring); ``Run.parse(run.name) == run``."""

    model: str  # gemmbridge | torch | llama
    lora: str = ""  # "" (full training) | apply_lora | peft | bridge
    dtype: str = "fp32"
    adapters: str = ""  # LoRA runs: the adapters' dtype
    dropout: float = 0.0

    def __post_init__(self) -> None:
        problems = [
            self.model not in ("gemmbridge", "torch", "llama") and f"model {self.model!r}",
            self.lora not in ("", "apply_lora", "peft", "bridge") and f"LoRA {self.lora!r}",
            self.lora in ("peft", "bridge") and self.model != "llama" and "PEFT on a model other than llama",
            self.model == "llama" and not self.lora and "llama without LoRA",
            self.dtype not in DTYPES and f"dtype {self.dtype!r}",
            self.lora and self.adapters not in DTYPES and f"adapters {self.adapters!r}",
            not self.lora and self.adapters and "adapters without LoRA",
            self.dropout and not self.lora and "dropout without LoRA",
        ]
        if any(problems):
            raise ValueError(f"run {self}: {', '.join(p for p in problems if p)}")

    @property
    def name(self) -> str:
        parts = [self.model + (f"+{self.lora}" if self.lora else ""), self.dtype]
        parts += [f"adapters-{self.adapters}"] if self.lora else []
        return "/".join(parts + ([f"dropout-{self.dropout:g}"] if self.dropout else []))

    @classmethod
    def parse(cls, name: str) -> Run:
        head, dtype, *rest = name.split("/")
        model, _, lora = head.partition("+")
        fields: dict[str, Any] = {"model": model, "lora": lora, "dtype": dtype}
        for part in rest:
            key, _, value = part.partition("-")
            fields[key] = float(value) if key == "dropout" else value
        run = cls(**fields)
        if run.name != name:
            raise ValueError(f"run {name!r}: write it {run.name!r}")
        return run

    @property
    def size_family(self) -> str:
        return "llama" if self.model == "llama" else "blocks"

    @property
    def lr(self) -> float:
        return 1e-2 if self.lora else 1e-3

    @property
    def autocast(self) -> torch.dtype | None:
        """The blocks model's bf16 is float32 weights under autocast; the Llama's bf16 is its weights cast."""
        return DTYPES[self.dtype] if self.model != "llama" and self.dtype != "fp32" else None

    def baseline(self) -> Run | None:
        """The plain-torch run this one is measured against: torch's layers for gemmbridge's (full training), PEFT
        for the Llama's gemmbridge LoRA; None for the others."""
        if self.model == "gemmbridge" and not self.lora:
            return dataclasses.replace(self, model="torch")
        if self.model == "llama" and self.lora != "peft":
            return dataclasses.replace(self, lora="peft")
        return None


class TorchMLP(nn.Module):
    """``gemmbridge.torch.MLP``'s layers and parameter names on ``nn.Linear`` and tanh GELU (``benchmarks/
    training_layers.py`` has one too, but imports triton, which a CPU-only torch lacks)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, size: Size, linear: type[nn.Linear], mlp: type[nn.Module]) -> None:
        super().__init__()
        self.heads = size.heads
        self.norm1, self.norm2 = nn.LayerNorm(size.d), nn.LayerNorm(size.d)
        self.qkv = linear(size.d, 3 * size.d)
        self.proj = linear(size.d, size.d)
        self.mlp = mlp(size.d, size.ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class Blocks(nn.Module):
    def __init__(self, size: Size, layers: str) -> None:
        super().__init__()
        linear, mlp = (gt.Linear, gt.MLP) if layers == "gemmbridge" else (nn.Linear, TorchMLP)
        self.embed = nn.Embedding(size.vocab, size.d)
        self.blocks = nn.ModuleList(Block(size, linear, mlp) for _ in range(size.layers))
        self.head = linear(size.d, size.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def llama(run: Run, size: Size) -> nn.Module:
    """A random Llama with LoRA (alpha = 2r) on every linear layer of its blocks, the way ``run`` puts it there."""
    config = LlamaConfig(
        hidden_size=size.d, intermediate_size=size.ffn, num_hidden_layers=size.layers, num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads, vocab_size=size.vocab, max_position_embeddings=size.seq,
        use_cache=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(DTYPES[run.dtype])
    if run.lora == "apply_lora":
        gt.apply_lora(model, [f"*.{t}" for t in LLAMA_TARGETS], r=size.r, alpha=2 * size.r, dropout=run.dropout,
                      dtype=DTYPES[run.adapters])  # fmt: skip
        return model
    config = peft.LoraConfig(r=size.r, lora_alpha=2 * size.r, lora_dropout=run.dropout, target_modules=LLAMA_TARGETS)
    model = peft.get_peft_model(model, config, autocast_adapter_dtype=run.adapters == "fp32")  # type: ignore[arg-type]
    if run.lora == "bridge":
        report = use_gemmbridge(model)
        if report.skipped or len(report.served) != len(LLAMA_TARGETS) * size.layers:
            raise RuntimeError(f"the bridge served {len(report.served)} layers; left to PEFT: {report.skipped}")
    return model


def build(run: Run, size: Size, device: torch.device) -> tuple[nn.Module, list[nn.Module]]:
    """(the model on ``device``, its blocks: what FSDP2 shards one by one); only what trains requires grad."""
    with torch.device(device):
        if run.model == "llama":
            model = llama(run, size)
            return model, [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
        model = Blocks(size, run.model)
    if run.lora:
        gt.apply_lora(model, ["blocks.*.qkv", "blocks.*.proj"], r=size.r, alpha=2 * size.r, dropout=run.dropout,
                      dtype=DTYPES[run.adapters])  # fmt: skip
    return model, list(model.blocks)


def logits_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


class RowMasks(TorchFunctionMode):
    """Dropout masks that depend on (step, draw, row of the whole batch) alone: under DDP or FSDP each process
    draws, for its rows, the masks one process with the whole batch draws for them.

    gemmbridge's ``lora_linear`` draws its mask as ``torch.empty(x.shape, dtype=torch.bool).bernoulli_(keep)``
    (``x`` batch-first); this mode fills each such draw instead, row ``i`` of the local batch from a generator
    seeded with ``(step, draw, first_row + i)``. ``draws`` counts them, so a run whose masks came from anywhere
    else is seen."""

    def __init__(self, step: int, first_row: int) -> None:
        super().__init__()
        self.step, self.first_row, self.draws = step, first_row, 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not torch.Tensor.bernoulli_ or args[0].dtype != torch.bool:
            return func(*args, **kwargs)
        mask, keep = args[0], args[1] if len(args) > 1 else kwargs["p"]
        rows = []
        for i in range(mask.shape[0]):
            seed = (self.step * 1_000 + self.draws) * 1_000_000 + self.first_row + i
            rows.append(torch.rand(mask.shape[1:], generator=torch.Generator().manual_seed(seed)) < keep)
        self.draws += 1
        return mask.copy_(torch.stack(rows))
