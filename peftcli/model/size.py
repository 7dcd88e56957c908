"""Will it fit? An estimate of peak GPU memory for a recipe, from config.json alone (no torch).

peak = weights + trainable state + activations, for a dense decoder-only transformer:

- weights: every parameter in the compute dtype; with `quantization`, the linear layers of the
  decoder at 4 bits (+ the block scales: 1/16 byte per weight, or ~1/64 with double quant) or 8 bits,
  and the embeddings, head and norms in fp32 (peft's k-bit preparation upcasts what bitsandbytes left);
- trainable state: PEFT parameters in fp32 with their gradient and two AdamW moments (16 B each);
  a full fine-tune keeps bf16 gradients and fp32 moments beside its weights (10 B per parameter);
- activations, per token of the largest micro-batch: the inputs each layer saves for backward (norm
  in/out, q/k/v, attention output, the MLP's gate, up, activation and product), or with gradient
  checkpointing only each layer's input plus one layer being recomputed; and the gradients alive
  while a layer back-propagates (its MLP's and the hidden state's). In the compute dtype, except the
  residual stream of a k-bit base, which its fp32 norms keep in fp32. Logits are not counted: TRL's
  fused LM head never materialises them.

The token count is what the largest micro-batch holds: batch_size x max_length for packed rows (and
the bound for padded ones); a padded batch holds batch_size x its longest example, so the bench
passes the largest batch it saw. Checked against two H200 measurements (peak
`torch.cuda.max_memory_allocated`, scripts/bench.py configs, checkpointing on, padded batches):
llama-1b LoRA, largest batch 8 x 943 tokens: 4.10 GiB measured; llama-8b QLoRA, largest batch 519
tokens: 8.62 GiB measured; tests/test_performance.py pins both within 10 %. The CUDA context and
allocator fragmentation are not counted (the `auto` checkpointing margin covers them).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcli.methods import method_of

GIB = 2**30
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        return cls(
            hidden=hidden,
            layers=config["num_hidden_layers"],
            vocab=config["vocab_size"],
            intermediate=config.get("intermediate_size", 4 * hidden),
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            tied=bool(config.get("tie_word_embeddings", False)),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder block, by module name."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    def other_params(self) -> int:
        """Embeddings, output head and norms: kept in the compute dtype when quantized."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    def saved_per_token_layer(self, width: int, residual: int) -> int:
        """Bytes one decoder layer saves for backward per token: norm inputs and outputs (residual
        stream), q and the attention output, k, v, and the MLP's gate, up, activation and product."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 4 * self.hidden * residual + (2 * q + 2 * kv + 4 * self.intermediate) * width

    def backward_working_per_token(self, width: int) -> int:
        """Bytes of gradients alive while one layer back-propagates: its MLP's two and the hidden state's."""
        return (2 * self.intermediate + 2 * self.hidden) * width


@dataclass(frozen=True)
class Estimate:
    weights_gib: float
    trainable_gib: float
    activations_gib: float
    trainable_params: int
    total_params: int
    tokens_per_micro_batch: int
    checkpointing: bool
    dtype: str

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.trainable_gib + self.activations_gib

    def describe(self) -> str:
        return (
            f"fit estimate (GPU, {self.dtype}, {self.tokens_per_micro_batch:,} tokens per micro-batch, "
            f"gradient checkpointing {'on' if self.checkpointing else 'off'}): weights {self.weights_gib:.2f} GiB"
            f" + trainable {self.trainable_gib:.2f} GiB + activations {self.activations_gib:.2f} GiB = "
            f"{self.total_gib:.2f} GiB peak"
        )


def trainable_params(peft, shape: Shape) -> int:
    """Trainable parameters of the method: the registry's count for it (methods/)."""
    return method_of(peft).count_trainable(peft, shape)


def estimate(recipe, config: dict, checkpointing: bool | None = None, tokens: int | None = None) -> Estimate:
    """Peak memory of training `recipe` on `config`. `tokens`: of the largest micro-batch, when known
    (a padded batch holds batch_size x its longest example); batch_size x max_length otherwise."""
    shape = Shape.from_config(config)
    dtype = "bfloat16" if recipe.model.dtype == "auto" else recipe.model.dtype
    width = BYTES[dtype]
    quant = recipe.quantization
    linear, other = shape.linear_params(), shape.other_params()
    weights: float
    if quant is None:
        weights = (linear + other) * width
        residual = width
    else:
        per_weight = 1.0 if quant.bits == 8 else 0.5 + (1 / 64 if quant.effective_double_quant else 1 / 16)
        weights = linear * per_weight + other * 4
        residual = 4
    method = method_of(recipe.peft)
    trainable = method.count_trainable(recipe.peft, shape)
    state = trainable * (10 if method.saves_full_model else 16)
    if checkpointing is None:
        setting = recipe.training.gradient_checkpointing
        checkpointing = setting if isinstance(setting, bool) else method.checkpointing
    tokens = tokens or recipe.training.batch_size * recipe.data.max_length
    layer = shape.saved_per_token_layer(width, residual)
    stored = (shape.layers * shape.hidden * residual + layer) if checkpointing else shape.layers * layer
    per_token = stored + shape.backward_working_per_token(width)
    return Estimate(
        weights / GIB,
        state / GIB,
        tokens * per_token / GIB,
        trainable,
        linear + other,
        tokens,
        checkpointing,
        dtype,
    )
