"""data2vec 2.0 checkpoints (fairseq `data2vec_multi`) → d2v's v2 encoders (`d2v import`).

No released file can be fetched here, so each fixture is a random state dict in fairseq's key layout, written from
the module tree of `examples/data2vec/models/data2vec2.py` and `modalities/*.py` (spec §8.2, §8.4), and the
reference is a functional forward pass over those keys, written from the same modules without d2v's code: AltBlock
post-LN with a fused qkv and its bias, the modality's context LayerNorm and prenet blocks before the shared blocks,
ALiBi with fairseq's slopes and a clamped per-head scale, MAE's sin-cos table. The imported d2v encoder must give the
reference's block outputs, and its teacher the reference run on the student's front end with the `_ema` weights.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fixtures import mae_sincos
from d2v.cli import main
from d2v.interop import InteropError
from d2v.interop.fairseq import load_fairseq
from d2v.modalities.registry import ENCODERS, encoder_config
from d2v.train.task_model import build_model
from d2v.train.tasks import finetune_config

G = torch.Generator().manual_seed(0)


def rand(*shape, kind="weight"):
    if kind == "norm":
        return 1.0 + 0.2 * torch.randn(shape, generator=G)
    if kind == "bias":
        return 0.2 * torch.randn(shape, generator=G)
    return torch.randn(shape, generator=G) / math.sqrt(math.prod(shape[1:]) or 1)


def norm(prefix, dim):
    return {f"{prefix}weight": rand(dim, kind="norm"), f"{prefix}bias": rand(dim, kind="bias")}


def linear(prefix, out, inp):
    return {f"{prefix}weight": rand(out, inp), f"{prefix}bias": rand(out, kind="bias")}


def alt_block(prefix, dim, ffn):
    return {**norm(f"{prefix}norm1.", dim), **linear(f"{prefix}attn.qkv.", 3 * dim, dim),
            **linear(f"{prefix}attn.proj.", dim, dim), **norm(f"{prefix}norm2.", dim),
            **linear(f"{prefix}mlp.fc1.", ffn, dim), **linear(f"{prefix}mlp.fc2.", dim, ffn)}


def stack(me, dim, ffn, prenet, main):
    sd = {}
    for i in range(prenet):
        sd |= alt_block(f"{me}context_encoder.blocks.{i}.", dim, ffn)
    for i in range(main):
        sd |= alt_block(f"blocks.{i}.", dim, ffn)
    return sd


def decoder(me, dim):  # a 1-layer Decoder1d: dropped on import
    return {f"{me}decoder.blocks.0.0.weight": rand(dim, dim, 3), f"{me}decoder.blocks.0.0.bias": rand(dim),
            f"{me}decoder.proj.weight": rand(dim, dim), f"{me}decoder.proj.bias": rand(dim)}


# ---------------------------------------------------------------- the reference forward pass (fairseq semantics)


def ref_block(sd, p, x, heads, eps, bias=None, pad=None):
    B, T, D = x.shape
    q, k, v = F.linear(x, sd[f"{p}attn.qkv.weight"], sd[f"{p}attn.qkv.bias"]).reshape(
        B, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    attn = (q * (D // heads) ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    if pad is not None:
        attn = attn.masked_fill(pad[:, None, None, :], float("-inf"))
    a = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
    x = x + F.linear(a, sd[f"{p}attn.proj.weight"], sd[f"{p}attn.proj.bias"])
    r = F.layer_norm(x, (D,), sd[f"{p}norm1.weight"], sd[f"{p}norm1.bias"], eps)
    h = F.linear(F.gelu(F.linear(r, sd[f"{p}mlp.fc1.weight"], sd[f"{p}mlp.fc1.bias"])),
                 sd[f"{p}mlp.fc2.weight"], sd[f"{p}mlp.fc2.bias"])
    return F.layer_norm(r + h, (D,), sd[f"{p}norm2.weight"], sd[f"{p}norm2.bias"], eps)


def ref_stack(sd, me, x, heads, eps, prenet, main, bias=None, pad=None):
    """context_encoder (its LayerNorm if any, the prenet blocks), then the shared blocks; every block's output."""
    if f"{me}context_encoder.norm.weight" in sd:
        x = F.layer_norm(x, x.shape[-1:], sd[f"{me}context_encoder.norm.weight"], sd[f"{me}context_encoder.norm.bias"],
                         eps)
    outs = []
    for p in [f"{me}context_encoder.blocks.{i}." for i in range(prenet)] + [f"blocks.{i}." for i in range(main)]:
        x = ref_block(sd, p, x, heads, eps, bias, pad)
        outs.append(x)
    return outs


