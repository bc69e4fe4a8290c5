"""The pipeline: loading real weights, the tiny random pipeline, and the narrow
`Generator` interface the batcher calls.

Real weights load from a local folder only (`local_files_only=True` with
`HF_HUB_OFFLINE=1`); nothing is ever downloaded. The tiny pipeline is built in
code from configs (docs/local-backend.md#a-tiny-pipeline-built-in-code) so tests and CPU demos need no
files at all, and `save_pretrained` + `load_pipeline` runs the real loading path
on CPU.

This is the only module that imports torch and diffusers, and it does so inside
functions, so that the HTTP layer and the batcher can be used with a fake
generator without them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

if TYPE_CHECKING:
    from local_backend.config import Settings

# Offline, always: set before diffusers/huggingface_hub read it at import.
os.environ["HF_HUB_OFFLINE"] = "1"

log = logging.getLogger(__name__)

# The real checkpoint stacks Qwen3 hidden states of layers 9, 18, 27 (docs/local-backend.md#the-model-and-its-pipeline).
REAL_ENCODER_LAYERS = (9, 18, 27)
# The distilled model runs without CFG (docs/local-backend.md#calling-the-pipeline: pass guidance 1.0).
GUIDANCE_SCALE = 1.0
# Previews are decoded from the latents pooled 2x2 (docs/local-backend.md#previews).
PREVIEW_POOL = 2

# on_preview(position in the call, steps done, preview image): called in the worker thread.
PreviewCallback = Callable[[int, int, Image.Image], None]


@dataclass(frozen=True, slots=True)
class BatchCall:
    """One pipeline call: one size, one step count, shared references; a prompt and a seed per image.

    `previews[n]` lists after which steps image n wants a preview (see
    `local_backend.schemas.preview_steps`); `on_preview` receives them. Empty: no previews, and the
    pipeline runs without a step-end callback."""

    prompts: Sequence[str]
    seeds: Sequence[int]
    width: int
    height: int
    steps: int
    references: Sequence[Image.Image] = field(default_factory=tuple)
    previews: Sequence[Sequence[int]] = field(default_factory=tuple)
    on_preview: PreviewCallback | None = None

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.seeds) or not self.prompts:
            raise ValueError("one prompt and one seed per image, at least one image")
        if self.previews and len(self.previews) != len(self.prompts):
            raise ValueError("previews: one list of steps per image")

    @property
    def wants_previews(self) -> bool:
        return self.on_preview is not None and any(self.previews)


class Generator(Protocol):
    """What the batcher needs from a pipeline. Not thread-safe: one call at a time."""

    device: str

    def generate(self, call: BatchCall) -> list[Image.Image]:
        """One image per prompt/seed pair, in order."""
        ...


def device_oom_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean 'out of device memory', without importing torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return ()
    return (torch.cuda.OutOfMemoryError,)


def release_memory() -> None:
    """Give cached device memory back after an out-of-memory error."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory_bytes() -> int | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated())


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def encoder_out_layers(pipe: Any) -> tuple[int, ...] | None:
    """Which text-encoder layers to stack; None keeps the pipeline's default.

    The real Qwen3-4B has 36 layers and uses (9, 18, 27). A smaller encoder (the
    tiny pipeline) uses its last k layers, where k = joint_attention_dim / hidden
    size, because the transformer expects exactly k stacked layers (docs/local-backend.md#a-tiny-pipeline-built-in-code).
    """
    layers = int(pipe.text_encoder.config.num_hidden_layers)
    if layers >= max(REAL_ENCODER_LAYERS):
        return None
    hidden = int(pipe.text_encoder.config.hidden_size)
    count = int(pipe.transformer.config.joint_attention_dim) // hidden
    return tuple(range(layers - count + 1, layers + 1))


class PipelineGenerator:
    """`Generator` over a `Flux2KleinPipeline`: one seeded torch.Generator per image."""

    def __init__(self, pipe: Any, device: str) -> None:
        self.pipe = pipe
        self.device = device
        self._layers = encoder_out_layers(pipe)

    def generate(self, call: BatchCall) -> list[Image.Image]:
        import torch

        generators = [torch.Generator(self.device).manual_seed(seed) for seed in call.seeds]
        kwargs: dict[str, Any] = {}
        if self._layers is not None:
            kwargs["text_encoder_out_layers"] = self._layers
        if call.references:
            kwargs["image"] = list(call.references)
        if call.wants_previews:
            kwargs["callback_on_step_end"] = self._step_end(call)
            kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        with torch.inference_mode():
            out = self.pipe(
                prompt=list(call.prompts),
                width=call.width,
                height=call.height,
                num_inference_steps=call.steps,
                guidance_scale=GUIDANCE_SCALE,
                generator=generators,
                output_type="pil",
                **kwargs,
            )
        return list(out.images)

    def _step_end(self, call: BatchCall) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
        """The step-end callback: after step i + 1, decode the rows of the images
        that want a preview there and hand each to `call.on_preview`. It never
        changes the latents (it returns no tensors), so the final images are
        those of a call without previews. A preview that fails to decode or to
        be handed over is logged and skipped: previews never fail a generation."""
        on_preview = call.on_preview
        assert on_preview is not None
        wanted = [set(steps) for steps in call.previews]

        def step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            step = i + 1
            rows = [n for n, steps in enumerate(wanted) if step in steps]
            if not rows:
                return {}
            try:
                images = decode_preview(pipe, tensors["latents"][rows], call.width, call.height)
            except Exception:
                log.warning("preview decode failed at step %d", step, exc_info=True)
                return {}
            for n, image in zip(rows, images, strict=True):
                try:
                    on_preview(n, step, image)
                except Exception:
                    log.warning("handing over a preview failed at step %d", step, exc_info=True)
            return {}

        return step_end


