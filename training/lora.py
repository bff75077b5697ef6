"""LoRA fine-tuning of Whisper on corrected utterances (peft + accelerate).

Each utterance is trained as Whisper was: ``<|startoftranscript|><|lang|><|transcribe|>``
then the text, by default with a ``<|0.00|> … <|end|>`` timestamp pair, the mode the serving
engine decodes in (on real accented speech the loop learned more than with half of them trained
with ``<|notimestamps|>``). ``timestamped_share`` below 1 trains that share with timestamps and
the rest without, for those who also decode without them. The annotated language token is part
of the target, which also teaches the language head.

With ``encoder=False`` only the decoder gets adapters. The encoder is then frozen and
deterministic, so its output is computed once per utterance and reused in every epoch: 5-10x
faster on CPU, and spelling of names and jargon (what corrections mostly fix) lives in the
decoder. ``encoder=True`` (the product's default, ``LORA_ENCODER``) adapts acoustics too
(accents, noise). With ``encoder_layers=N`` only the top N encoder layers get adapters; the
layers below stay frozen, so their output is cached the same way and each step runs (forward
and backward) only the top of the encoder.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from ml_backend.audio import SAMPLE_RATE
from ml_backend.decoding import SpecialTokens
from ml_backend.settings import Settings, speed_share, unit_share
from ml_backend.whisper import (
    MAX_TIMESTAMP_INDEX,
    TIME_PRECISION,
    avoid_cudnn_attention,
    load_whisper,
    pick_device,
    pick_dtype,
    quiet_peft,
)

from .dataset import Example

log = logging.getLogger(__name__)

MAX_TARGET_TOKENS = 440  # Whisper's decoder context is 448
ENCODER_CACHE_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class LoraArguments:
    """Fine-tuning hyper-parameters; defaults follow peft's Whisper LoRA recipe (r=32, alpha=64, q/v, lr 1e-3)."""

    r: int = 32
    alpha: int = 64
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    encoder: bool = False
    encoder_layers: int = 0  # with encoder: adapt only the top N encoder layers, cache the rest; 0: all
    spec_augment: bool = False  # mask mel bands and time spans of each utterance at each step (whole encoder only)
    speed_perturb: float = 0.0  # play each utterance at each step at 1 - s, 1 or 1 + s its speed (whole encoder only)
    init_adapter: str | None = None  # start from this saved adapter's weights (the live one) instead of fresh ones
    epochs: int = 5
    max_steps: int = 0  # stop after this many optimizer steps, mid-epoch if need be; 0: all the epochs
    learning_rate: float = 1e-3
    batch_size: int = 8
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    timestamped_share: float = 1.0  # share of utterances trained with a timestamp pair, the rest <|notimestamps|>
    seed: int = 0
    device: str = "auto"  # WHISPER_DEVICE: the same choice as serving
    dtype: str = "auto"  # WHISPER_DTYPE: fp16/bf16 become mixed precision, fp32 none

    @classmethod
    def from_settings(cls, settings: Settings, **overrides) -> LoraArguments:
        args = cls(r=settings.lora_r, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
                   target_modules=settings.lora_target_modules, encoder=settings.lora_encoder,
                   encoder_layers=settings.lora_encoder_layers, spec_augment=settings.train_spec_augment,
                   speed_perturb=settings.train_speed_perturb, timestamped_share=settings.train_timestamped_share,
                   epochs=settings.train_epochs, max_steps=settings.train_max_steps,
                   learning_rate=settings.train_learning_rate, batch_size=settings.train_batch_size,
                   device=settings.device, dtype=settings.dtype)
        return replace(args, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LoraArguments:
        """The inverse of :meth:`to_dict`, also after JSON (which turns the module tuple into a list)."""
        return cls(**{**values, "target_modules": tuple(values["target_modules"])})


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    steps: int
    final_loss: float
    seconds: float
    examples: int
    device: str
    peak_memory_mb: float | None
    parameters: int = 0
    trainable_parameters: int = 0
    processes: int = 1  # data-parallel training processes (accelerate / DDP)
    warm_started: bool = False  # began from ``LoraArguments.init_adapter`` (False: it did not fit, or none given)


@dataclass
class Progress:
    step: int
    total_steps: int
    loss: float
    eta_s: float


def timestamped(task: int, share: float) -> bool:
    """Whether task ``task``'s utterance trains with a timestamp pair: a ``share`` of consecutive task ids,
    spread evenly (at 0.5 the even ids), so the choice is the same in every epoch and every process."""
    return math.floor((task + 2) * share) > math.floor((task + 1) * share)


def target_tokens(tokenizer, special: SpecialTokens, example: Example, timestamps: bool) -> list[int]:
    """The full decoder sequence, ``<|startoftranscript|>`` … ``<|endoftext|>``."""
    prompt = [special.sot]
    if special.multilingual:
        language = example.language if example.language in special.languages else "en"
        prompt += [special.languages[language], special.transcribe]
    text = tokenizer.encode(" " + example.text.strip(), add_special_tokens=False)
    if timestamps:
        end = min(round(example.duration / TIME_PRECISION), MAX_TIMESTAMP_INDEX)
        body = [special.timestamp_begin] + text + [special.timestamp_begin + end]
    else:
        body = [special.no_timestamps] + text
    return (prompt + body)[: MAX_TARGET_TOKENS - 1] + [special.eot]


def device_and_precision(device_setting: str = "auto", dtype_setting: str = "auto") -> tuple[str, str]:
    """The training device and accelerate's mixed precision, from the settings serving uses."""
    device = pick_device(device_setting)
    dtype = pick_dtype(dtype_setting, device, training=True)
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")
    if device.type == "cpu" and precision == "fp16":
        log.warning("fp16 mixed precision needs a GPU; training on the CPU in float32")
        precision = "no"
    return device.type, precision


def adapted_encoder_layers(args: LoraArguments, depth: int) -> range:
    """Which of the ``depth`` encoder layers get adapters: none, the top ``encoder_layers``, or all of them."""
    if not args.encoder:
        return range(depth, depth)
    if args.encoder_layers < 0:
        raise ValueError(f"encoder_layers must be 0 (all) or a number of top layers, not {args.encoder_layers}")
    return range(max(0, depth - args.encoder_layers) if args.encoder_layers else 0, depth)


def lora_config(args: LoraArguments, encoder_depth: int):
    """peft's ``LoraConfig`` for ``args``: the target modules in the decoder and in the adapted encoder layers
    (:func:`adapted_encoder_layers` of a Whisper whose encoder has ``encoder_depth`` layers)."""
    from peft import LoraConfig

    modules = "|".join(args.target_modules)
    layers = adapted_encoder_layers(args, encoder_depth)
    if len(layers) == encoder_depth:
        scope = r".*"
    elif layers:
        scope = rf"(.*decoder.*|.*encoder\.layers\.({'|'.join(map(str, layers))})\..*)"
    else:
        scope = r".*decoder.*"
    return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                      target_modules=rf"{scope}\.({modules})$", bias="none")


