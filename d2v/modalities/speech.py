"""Speech plug-in: wav2vec 2.0-style encoder used by data2vec audio, span masking, presets (spec §2.1, §5.1).

The papers' front end is a CNN on raw waveforms. A log-mel front end (`frontend="fbank"`, not in the papers) is
an option for small budgets: a randomly initialised or briefly trained waveform CNN gives frames that a CTC head
cannot read in hundreds of CPU updates, while filterbanks are informative from the first step
(`bench/ctc_reference.py`)."""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from d2v.config import (CollapseConfig, DecoderConfig, EMAConfig, LossConfig, ObjectiveConfig, StrictModel, V2Config,
                        V2MaskConfig)
from d2v.modalities.base import (Batch, Embedded, Encoder, EncoderOutput, Modality, Views, from_host, gather_tokens,
                                 host_positions, replace_masked, require_unpadded, run_blocks, visible_indices)
from d2v.modalities.masks_v2 import block_masks
from d2v.nn import bert_init, deepnorm_constants, deepnorm_init, make_block
from d2v.nn.layers import alibi_bias, alibi_slopes, scale_grad

BASE_CONV = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2  # 320-sample hop, 400-sample field


class FbankConfig(StrictModel):
    """Log-mel front end: 25 ms windows every 10 ms, then a conv of `stride` 2 → 50 frames/s, the CNN's rate."""

    n_mels: int = Field(80, ge=1)
    channels: int = Field(256, ge=1)
    kernel: int = Field(11, ge=1)
    stride: int = Field(2, ge=1)
    sample_rate: int = 16_000
    n_fft: int = 400
    hop: int = 160


