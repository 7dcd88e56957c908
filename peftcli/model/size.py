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


def estimated_micro_batch(training) -> int:
    """The micro-batch an estimate assumes: the recipe's, or with batch_size: auto the smallest one
    (what `auto` checkpointing decides on; the batch is then picked to fill what is left)."""
    return training.batch_size if isinstance(training.batch_size, int) else 1


def trainable_params(peft, shape: Shape) -> int:
    """Trainable parameters of the method: the registry's count for it (methods/)."""
    return method_of(peft).count_trainable(peft, shape)


def estimate(recipe, config: dict, checkpointing: bool, tokens: int | None = None) -> Estimate:
    """Peak memory of training `recipe` on `config`, with gradient checkpointing on or off as given:
    what model/speed.py decided (`Settings.gradient_checkpointing`), the one home of the `auto` rule.
    `tokens`: of the largest micro-batch, when known (a padded batch holds batch_size x its longest
    example); batch_size x max_length otherwise."""
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
    tokens = tokens or estimated_micro_batch(recipe.training) * recipe.data.max_length
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


# --- batch_size: auto ---------------------------------------------------------------------------


def split(effective: int, cap: int) -> tuple[int, int]:
    """(micro-batch, accumulation) for `effective` examples per step with micro-batches of at most
    `cap`: the fewest accumulation steps; exactly `effective` when up to twice as many steps allow
    it (16 with a cap of 15 is 8 x 2, not 15 x 2), else micro-batches as even as possible, which
    overshoot by less than one example per step (17 with a cap of 10 is 9 x 2)."""
    cap = max(1, min(cap, effective))
    fewest = -(-effective // cap)
    for steps in range(fewest, 2 * fewest + 1):
        if effective % steps == 0:
            return effective // steps, steps
    return -(-effective // fewest), fewest


def pick(budget_bytes: float, per_example_bytes: float, fixed_bytes: float, margin: float, effective: int):
    """(micro-batch, accumulation): the largest micro-batch whose estimate, `fixed_bytes` (weights,
    trainable state) plus `per_example_bytes` per example, fits `budget_bytes` with `margin` on top
    (0.15 = 15 %), and the accumulation that keeps `effective` examples per step. (1, effective)
    when not even one example fits: the trial step then says so."""
    usable = budget_bytes / (1 + margin) - fixed_bytes
    fits = int(usable // per_example_bytes) if per_example_bytes > 0 else effective
    return split(effective, max(1, fits))


@dataclass(frozen=True)
class BatchPlan:
    micro: int  # examples per device per micro-batch
    accumulation: int
    reason: str


def plan_batch(
    recipe, config: dict, cuda: bool, free_gib: float | None, checkpointing: bool, margin: float, reserve_gib: float
) -> BatchPlan:
    """The batch a recipe trains with on a machine: its own numbers, or for batch_size: auto the
    largest micro-batch of data.max_length tokens per example that the fit estimate puts in
    `free_gib` less `reserve_gib` with `margin` (on a GPU; the trial step confirms it), and on a CPU
    a small one. Either way the accumulation keeps training.effective_batch_size per step, over
    WORLD_SIZE processes."""
    import os

    from peftcli.recipe.schema import CPU_MICRO_BATCH

    t = recipe.training
    if isinstance(t.batch_size, int):
        return BatchPlan(t.batch_size, t.gradient_accumulation, "set in the recipe")
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    per_device = -(-t.target_batch // world)
    keeps = f"to keep {t.target_batch} examples per step" + (f" over {world} processes" if world > 1 else "")
    if not cuda:
        micro, steps = split(per_device, CPU_MICRO_BATCH)
        return BatchPlan(micro, steps, f"auto: a small micro-batch on CPU, where memory is not the limit, {keeps}")
    try:
        guess = estimate(recipe, config, checkpointing, tokens=recipe.data.max_length) if config else None
    except (KeyError, TypeError, ZeroDivisionError):
        guess = None
    if guess is None or free_gib is None:
        micro, steps = split(per_device, CPU_MICRO_BATCH)
        unknown = "the model's shape" if guess is None else "the free GPU memory"
        return BatchPlan(micro, steps, f"auto: {unknown} is unknown, so a small micro-batch, {keeps}")
    budget = (free_gib - reserve_gib) * GIB
    fixed = (guess.weights_gib + guess.trainable_gib) * GIB
    micro, steps = pick(budget, guess.activations_gib * GIB, fixed, margin, per_device)
    room = f"{free_gib:.1f} GiB free less {reserve_gib:g} GiB, with a {margin:.0%} margin"
    if fixed + guess.activations_gib * GIB > budget / (1 + margin):
        return BatchPlan(micro, steps, f"auto: by the fit estimate not even one example fits {room}")
    return BatchPlan(
        micro,
        steps,
        f"auto: the largest micro-batch of {recipe.data.max_length:,} tokens per example that fits {room} by the "
        f"fit estimate, {keeps}",
    )