FREQUENCY_MASK_BINS = 10  # widest band of 80 mels (transformers' Whisper mask_feature_length), scaled to the model's
TIME_MASK_SHARE = 0.05  # each time mask covers at most this share of the utterance's own frames (not the padding)
MASKS = 2  # of each kind


def spec_augment(features: torch.Tensor, frames: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """SpecAugment (Park et al., 2019) on a batch of Whisper log-mel ``features`` (batch, mels, 3000): per
    utterance ``MASKS`` random frequency bands and ``MASKS`` random time spans inside its first ``frames[i]``
    frames set to 0, as transformers' Whisper does. Why: a few hundred corrections are few enough to memorise;
    masking makes every epoch's copy of an utterance a little different."""
    masked = features.clone()
    mels, length = features.shape[1], features.shape[2]
    widest_band = max(1, round(FREQUENCY_MASK_BINS * mels / 80))

    def draw(high: int) -> int:
        return int(torch.randint(0, max(0, high) + 1, (1,), generator=generator))

    for row, speech in enumerate(frames):
        speech = max(1, min(int(speech), length))
        for _ in range(MASKS):
            width = draw(widest_band)
            start = draw(mels - width)
            masked[row, start : start + width, :] = 0
            width = draw(int(speech * TIME_MASK_SHARE))
            start = draw(speech - width)
            masked[row, :, start : start + width] = 0
    return masked


def at_speed(example: Example, factor: float) -> Example:
    """``example`` played ``factor`` times as fast: 1/factor as long, its pitch ``factor`` times as high, as a
    faster, higher voice would say it (speed perturbation, Ko et al., 2015: Kaldi's 0.9/1.0/1.1 recipe). Why: a
    project's corrections come from a few dozen voices; other speeds are other plausible voices for the encoder
    to learn the accent on, and they cost no step time (Whisper pads every utterance to 30 s)."""
    import librosa

    if factor == 1:
        return example
    audio = librosa.resample(example.audio.astype("float32"), orig_sr=round(SAMPLE_RATE * factor),
                             target_sr=SAMPLE_RATE, res_type="soxr_hq")
    return replace(example, audio=audio)


def run_encoder_layers(encoder, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Whisper's encoder from the input of layer ``start`` on: the layers from there, then the final norm
    (what ``WhisperEncoder.forward`` does after its convolutions; layer drop is 0 in Whisper's configs)."""
    for layer in encoder.layers[start:]:
        out = layer(hidden, None)
        hidden = out[0] if isinstance(out, tuple) else out
    return encoder.layer_norm(hidden)


def encoder_layer_input(encoder, features: torch.Tensor, start: int) -> torch.Tensor:
    """The input of encoder layer ``start`` for these mel ``features`` (``start`` = depth: the encoder's output)."""
    if start >= len(encoder.layers):
        return encoder(features).last_hidden_state
    captured: list[torch.Tensor] = []

    class _Enough(Exception):
        """Stops the encoder once the input of layer ``start`` is captured: the layers above it are not needed."""

    def capture(module, positional, keywords):
        captured.append(positional[0] if positional else keywords["hidden_states"])
        raise _Enough

    handle = encoder.layers[start].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        encoder(features)
    except _Enough:
        pass
    finally:
        handle.remove()
    return captured[0]


def train_lora(
    base_path: str,
    examples: Sequence[Example],
    args: LoraArguments,
    out_dir: Path,
    *,
    on_step: Callable[[Progress], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a LoRA adapter on ``examples`` over the Whisper at ``base_path``; save it (peft format) to ``out_dir``.

    Under ``accelerate launch`` with several processes (:mod:`training.distributed`) every process walks the same
    shuffled batches and takes its share of each (DDP averages the gradients), so the steps, the schedule and the
    adapter's format are those of one process; only the main process reports progress and saves.
    """
    from accelerate import Accelerator
    from peft import get_peft_model
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    if not examples:
        raise ValueError("no training examples")
    try:
        speed_share(args.speed_perturb)
    except ValueError as exc:
        raise ValueError(f"speed_perturb {args.speed_perturb}: {exc}") from None
    try:
        unit_share(args.timestamped_share)
    except ValueError as exc:
        raise ValueError(f"timestamped_share {args.timestamped_share}: {exc}") from None
    started = time.perf_counter()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device, precision = device_and_precision(args.device, args.dtype)
    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")

    loaded = load_whisper(base_path, dtype=torch.float32, attn_implementation=None)
    tokenizer, features, special, model = loaded.tokenizer, loaded.feature_extractor, loaded.special, loaded.model
    model.config.use_cache = False

    with quiet_peft():
        model = get_peft_model(model, lora_config(args, model.config.encoder_layers))
    warm_started = args.init_adapter is not None and warm_start(model, Path(args.init_adapter), args)
    if device == "cuda":
        avoid_cudnn_attention()  # variable-length batches: a cuDNN plan per shape made epoch 1 2.9x slower
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.encoder:
            model.enable_input_require_grads()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parameters = sum(p.numel() for p in model.parameters())
    adapted = adapted_encoder_layers(args, model.config.encoder_layers)
    scope = ("decoder" if not adapted else "encoder+decoder" if adapted.start == 0
             else f"decoder + encoder layers {adapted.start}-{adapted.stop - 1}")
    log.info("LoRA r=%d alpha=%d on %s (%s): %.2f M trainable parameters, %d examples",
             args.r, args.alpha, "|".join(args.target_modules), scope, trainable / 1e6, len(examples))

    sequences = [target_tokens(tokenizer, special, ex, timestamps=timestamped(ex.task, args.timestamped_share))
                 for ex in examples]
    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total_steps * args.warmup_ratio), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    whisper = accelerator.unwrap_model(model).base_model.model  # WhisperForConditionalGeneration

    def mel(utterances: Sequence[Example]) -> torch.Tensor:
        return features([u.audio for u in utterances], sampling_rate=SAMPLE_RATE,
                        return_tensors="pt").input_features.to(accelerator.device)

    # Everything below the first adapted encoder layer is frozen and deterministic: computed once per utterance
    # (the input of that layer, or the encoder's output when only the decoder is adapted) and cached.
    encoder = whisper.model.encoder
    frozen_below = adapted.start if adapted else len(encoder.layers)
    encoder_cache: dict[int, torch.Tensor] = {}
    hidden = whisper.config.d_model * whisper.config.max_source_positions * 4
    cache_encoder = frozen_below > 0 and hidden * len(examples) <= ENCODER_CACHE_BYTES

    def frozen_part(batch: list[int]) -> torch.Tensor:
        missing = [i for i in batch if i not in encoder_cache]
        if missing:
            with torch.no_grad(), accelerator.autocast():
                out = encoder_layer_input(encoder, mel([examples[i] for i in missing]), frozen_below)
            if not cache_encoder:
                fresh = dict(zip(missing, out))
                return torch.stack([fresh[i] for i in batch])
            encoder_cache.update({i: h for i, h in zip(missing, out)})
        return torch.stack([encoder_cache[i] for i in batch])

    augment = torch.Generator().manual_seed(args.seed)
    for augmentation, asked in (("SpecAugment", args.spec_augment), ("speed perturbation", args.speed_perturb)):
        if asked and frozen_below > 0:
            log.warning("%s needs the whole encoder trained (its frozen layers' output is cached): not applied",
                        augmentation)
    speeds = (1 - args.speed_perturb, 1.0, 1 + args.speed_perturb) if args.speed_perturb and frozen_below == 0 else ()

    def as_trained(batch: list[int]) -> list[Example]:
        """The batch's utterances as this step sees them: each at a speed drawn afresh when perturbing."""
        if not speeds:
            return [examples[i] for i in batch]
        drawn = torch.randint(0, len(speeds), (len(batch),), generator=augment).tolist()
        return [at_speed(examples[i], speeds[d]) for i, d in zip(batch, drawn)]

    def encode(batch: list[int], utterances: list[Example]) -> torch.Tensor:
        if frozen_below == 0:
            log_mel = mel(utterances)
            if args.spec_augment:
                frames = [u.audio.size // features.hop_length for u in utterances]
                log_mel = spec_augment(log_mel, frames, augment)
            return encoder(log_mel).last_hidden_state
        if frozen_below == len(encoder.layers):
            return frozen_part(batch)
        with accelerator.autocast():
            return run_encoder_layers(encoder, frozen_part(batch), frozen_below)

    def decoder_batch(batch: list[int], utterances: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        # a perturbed utterance's length changed, and with it the end timestamp of its target
        targets = ([target_tokens(tokenizer, special, u, timestamps=timestamped(u.task, args.timestamped_share))
                    for u in utterances]
                   if speeds else [sequences[i] for i in batch])
        longest = max(len(t) for t in targets)
        inputs = torch.full((len(batch), longest - 1), special.eot, dtype=torch.long)
        labels = torch.full((len(batch), longest - 1), -100, dtype=torch.long)
        for row, target in enumerate(targets):
            seq = torch.tensor(target)
            inputs[row, : len(seq) - 1] = seq[:-1]
            labels[row, : len(seq) - 1] = seq[1:]
        return inputs.to(accelerator.device), labels.to(accelerator.device)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model.train()
    order = list(range(len(examples)))
    step, loss_value, smoothed = 0, float("nan"), None
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(total=total_steps, desc="LoRA fine-tuning", unit="step", disable=not progress or not main)
    loop_start = time.perf_counter()
    for _ in range(args.epochs):
        random.shuffle(order)
        for start in range(0, len(order), args.batch_size):
            if step == total_steps:
                break
            batch = shard(order[start : start + args.batch_size], rank, world)
            utterances = as_trained(batch)
            encoded = encode(batch, utterances)
            inputs, labels = decoder_batch(batch, utterances)
            with accelerator.autocast():
                logits = model(encoder_outputs=(encoded,), decoder_input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            loss_value = float(accelerator.reduce(loss.detach(), "mean")) if world > 1 else float(loss.detach())
            smoothed = loss_value if smoothed is None else 0.8 * smoothed + 0.2 * loss_value
            elapsed = time.perf_counter() - loop_start
            eta = elapsed / step * (total_steps - step)
            bar.set_postfix(loss=f"{smoothed:.3f}")
            bar.update(1)
            if on_step is not None and main:
                on_step(Progress(step, total_steps, smoothed, eta))
    bar.close()

    out_dir = Path(out_dir)
    if world > 1:
        check_replicas_agree(accelerator, accelerator.unwrap_model(model))
    accelerator.wait_for_everyone()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        accelerator.unwrap_model(model).save_pretrained(out_dir)
    accelerator.wait_for_everyone()
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return TrainResult(out_dir, step, float(smoothed if smoothed is not None else loss_value),
                       time.perf_counter() - started, len(examples), str(accelerator.device), peak,
                       parameters, trainable, world, warm_started)


def warm_start(model, adapter_dir: Path, args: LoraArguments) -> bool:
    """Copy the weights of the adapter saved at ``adapter_dir`` into ``model``'s fresh one, when they fit.

    They fit when the saved adapter has the same rank and scaling and adapts the same modules (tensor names and
    shapes); otherwise (the recipe changed since it was trained) this says why and the adapter stays fresh.
    Why start there: the job then refines the model that serves, so candidate and live model differ by what the
    new corrections taught, and the gate's paired comparison sees that difference instead of two adapters'
    independent noise.
    """
    import json

    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    fresh = get_peft_model_state_dict(model)
    if (config.get("r"), config.get("lora_alpha")) != (args.r, args.alpha):
        why = f"it has r={config.get('r')} alpha={config.get('lora_alpha')}, this job r={args.r} alpha={args.alpha}"
    elif saved.keys() != fresh.keys() or any(saved[k].shape != fresh[k].shape for k in saved):
        why = "it adapts other modules than this job's"
    else:
        set_peft_model_state_dict(model, saved)
        log.info("warm start: the adapter begins as %s", adapter_dir)
        return True
    log.warning("not starting from the adapter at %s: %s; training a fresh one", adapter_dir, why)
    return False


def scale_adapter(adapter_dir: Path, out_dir: Path, strength: float) -> Path:
    """A copy of the peft adapter at ``adapter_dir`` whose update is ``strength`` times the trained one.

    A LoRA layer adds ``B·A`` (times alpha/r) to a frozen weight, so scaling every ``lora_B`` by ``strength``
    moves the model along the line from the base (0) to the adapter as trained (1). Half strength kept 93 % of
    an encoder adapter's held-out gain on speechocean762 while giving back general speech (README: training).
    """
    from safetensors.torch import load_file, save_file

    if not 0 < strength <= 1:
        raise ValueError(f"adapter strength must be in (0, 1], not {strength}")
    shutil.copytree(adapter_dir, out_dir, dirs_exist_ok=True)  # config and all; the weights are rewritten below
    weights = out_dir / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * strength if ".lora_B." in k else v for k, v in tensors.items()}, str(weights),
              metadata={"format": "pt"})
    return out_dir


def check_replicas_agree(accelerator, model) -> None:
    """Every process must end with the same adapter (DDP all-reduces the gradients): a replica that drifted, say
    through parameters used outside the wrapped forward, would make the saved adapter one process's guess."""
    trainable = [p.detach().double().sum() for p in model.parameters() if p.requires_grad]
    checksum = torch.stack(trainable).sum().reshape(1).to(accelerator.device)
    everyone = accelerator.gather(checksum).cpu()
    if not torch.allclose(everyone, everyone[0].expand_as(everyone), rtol=1e-6, atol=1e-9):
        raise RuntimeError(f"data-parallel replicas ended with different adapters (checksums {everyone.tolist()})")


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """Process ``rank``'s share of a global batch. Every process must take part in every step (DDP waits for
    all), so a batch smaller than the process count is repeated to fill the short shares."""
    if world <= 1:
        return batch
    mine = batch[rank::world]
    return mine or [batch[rank % len(batch)]]
