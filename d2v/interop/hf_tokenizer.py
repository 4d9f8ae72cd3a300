"""d2v's SentencePiece text tokenizer as a Hugging Face fast tokenizer (`tokenizer.json` + `tokenizer_config.json`),
so that `AutoTokenizer.from_pretrained` on an exported text model gives the ids d2v trained on: the pieces' ids as
they are (fairseq's layout, <s>=0 <pad>=1 </s>=2 <unk>=3), `<mask>` after the last piece, and RoBERTa's templates
`<s> a </s>` and `<s> a </s></s> b </s>`.

The Unigram model takes SentencePiece's pieces and scores, and its normaliser SentencePiece's own precompiled
character map, read out of the model file. The wire format is parsed here (two nested fields), so neither protobuf
nor sentencepiece's generated module is needed. Built with the `tokenizers` library (a `transformers` dependency).
"""
from __future__ import annotations

import json

from d2v.interop.layouts import InteropError

SPECIAL = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "cls_token": "<s>",
           "sep_token": "</s>", "mask_token": "<mask>"}
# SentencePiece's ModelProto: field 3 = normalizer_spec (NormalizerSpec), whose field 2 = precompiled_charsmap;
# TrainerSpec (field 2) field 3 = model_type (1: unigram)
MODEL_TRAINER_SPEC, MODEL_NORMALIZER_SPEC, NORMALIZER_CHARSMAP, TRAINER_MODEL_TYPE, UNIGRAM = 2, 3, 2, 3, 1


def hf_tokenizer_files(spm_model: bytes, max_length: int) -> dict[str, bytes]:
    """`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` for a d2v SentencePiece model."""
    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    proto = sp.serialized_model_proto()
    trainer = _field(proto, MODEL_TRAINER_SPEC)
    if trainer is None or _field(trainer, TRAINER_MODEL_TYPE, varint=True) not in (None, UNIGRAM):
        raise InteropError("only a unigram SentencePiece model has a Hugging Face Unigram equivalent; this one is "
                           "BPE (SentencePieceConfig.model_type)")
    charsmap = _field(_field(proto, MODEL_NORMALIZER_SPEC) or b"", NORMALIZER_CHARSMAP)
    if [sp.id_to_piece(i) for i in range(4)] != ["<s>", "<pad>", "</s>", "<unk>"]:
        raise InteropError("the SentencePiece model does not have fairseq's <s> <pad> </s> <unk> as ids 0-3")
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())] + [("<mask>", 0.0)]
    tok = Tokenizer(Unigram(vocab, unk_id=3, byte_fallback=False))
    steps = [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(([normalizers.Precompiled(charsmap)] if charsmap else []) + steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.add_special_tokens(sorted(set(SPECIAL.values())))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length, **SPECIAL}
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(config, indent=2).encode(),
            "special_tokens_map.json": json.dumps(SPECIAL, indent=2).encode()}


def _field(message: bytes, number: int, varint: bool = False) -> bytes | int | None:
    """The first value of field `number` in a protobuf message: its bytes (length-delimited) or an integer."""
    i = 0
    while i < len(message):
        key, i = _varint(message, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(message, i)
        elif wire == 2:
            size, i = _varint(message, i)
            value, i = message[i:i + size], i + size
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise InteropError(f"SentencePiece model: unexpected protobuf wire type {wire}")
        if key >> 3 == number and (wire == 0) == varint:
            return value
    return None


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i