def alibi_slopes_ref(n):  # the ALiBi paper's get_slopes, which fairseq's get_alibi copies
    def power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + alibi_slopes_ref(2 * closest)[0::2][: n - closest]


# ---------------------------------------------------------------- audio


CONV = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2  # the tiny preset's CNN


def audio_model(dim, heads, prenet, main, ffn=128, pos_depth=2, pos_k=7, groups=4):
    me = "modality_encoders.AUDIO."
    sd, c_in = {}, 1
    for i, (c, k, _) in enumerate(CONV):
        sd[f"{me}local_encoder.conv_layers.{i}.0.weight"] = rand(c, c_in, k)
        sd |= norm(f"{me}local_encoder.conv_layers.{i}.2.1.", c)
        c_in = c
    sd |= norm(f"{me}project_features.1.", c_in) | linear(f"{me}project_features.2.", dim, c_in)
    for j in range(1, pos_depth + 1):  # entry 0 is a TransposeLast
        sd |= {f"{me}relative_positional_encoder.{j}.0.weight": rand(dim, dim // groups, pos_k),
               f"{me}relative_positional_encoder.{j}.0.bias": rand(dim, kind="bias")}
    sd |= norm(f"{me}context_encoder.norm.", dim)
    scale = torch.rand(1, 1, heads, 1, 1, generator=G) + 0.5
    scale[0, 0, 1] = -0.3  # clamped to 0: that head has no ALiBi
    sd[f"{me}alibi_scale"] = scale
    return sd | stack(me, dim, ffn, prenet, main) | decoder(me, dim)


def ref_audio(sd, wav, heads, prenet, main, eps=1e-5):
    me = "modality_encoders.AUDIO."
    x = wav[:, None]
    for i, (c, _, s) in enumerate(CONV):
        x = F.conv1d(x, sd[f"{me}local_encoder.conv_layers.{i}.0.weight"], stride=s)
        x = F.gelu(F.layer_norm(x.transpose(1, 2), (c,), sd[f"{me}local_encoder.conv_layers.{i}.2.1.weight"],
                                sd[f"{me}local_encoder.conv_layers.{i}.2.1.bias"], 1e-5).transpose(1, 2))
    x = F.layer_norm(x.transpose(1, 2), (c,), sd[f"{me}project_features.1.weight"], sd[f"{me}project_features.1.bias"])
    x = F.linear(x, sd[f"{me}project_features.2.weight"], sd[f"{me}project_features.2.bias"])
    h, D = x.transpose(1, 2), x.shape[-1]
    for j in range(1, 100):
        if f"{me}relative_positional_encoder.{j}.0.weight" not in sd:
            break
        w = sd[f"{me}relative_positional_encoder.{j}.0.weight"]
        h = F.conv1d(h, w, sd[f"{me}relative_positional_encoder.{j}.0.bias"], padding=w.shape[-1] // 2,
                     groups=D // w.shape[1])  # odd kernel: SamePad removes nothing
        h = F.gelu(F.layer_norm(h.transpose(1, 2), (D,), eps=1e-5).transpose(1, 2))
    x = x + h.transpose(1, 2)
    pos = torch.arange(x.shape[1])
    slopes = torch.tensor(alibi_slopes_ref(heads)) * sd[f"{me}alibi_scale"].reshape(-1).clamp_min(0)
    bias = -(pos[None] - pos[:, None]).abs()[None].float() * slopes[:, None, None]
    return ref_stack(sd, me, x, heads, eps, prenet, main, bias)


def assert_encoder_matches(kind, cfg, weights, source, reference, atol=2e-5):
    encoder = ENCODERS[kind][1](cfg).eval()
    encoder.load_state_dict(weights)
    with torch.no_grad():
        out = encoder.encode(encoder.embed(*source))
    expected = reference()
    assert len(out.hidden_states) == len(expected) + 1
    for got, want in zip(out.hidden_states[1:], expected):
        if isinstance(source[-1], torch.Tensor) and source[-1].dtype == torch.bool:  # padded text: real tokens only
            got, want = got[~source[-1]], want[~source[-1]]
        assert torch.allclose(got, want, atol=atol), (got - want).abs().max()
    return encoder, out


@pytest.mark.parametrize("dim,heads,prenet,main", [(64, 4, 1, 1), (48, 6, 0, 2)])
def test_v2_audio_checkpoint_and_its_ema_teacher_match_fairseqs_forward(tmp_path, dim, heads, prenet, main):
    me = "modality_encoders.AUDIO."
    model = audio_model(dim, heads, prenet, main)
    teacher = audio_model(dim, heads, prenet, main)  # _ema: everything but the CNN, the projection, the decoder
    ema = {k: v for k, v in teacher.items() if not k.startswith((f"{me}local_encoder.", f"{me}project_features.",
                                                                 f"{me}decoder."))}
    spec = " + ".join(f"[({c}, {k}, {s})]" for c, k, s in CONV)
    args = {"num_heads": heads, "norm_eps": 1e-5, "depth": main, "encoder_dropout": 0.0, "layerdrop": 0.0,
            "modalities": {"audio": {"feature_encoder_spec": spec, "prenet_depth": prenet}}}
    torch.save({"model": {**model, "_ema": ema}, "cfg": {"model": args}}, tmp_path / "base_libri.pt")

    imported = load_fairseq(tmp_path / "base_libri.pt")
    assert (imported.kind, imported.objective, imported.cfg.depth, imported.cfg.num_heads) == ("speech", "v2",
                                                                                              prenet + main, heads)
    assert imported.cfg.alibi and imported.cfg.mask_noise_std == 0.01 and imported.cfg.dropout == 0.0
    wav = torch.randn(2, 3200, generator=G)
    assert_encoder_matches("speech", imported.cfg, imported.student, (wav,),
                           lambda: ref_audio(model, wav, heads, prenet, main))
    assert_encoder_matches("speech", imported.cfg, imported.teacher, (wav,),
                           lambda: ref_audio({**model, **ema}, wav, heads, prenet, main))
    assert torch.equal(imported.student["mask_emb"], torch.zeros(dim))  # v2 has none, and fine-tuning reads noise

    assert main_cli(tmp_path, "base_libri.pt") == ("speech", "tiny" if dim == 64 else "custom", "v2", True)
    if dim == 64:  # the tiny preset: d2v finetune starts from it under objective v2
        ft = build_model(finetune_config("speech_1h", {"preset": "tiny", "objective": "v2",
                                                       "pretrained": str(tmp_path / "final.pt"),
                                                       "letters": str(letters(tmp_path))}))
        assert torch.equal(ft.encoder.blocks[1].attn.qkv.weight, model["blocks.0.attn.qkv.weight"])


def main_cli(tmp_path, name):
    assert main(["import", str(tmp_path / name), str(tmp_path / "final.pt")]) == 0
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    return final["modality"], final["preset"], final["objective"], final["has_teacher"]


def letters(tmp_path):
    from d2v.data.tokenizer import LetterTokenizer

    return LetterTokenizer(["<blank>", "|", *"ETAON"]).save(tmp_path / "letters.json")


def test_v2_fine_tuned_audio_checkpoint_and_bad_audio_inputs():
    model = audio_model(64, 4, 0, 2)
    wrapped = {f"w2v_encoder.w2v_model.{k}": v for k, v in model.items() if ".decoder." not in k}
    wrapped["w2v_encoder.proj.weight"] = torch.randn(32, 64)  # the CTC head: not part of the encoder
    imported = load_fairseq({"model": wrapped})  # no config: 7 layers take wav2vec 2.0's strides, the ALiBi heads
    assert imported.objective == "v2" and imported.teacher is None and imported.cfg.num_heads == 4
    assert imported.cfg.conv_layers == tuple(CONV)

    per_layer = dict(model, **{"modality_encoders.AUDIO.alibi_scale": torch.ones(2, 1, 4, 1, 1)})
    with pytest.raises(InteropError, match="one ALiBi scale per layer"):
        load_fairseq({"model": per_layer})
    with pytest.raises(InteropError, match=r"alibi_scale \(1, 1, 4, 1, 1\): 4 scales for 2 heads"):
        load_fairseq({"model": model, "cfg": {"model": {"num_heads": 2}}})
    with pytest.raises(InteropError, match="no place for: .*blocks.0.attn.adapter.weight"):
        load_fairseq({"model": dict(model, **{"blocks.0.attn.adapter.weight": torch.zeros(1)})})
    with pytest.raises(InteropError, match="exactly one of"):
        load_fairseq({"model": dict(model, **{"modality_encoders.TEXT.local_encoder.embed_tokens.weight":
                                              torch.zeros(8, 64)})})
    with pytest.raises(InteropError, match="holds a data2vec 2.0 AUDIO encoder"):
        load_fairseq({"model": model}, kind="text")
    with pytest.raises(InteropError, match="pre-LN"):
        load_fairseq({"model": dict(model, **{"norm.weight": torch.ones(64), "norm.bias": torch.zeros(64)})})


# ---------------------------------------------------------------- images


def image_model(dim=64, heads=4, prenet=2, main=2, ffn=128, patch=4, grid=8, chans=1, positions=None):
    me = "modality_encoders.IMAGE."
    sd = {f"{me}local_encoder.proj.weight": rand(dim, chans, patch, patch), f"{me}local_encoder.proj.bias":
          rand(dim, kind="bias"), f"{me}extra_tokens": torch.randn(1, 1, dim, generator=G),
          f"{me}fixed_positional_encoder.positions":
              torch.from_numpy(mae_sincos(dim, grid)).float()[None] if positions is None else positions}
    return sd | norm(f"{me}context_encoder.norm.", dim) | stack(me, dim, ffn, prenet, main) | decoder(me, dim)


def ref_image(sd, images, heads, prenet, main, eps=1e-6):
    me = "modality_encoders.IMAGE."
    w = sd[f"{me}local_encoder.proj.weight"]
    x = F.conv2d(images, w, sd[f"{me}local_encoder.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = x + sd[f"{me}fixed_positional_encoder.positions"]
    x = torch.cat([sd[f"{me}extra_tokens"].expand(len(x), -1, -1), x], 1)
    return ref_stack(sd, me, x, heads, eps, prenet, main)


def test_v2_image_checkpoint_pretrained_and_fine_tuned_match_fairseqs_forward(tmp_path, capsys):
    model, teacher = image_model(), image_model()  # images EMA their local encoder too (ema_local_encoder)
    ema = {k: v for k, v in teacher.items() if ".decoder." not in k}
    torch.save({"model": {**model, "_ema": ema}, "cfg": {"model": {"num_heads": 4, "depth": 2}}},
               tmp_path / "base_imagenet.pt")
    imported = load_fairseq(tmp_path / "base_imagenet.pt")
    assert (imported.kind, imported.objective, imported.cfg) == ("image", "v2", encoder_config("image", "tiny", "v2"))
    images = torch.randn(2, 1, 32, 32, generator=G)
    assert_encoder_matches("image", imported.cfg, imported.student, (images,),
                           lambda: ref_image(model, images, 4, 2, 2))
    assert_encoder_matches("image", imported.cfg, imported.teacher, (images,),
                           lambda: ref_image(ema, images, 4, 2, 2))
    assert main_cli(tmp_path, "base_imagenet.pt") == ("image", "tiny", "v2", True)
    assert "--set preset=tiny --set objective=v2" in capsys.readouterr().out  # the hint builds this encoder

    ft = {f"model.{k}": v for k, v in model.items() if ".decoder." not in k}
    ft |= norm("fc_norm.", 64) | linear("head.", 10, 64)
    imported = load_fairseq({"model": ft, "cfg": {"model": {"pretrained_model_args": {"model": {"num_heads": 4}}}}})
    assert imported.cfg.pooling == "mean_ln" and imported.teacher is None
    _, out = assert_encoder_matches("image", imported.cfg, imported.student, (images,),
                                    lambda: ref_image(model, images, 4, 2, 2))
    x = ref_image(model, images, 4, 2, 2)[-1]
    assert torch.allclose(out.pooled, F.layer_norm(x[:, 1:].mean(1), (64,), ft["fc_norm.weight"], ft["fc_norm.bias"],
                                                   1e-6), atol=2e-5)


def test_v2_image_checkpoint_refuses_what_d2v_cannot_hold():
    transposed = torch.from_numpy(mae_sincos(64, 8)).reshape(8, 8, 64).transpose(0, 1).reshape(1, 64, 64).float()
    with pytest.raises(InteropError, match="positions .*not the 2-D sin-cos table"):
        load_fairseq({"model": image_model(positions=transposed)})
    two_tokens = dict(image_model(), **{"modality_encoders.IMAGE.extra_tokens": torch.zeros(1, 2, 64)})
    with pytest.raises(InteropError, match=r"extra_tokens \(1, 2, 64\)"):
        load_fairseq({"model": two_tokens})


# ---------------------------------------------------------------- text


def text_model(vocab=64, dim=64, heads=4, main=3, ffn=128, max_positions=64):
    me = "modality_encoders.TEXT."
    sd = {f"{me}local_encoder.embed_tokens.weight": torch.randn(vocab, dim, generator=G),
          f"{me}local_encoder.embed_positions.weight": torch.randn(max_positions + 2, dim, generator=G)}
    return sd | norm(f"{me}local_encoder.layernorm_embedding.", dim) | stack(me, dim, ffn, 0, main) | decoder(me, dim)


def ref_text(sd, tokens, heads, main, pad_idx=1, eps=1e-5):
    me = "modality_encoders.TEXT."
    not_pad = tokens.ne(pad_idx).long()
    positions = torch.cumsum(not_pad, 1) * not_pad + pad_idx  # fairseq's make_positions
    x = (sd[f"{me}local_encoder.embed_tokens.weight"][tokens]
         + sd[f"{me}local_encoder.embed_positions.weight"][positions])
    x = F.layer_norm(x, x.shape[-1:], sd[f"{me}local_encoder.layernorm_embedding.weight"],
                     sd[f"{me}local_encoder.layernorm_embedding.bias"], 1e-5)
    return ref_stack(sd, me, x, heads, eps, 0, main, pad=tokens.eq(pad_idx))


def test_v2_text_checkpoint_with_its_blocks_only_ema_matches_fairseqs_forward(tmp_path):
    model, teacher = text_model(), text_model()
    ema = {k[len("blocks."):]: v for k, v in teacher.items() if k.startswith("blocks.")}  # ema_encoder_only
    torch.save({"model": {**model, "_ema": ema}, "cfg": {"model": {"num_heads": 4, "norm_eps": 1e-5}}},
               tmp_path / "nlp_base.pt")
    imported = load_fairseq(tmp_path / "nlp_base.pt")
    assert imported.objective == "v2" and imported.cfg.model_dump(exclude={"dropout", "attn_dropout"}) == \
        encoder_config("text", "tiny", "v2").model_dump(exclude={"dropout", "attn_dropout"})
    tokens = torch.randint(4, 64, (2, 10), generator=G)
    tokens[1, 7:] = 1  # padded
    assert_encoder_matches("text", imported.cfg, imported.student, (tokens, tokens.eq(1)),
                           lambda: ref_text(model, tokens, 4, 3))
    assert_encoder_matches("text", imported.cfg, imported.teacher, (tokens, tokens.eq(1)),
                           lambda: ref_text({**model, **{f"blocks.{k}": v for k, v in ema.items()}}, tokens, 4, 3))
    assert main_cli(tmp_path, "nlp_base.pt") == ("text", "tiny", "v2", True)

    # data2vec_text_classification: the encoder under `model.` (decoders and EMA removed), RoBERTa heads beside it
    ft = {f"model.{k}": v for k, v in model.items() if ".decoder." not in k}
    ft |= linear("classification_heads.sst2.dense.", 64, 64) | linear("classification_heads.sst2.out_proj.", 2, 64)
    imported = load_fairseq({"model": ft, "cfg": {"model": {"pretrained_model_args": {"model": {"num_heads": 4}}}}})
    assert (imported.kind, imported.objective, imported.teacher) == ("text", "v2", None)
    assert_encoder_matches("text", imported.cfg, imported.student, (tokens, tokens.eq(1)),
                           lambda: ref_text(model, tokens, 4, 3))

    prenet = dict(model, **{"modality_encoders.TEXT.context_encoder.norm.weight": torch.ones(64)})
    with pytest.raises(InteropError, match="text prenet with its own LayerNorm"):
        load_fairseq({"model": prenet})