class SpeechEncoderConfig(StrictModel):
    # waveform: wav2vec 2.0's CNN on raw audio (the papers'); fbank: log-mel filterbanks and one strided conv, a
    # front end a CPU can learn from in minutes where a random or briefly trained CNN cannot (docs/findings.md, speech)
    frontend: Literal["waveform", "fbank"] = "waveform"
    conv_layers: tuple[tuple[int, int, int], ...] = BASE_CONV  # waveform: (channels, kernel, stride)
    fbank: FbankConfig = FbankConfig()
    dim: int = Field(768, ge=1)
    depth: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    ffn_dim: int = Field(3072, ge=1)
    norm_first: bool = False  # post-LN (data2vec audio); True = pre-LN with the encoder LN after the blocks
    pos_conv_depth: int = Field(5, ge=1)
    pos_conv_kernel: int = Field(19, ge=1)  # max(3, conv_pos 95 // depth 5)
    pos_conv_groups: int = Field(16, ge=1)
    eps: float = Field(1e-5, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    attn_dropout: float = Field(0.1, ge=0, lt=1)
    activation_dropout: float = Field(0.0, ge=0, lt=1)
    layerdrop: float = Field(0.05, ge=0, lt=1)
    alibi: bool = False  # data2vec 2.0: symmetric ALiBi attention bias with a learned per-head scale
    # DeepNorm (data2vec's AudioSet recipe, spec §2.1): post-LN blocks LN(α·x + f(x)) with DeepNet's init
    deepnorm: bool = False
    # what fills the frames a fine-tuning time mask hides: the mask embedding (None), or N(0, σ²) noise, as fairseq
    # fine-tunes data2vec 2.0 models, which have no mask embedding (spec §9.2)
    mask_noise_std: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _deepnorm_is_post_ln(self):
        if self.deepnorm and self.norm_first:
            raise ValueError("deepnorm: DeepNorm scales the residual of post-LN blocks; it needs norm_first: false")
        return self


def _conv(channels: int) -> tuple[tuple[int, int, int], ...]:
    return tuple((channels, k, s) for _, k, s in BASE_CONV)


SPEECH_PRESETS = {
    "base": SpeechEncoderConfig(),
    "large": SpeechEncoderConfig(dim=1024, depth=24, num_heads=16, ffn_dim=4096),  # heads: wav2vec2 convention
    # data2vec 1.0's AudioSet recipe (spec §2.1): Base with DeepNorm blocks; its objective is speech_objective_audioset
    "audioset": SpeechEncoderConfig(deepnorm=True),
    "embedded": SpeechEncoderConfig(conv_layers=_conv(128), dim=256, depth=4, num_heads=4, ffn_dim=1024,
                                    pos_conv_groups=16),
    "embedded-fbank": SpeechEncoderConfig(frontend="fbank", dim=256, depth=4, num_heads=4, ffn_dim=1024,
                                          pos_conv_groups=16),
    "tiny": SpeechEncoderConfig(conv_layers=_conv(32), dim=64, depth=2, num_heads=4, ffn_dim=128, pos_conv_depth=2,
                                pos_conv_kernel=7, pos_conv_groups=4, layerdrop=0.0),
    "tiny-fbank": SpeechEncoderConfig(frontend="fbank", fbank=FbankConfig(n_mels=40, channels=32), dim=64, depth=2,
                                      num_heads=4, ffn_dim=128, pos_conv_depth=2, pos_conv_kernel=7, pos_conv_groups=4,
                                      layerdrop=0.0),
}


def v2_encoder(cfg: SpeechEncoderConfig, size: str = "base") -> SpeechEncoderConfig:
    """The data2vec 2.0 audio encoder of the same size (spec §8.4): v1's CNN, conv positions and post-LN blocks,
    plus ALiBi with a learned per-head scale; fine-tuning masks fill frames with N(0, 0.01²) noise. Large (8 prenet +
    16 main blocks, here one stack of 24) trains without LayerDrop."""
    if cfg.deepnorm:
        raise ValueError("deepnorm: data2vec 2.0 published no DeepNorm (AudioSet) speech recipe; the audioset preset "
                         "is data2vec 1.0's (objective: v1)")
    large = size == "large"
    return cfg.model_copy(update={"alibi": True, "mask_noise_std": 0.01, **({"layerdrop": 0.0} if large else {})})


def frame_lengths(num_samples: Tensor, conv_layers=BASE_CONV) -> Tensor:
    """Frames produced by the CNN for each input length: L <- floor((L - k) / s) + 1 per conv."""
    lengths = num_samples
    for _, kernel, stride in conv_layers:
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths


def normalize_waveform(wav: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-utterance zero mean, unit variance over the whole waveform (task.normalize=true)."""
    return F.layer_norm(wav.float(), wav.shape[-1:], eps=eps)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, as fairseq's CNN does, so bf16/fp16 autocast cannot lose it."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class ConvLayer(nn.Module):
    """Conv1d (no bias) -> LayerNorm over channels -> GELU (extractor_mode=layer_norm)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride, padding=padding, bias=False)
        self.norm = Fp32LayerNorm(c_out, eps=1e-5)
        nn.init.kaiming_normal_(self.conv.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.norm(self.conv(x).transpose(1, 2)).transpose(1, 2))


class WaveformCNN(nn.ModuleList):
    """wav2vec 2.0's feature extractor: (B, samples) → (B, C, frames). A ModuleList, so checkpoints keep
    fairseq/HF-style keys (feature_extractor.0.conv.weight)."""

    def __init__(self, conv_layers: tuple[tuple[int, int, int], ...]) -> None:
        chans = [1] + [c for c, _, _ in conv_layers]
        super().__init__(ConvLayer(chans[i], c, k, s) for i, (c, k, s) in enumerate(conv_layers))
        self.conv_layers = conv_layers

    @property
    def channels(self) -> int:
        return self.conv_layers[-1][0]

    @property
    def min_samples(self) -> int:
        """The receptive field: shorter inputs give no frame."""
        field = 1
        for _, kernel, stride in reversed(self.conv_layers):
            field = (field - 1) * stride + kernel
        return field

    def num_frames(self, num_samples: Tensor) -> Tensor:
        return frame_lengths(num_samples, self.conv_layers)

    def forward(self, wav: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        x = wav.unsqueeze(1)
        for layer in self:
            x = layer(x)
        return x


class FbankFrontEnd(nn.Module):
    """Log-mel filterbanks (torchaudio), each utterance standardised per mel bin over its own valid frames (CMVN),
    → conv (stride 2) → LayerNorm over channels → GELU: (B, C, frames) at 50 frames/s. Padded frames are zero."""

    def __init__(self, cfg: FbankConfig) -> None:
        super().__init__()
        import torchaudio

        self.cfg = cfg
        self.mel = torchaudio.transforms.MelSpectrogram(cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop,
                                                        n_mels=cfg.n_mels, center=False)
        self.conv = ConvLayer(cfg.n_mels, cfg.channels, cfg.kernel, cfg.stride, padding=cfg.kernel // 2)

    @property
    def channels(self) -> int:
        return self.cfg.channels

    @property
    def min_samples(self) -> int:
        return self.cfg.n_fft

    def mel_frames(self, num_samples: Tensor) -> Tensor:
        # uncentred windows see no sample past an utterance's end, so zero padding changes no valid frame
        return torch.div(num_samples - self.cfg.n_fft, self.cfg.hop, rounding_mode="floor") + 1

    def num_frames(self, num_samples: Tensor) -> Tensor:
        return torch.div(self.mel_frames(num_samples) - 1, self.cfg.stride, rounding_mode="floor") + 1

    def log_mel(self, wav: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, M, F) log-mels with CMVN over each utterance's valid frames (padded frames zero), and the samples
        per utterance."""
        samples = torch.full(wav.shape[:1], wav.shape[1], device=wav.device) if padding_mask is None else \
            (~padding_mask).sum(-1)
        with torch.autocast(wav.device.type, enabled=False):  # a loud frame's power passes fp16's 65504: fp32 mels
            x = (self.mel(wav.float()) + 1e-6).log()  # (B, M, F)
        valid = (torch.arange(x.shape[-1], device=x.device)[None] < self.mel_frames(samples)[:, None]).unsqueeze(1)
        count = valid.sum(-1, keepdim=True)
        mean = (x * valid).sum(-1, keepdim=True) / count
        std = ((((x - mean) * valid) ** 2).sum(-1, keepdim=True) / count + 1e-5).sqrt()
        return (x - mean) / std * valid, samples

    def forward(self, wav: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        x, samples = self.log_mel(wav, padding_mask)
        x = self.conv(x.to(wav.dtype))
        keep = torch.arange(x.shape[-1], device=x.device)[None] < self.num_frames(samples)[:, None]
        return x * keep.unsqueeze(1)


class PositionalConv(nn.Module):
    """Stack of grouped convs (k odd, 'same' padding) -> LN without affine -> GELU; the result is added to x."""

    def __init__(self, dim: int, depth: int, kernel: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"pos_conv_kernel must be odd, got {kernel}")
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
                                   for _ in range(depth))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        h = x.transpose(1, 2)
        for conv in self.convs:
            h = F.gelu(F.layer_norm(conv(h).transpose(1, 2), h.shape[1:2], eps=self.eps).transpose(1, 2))
        return h.transpose(1, 2)


class SpeechEncoder(Encoder):
    # CNN + projection are shared: the teacher reads the student's features; the positional conv is copied (spec §4)
    teacher_shared_prefixes = ("feature_extractor.", "feature_norm.", "feature_proj.", "pos_conv.")
    teacher_reuses_local_features = True
    bert_init_head = False  # fairseq's final_proj sits outside the TransformerEncoder that BERT init reaches

    def __init__(self, cfg: SpeechEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = FbankFrontEnd(cfg.fbank) if cfg.frontend == "fbank" else WaveformCNN(cfg.conv_layers)
        self.feature_norm = nn.LayerNorm(self.feature_extractor.channels, eps=cfg.eps)
        self.feature_proj = nn.Linear(self.feature_extractor.channels, cfg.dim)
        self.mask_emb = nn.Parameter(torch.rand(cfg.dim))  # U(0, 1), as fairseq
        self.pos_conv = PositionalConv(cfg.dim, cfg.pos_conv_depth, cfg.pos_conv_kernel, cfg.pos_conv_groups)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.alibi:  # the slopes are fixed; the per-head scale is learned (init 1, clamped >= 0, no weight decay)
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.num_heads), persistent=False)
            self.alibi_scale = nn.Parameter(torch.ones(cfg.num_heads))
        alpha, beta = deepnorm_constants(cfg.depth) if cfg.deepnorm else (1.0, None)
        self.blocks = nn.ModuleList(
            make_block(cfg.norm_first, cfg.dim, cfg.num_heads, cfg.ffn_dim, "qkv", cfg.eps, cfg.dropout,
                       cfg.attn_dropout, cfg.activation_dropout, residual_scale=alpha)
            for _ in range(cfg.depth)
        )
        # BERT init for the Transformer only: fairseq's data2vec_audio applies it inside its TransformerEncoder, and
        # data2vec 2.0's AudioEncoder resets project_features, so the projection keeps PyTorch's default init.
        # DeepNorm then re-initialises the block weights, as its layer's custom_init follows init_bert_params
        bert_init(self.blocks)
        if beta is not None:
            deepnorm_init(self.blocks, beta)
        self.local_grad_mult = 1.0

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def scale_front_end_grad(self, mult: float) -> None:
        """Scale the gradient reaching the front end (fairseq's `feature_grad_mult`); 0 freezes it, so weight decay
        cannot shrink it either."""
        if not 0.0 <= mult <= 1.0:
            raise ValueError(f"local_grad_mult: expected a value in [0, 1], got {mult}")
        self.local_grad_mult = mult
        self.feature_extractor.requires_grad_(mult > 0)

    def freeze_local_encoder(self) -> None:
        """Keep the front end, its LayerNorm and the projection at their initialisation: a fixed random projection
        of the log-mels (or CNN features), whose rank pretraining then cannot collapse (docs/findings.md, speech)."""
        self.scale_front_end_grad(0.0)
        for module in (self.feature_norm, self.feature_proj):
            module.requires_grad_(False)

    def frame_lengths(self, num_samples: Tensor) -> Tensor:
        """Frames the front end makes of inputs of these lengths."""
        return self.feature_extractor.num_frames(num_samples)

    def frame_padding_mask(self, padding_mask: Tensor | None, num_frames: int) -> Tensor | None:
        if padding_mask is None:
            return None
        lengths = self.frame_lengths((~padding_mask).sum(-1))
        return torch.arange(num_frames, device=padding_mask.device)[None, :] >= lengths[:, None]

    def embed(self, source: Tensor, padding_mask: Tensor | None = None) -> Embedded:
        if source.ndim != 2:
            raise ValueError(f"expected waveforms (B, samples), got {tuple(source.shape)}")
        min_len = self.receptive_field
        if source.shape[1] < min_len:
            raise ValueError(f"waveforms need at least {min_len} samples, got {source.shape[1]}")
        x = scale_grad(self.feature_extractor(source, padding_mask), self.local_grad_mult)
        x = self.feature_proj(self.feature_norm(x.transpose(1, 2)))
        return Embedded(x, self.frame_padding_mask(padding_mask, x.shape[1]))

    @property
    def receptive_field(self) -> int:
        return self.feature_extractor.min_samples

    def encode(self, embedded: Embedded, mask: Tensor | None = None) -> EncoderOutput:
        x, pad = embedded.tokens, embedded.padding_mask
        if mask is not None:
            std = self.cfg.mask_noise_std
            x = replace_masked(x, mask, self.mask_emb if std is None else torch.randn_like(x) * std)
        if pad is not None:
            x = x.masked_fill(pad.unsqueeze(-1), 0.0)  # padded frames are zero before the positional conv
        positions = torch.arange(x.shape[1], device=x.device)[None]
        return self._transformer(x + self.pos_conv(x), pad, positions)

    def encode_visible(self, embedded: Embedded, mask: Tensor, keep: Tensor | None = None) -> EncoderOutput:
        """Masked frames are zeroed before the positional conv (spec §8.4), then dropped."""
        require_unpadded(embedded)
        x = embedded.tokens.masked_fill(mask.unsqueeze(-1), 0.0)
        keep = visible_indices(mask) if keep is None else keep
        return replace(self._transformer(gather_tokens(x + self.pos_conv(x), keep), None, keep), positions=keep)

    def _transformer(self, x: Tensor, pad: Tensor | None, positions: Tensor) -> EncoderOutput:
        """LN + dropout, the blocks (ALiBi distances in original frame units), and the closing LN of pre-LN stacks."""
        x = self.dropout(x if self.cfg.norm_first else self.norm(x))
        bias = None
        if self.cfg.alibi:
            bias = alibi_bias(self.alibi_slopes, positions, self.alibi_scale).to(x.dtype)
        x, hidden, ffn = run_blocks(self.blocks, x, pad, [bias] * len(self.blocks), self.cfg.layerdrop,
                                     self.layerdrop_generator)
        if self.cfg.norm_first:  # wav2vec2 "stable layer norm": the encoder LN closes the pre-LN stack
            x = self.norm(x)
        return EncoderOutput(x, hidden, ffn, padding_mask=pad)


class SpanMaskConfig(StrictModel):
    """wav2vec 2.0 span masking (spec §5.1): p·ℓ = 0.65, spans of 10 frames, equal counts across the batch."""

    prob: float = Field(0.65, gt=0, lt=1)
    length: int = Field(10, ge=1)
    min_masks: int = Field(1, ge=0)
    require_same_masks: bool = True


def span_mask(valid_lengths: list[int], num_frames: int, cfg: SpanMaskConfig, rng: np.random.Generator) -> np.ndarray:
    """(B, T) bool mask, fairseq `compute_mask_indices` (static lengths, no overlap constraint)."""
    rows = []
    for size in valid_lengths:
        num = max(cfg.min_masks, int(cfg.prob * size / cfg.length + rng.random()))
        span = cfg.length
        if size - span <= num:  # too short for that many distinct starts
            span = max(size - num - 1, 0)
        starts = rng.choice(max(size - span, 1), size=min(num, max(size - span, 1)), replace=False)
        idx = (starts[:, None] + np.arange(max(cfg.length, 1))[None, :]).reshape(-1)
        rows.append(np.unique(idx[idx < size]))
    mask = np.zeros((len(valid_lengths), num_frames), dtype=bool)
    fewest = min(len(r) for r in rows)
    for i, idx in enumerate(rows):
        if cfg.require_same_masks and len(idx) > fewest:
            idx = rng.choice(idx, fewest, replace=False)  # subsample frames: spans can develop holes
        mask[i, idx] = True
    return mask


def speech_objective(steps_hint: int = 5000) -> ObjectiveConfig:
    """fairseq base_librispeech (spec §3-§6): FFN taps, K=8, instance norm, τ 0.999→0.9999 over 30k, L2/√D."""
    return ObjectiveConfig(
        top_k=8, target_tap="ffn", layer_norm_targets="instance", final_norm="none", head="linear",
        loss=LossConfig(kind="l2", reduction="sum_over_dim", scale="inv_sqrt_dim"),
        ema=EMAConfig(tau_start=0.999, tau_end=0.9999, tau_steps=30_000),
        collapse=CollapseConfig(warmup_steps=steps_hint, min_local_var=0.01),
    )


def speech_objective_audioset(steps_hint: int = 5000) -> ObjectiveConfig:
    """data2vec 1.0 on AudioSet (spec §2.1, `audio/pretraining/audioset.yaml`): base_librispeech's recipe with all 12
    layers averaged (K=12) and the average layer-normalised (`layer_norm_targets`) after the per-layer instance
    norm; the encoder is the `audioset` preset (DeepNorm)."""
    return speech_objective(steps_hint).model_copy(update={"top_k": 12, "final_norm": "layer"})


def speech_objective_v2(dim: int, steps_hint: int = 5000, size: str = "base") -> ObjectiveConfig:
    """data2vec 2.0 base_audio_only_task (spec §8.5): FFN taps, K=8, IN per layer -> average, L2/√D, 8 clones of
    1-D block masks (50 %, blocks of 5), 4-layer 1-D decoder (half width, k 7, 16 groups, input dropout 0.1),
    τ 0.999 -> 0.99999 over 75k; EMA over everything but the CNN front-end and the decoder.
    large_audio_only_task: K=16 (the main stack after 8 prenet blocks), 12 clones masking 55 % (adjust 0.1), a
    768-wide decoder, τ 0.9997 -> 1 over 300k."""
    large = size == "large"
    decoder_dim = 768 if large else dim // 2
    return ObjectiveConfig(
        top_k=16 if large else 8, target_tap="ffn", layer_norm_targets="instance", final_norm="none",
        loss=LossConfig(kind="l2", reduction="sum_over_dim", scale="inv_sqrt_dim"),
        ema=EMAConfig(tau_start=0.9997, tau_end=1.0, tau_steps=300_000) if large else
        EMAConfig(tau_start=0.999, tau_end=0.99999, tau_steps=75_000),
        collapse=CollapseConfig(warmup_steps=steps_hint, min_local_var=0.01),
        v2=V2Config(clones=12 if large else 8,
                    mask=V2MaskConfig(prob=0.55, length=5, adjust=0.1) if large else
                    V2MaskConfig(prob=0.5, length=5, adjust=0.05),
                    decoder=DecoderConfig(dim=decoder_dim, kernel=7, groups=16 if decoder_dim % 16 == 0 else 1,
                                          layers=4, input_dropout=0.1),
                    teacher_shared_prefixes=("feature_extractor.", "feature_norm.", "feature_proj."),
                    teacher_reads_student_features=True),
    )


class SpeechModality(Modality):
    name = "speech"

    def __init__(self, encoder: SpeechEncoder, mask: SpanMaskConfig) -> None:
        self.encoder, self.mask_cfg = encoder, mask

    def num_frames(self, wav: Tensor) -> int:
        """CNN frames of a (B, samples) batch."""
        return int(self.encoder.frame_lengths(torch.tensor(wav.shape[1])))

    def make_views(self, batch: Batch, rng: np.random.Generator) -> Views:
        wav, pad = batch.source, batch.padding_mask
        num_frames = self.num_frames(wav)
        samples = torch.full((wav.shape[0],), wav.shape[1]) if pad is None else (~pad).sum(-1).cpu()
        valid = self.encoder.frame_lengths(samples).tolist()
        host_mask = span_mask(valid, num_frames, self.mask_cfg, rng)
        mask = from_host(torch.from_numpy(host_mask), wav.device)
        return Views(wav, wav, pad, token_mask=mask, loss_mask=mask,
                     loss_positions=host_positions(host_mask, wav.device))

    def v2_masks(self, batch: Batch, cfg: V2MaskConfig, clones: int, rng: np.random.Generator) -> Tensor:
        """Drawn on the cropped batch (spec §15), so every row hides exactly ⌊T·prob⌋ frames."""
        masks = block_masks(batch.source.shape[0] * clones, (self.num_frames(batch.source),), cfg, rng)
        return torch.from_numpy(masks)