def decode_preview(pipe: Any, latents: Any, width: int, height: int) -> list[Image.Image]:
    """Packed latents (rows, h*w, 4C) of a Flux2 pipeline mid-loop -> small PIL images.

    The pipeline's own final decode, made cheaper: unpack (the latent ids are a
    row-major grid for text-to-image and edits alike, so unpacking is the
    inverse of `_pack_latents`), undo the VAE's batch norm, unpatchify 2x2,
    then average-pool the latent `PREVIEW_POOL` x `PREVIEW_POOL` before the
    real VAE decode: a preview of half the side, about a quarter of a full
    decode's cost (docs/local-backend.md#previews)."""
    import torch
    import torch.nn.functional as F

    scale = int(pipe.vae_scale_factor) * 2
    rows, seq, channels = latents.shape
    h, w = height // scale, width // scale
    if h * w != seq:
        raise ValueError(f"latents of {seq} tokens for a {h}x{w} grid")
    with torch.inference_mode():
        x = latents.permute(0, 2, 1).reshape(rows, channels, h, w)
        vae = pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.device, x.dtype)
        x = pipe._unpatchify_latents(x * std + mean)
        if PREVIEW_POOL > 1 and min(x.shape[-2:]) >= 2 * PREVIEW_POOL:
            x = F.avg_pool2d(x, PREVIEW_POOL)
        decoded = vae.decode(x.to(vae.dtype), return_dict=False)[0]
        return list(pipe.image_processor.postprocess(decoded, output_type="pil"))


# ---- the tiny random pipeline (docs/local-backend.md#a-tiny-pipeline-built-in-code) ------------------

_CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def tiny_tokenizer() -> Any:
    """A byte-level BPE with no merges plus Qwen's special tokens: no download needed."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[], pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def tiny_pipeline(seed: int = 0) -> Any:
    """A random `Flux2KleinPipeline` with the real geometry (multiples of 16,
    4 VAE blocks) and tiny widths; 64x64 at 4 steps takes tens of ms on a CPU."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48,  # 48 = 3 stacked layers x hidden 16
        timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False,
    )  # fmt: skip
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            hidden_size=16, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=2, head_dim=8, vocab_size=len(tok), max_position_embeddings=512,
        )
    )  # fmt: skip
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        latent_channels=1, norm_num_groups=1, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, shift=3.0, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    pipe = Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
        transformer=transformer, is_distilled=True,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- real weights ----------------------------------------------------------------


def load_pipeline(settings: Settings) -> Any:
    """`Flux2KleinPipeline` from a local folder, on the configured device and dtype.

    Refuses anything but the distilled model: this service always runs it with
    guidance 1.0 and few steps, which would silently ruin the base model's output.
    """
    if settings.model_path is None:
        raise ValueError("load_pipeline needs settings.model_path")
    if not settings.model_path.is_dir():
        raise FileNotFoundError(f"model folder not found: {settings.model_path}")
    import diffusers
    from diffusers import Flux2KleinPipeline

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    # `dtype=` is the spelling from diffusers 0.40 on; `torch_dtype=` warns there (docs/local-backend.md#versions).
    major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (0, 40) else "torch_dtype"
    pipe = Flux2KleinPipeline.from_pretrained(str(settings.model_path), local_files_only=True, **{dtype_kw: dtype})
    if not pipe.config.get("is_distilled", False):
        raise ValueError("the model folder is not the distilled FLUX.2 [klein] (is_distilled is not true)")
    return prepare(pipe, settings, device)


def prepare(pipe: Any, settings: Settings, device: str) -> Any:
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if settings.compile:
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    return pipe


def build_generator(settings: Settings) -> PipelineGenerator:
    """The generator the service runs: real weights, or the tiny pipeline."""
    device = resolve_device(settings.device)
    if settings.tiny:
        pipe = tiny_pipeline()  # built in float32
        dtype = resolve_dtype(settings.dtype, device)
        if dtype != pipe.dtype:
            pipe.to(dtype=dtype)
        pipe = prepare(pipe, settings, device)
    else:
        pipe = load_pipeline(settings)
    log.info("pipeline ready on %s (%s)", device, type(pipe).__name__)
    return PipelineGenerator(pipe, device)
