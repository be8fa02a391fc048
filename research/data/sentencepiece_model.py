"""Converts a sentencepiece `.model` file into an equivalent Hugging Face tokenizer.

The `.model` file is a `sentencepiece.ModelProto` protobuf. It is read here with a small
wire-format decoder, so neither the `sentencepiece` package nor its generated protobuf code
is needed. The conversion follows transformers' `convert_slow_tokenizer` (Unigram and BPE
models, byte fallback, the precompiled normalization map, the "▁" whitespace marker).
"""

import struct

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from research.errors import UserError

_UNIGRAM, _BPE = 1, 2
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "▁"  # U+2581, sentencepiece's whitespace marker.

# Field numbers and defaults from sentencepiece_model.proto.
_TRAINER_DEFAULTS = {
    3: _UNIGRAM,  # model_type
    22: 1,  # split_by_whitespace
    35: 0,  # byte_fallback
    40: 0,  # unk_id
    41: 1,  # bos_id
    42: 2,  # eos_id
    43: -1,  # pad_id
}
_NORMALIZER_DEFAULTS = {
    2: b"",
    3: 1,
    4: 1,
}  # precompiled_charsmap, add_dummy_prefix, remove_extra_ws


def to_hf_tokenizer(path: str) -> tuple[tokenizers.Tokenizer, dict]:
    """Reads `path` (a sentencepiece .model file).

    Returns:
      (Hugging Face tokenizer, {"bos_token", "eos_token", "pad_token"} -> piece or None).
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        pieces, trainer, normalizer = _parse_model_proto(data)
    except (IndexError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise UserError(
            f"data.tokenizer_path={path!r} is not a valid sentencepiece model ({e}); give a "
            ".model file written by sentencepiece, or a Hugging Face tokenizer.json."
        ) from None
    model_type = trainer[3]
    if model_type not in (_UNIGRAM, _BPE) or not pieces:
        raise UserError(
            f"data.tokenizer_path={path!r} is a sentencepiece model of type {model_type} with "
            f"{len(pieces)} pieces; only Unigram (1) and BPE (2) models can be converted. Use "
            "a Hugging Face tokenizer.json instead."
        )
    byte_fallback = bool(trainer[35])
    unk_id = trainer[40]

    def piece_or_none(index):
        return pieces[index][0] if 0 <= index < len(pieces) else None

    if model_type == _UNIGRAM:
        model = models.Unigram(
            [(piece, score) for piece, score, _ in pieces], unk_id, byte_fallback
        )
    else:
        vocab = {piece: index for index, (piece, _, _) in enumerate(pieces)}
        model = models.BPE(
            vocab,
            _bpe_merges(vocab),
            unk_token=piece_or_none(unk_id),
            fuse_unk=True,
            byte_fallback=byte_fallback,
        )
    hf_tokenizer = tokenizers.Tokenizer(model)

    charsmap, add_dummy_prefix, remove_extra_whitespaces = (normalizer[k] for k in (2, 3, 4))
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    if remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        hf_tokenizer.normalizer = normalizers.Sequence(steps)
    hf_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPACE,
        prepend_scheme="always" if add_dummy_prefix else "never",
        split=bool(trainer[22]),
    )
    decode_steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_dummy_prefix:
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    hf_tokenizer.decoder = decoders.Sequence(decode_steps)

    special = [piece for piece, _, kind in pieces if kind in (_CONTROL, _UNKNOWN)]
    hf_tokenizer.add_special_tokens(
        [AddedToken(p, special=True, normalized=False) for p in special]
    )
    user_defined = [piece for piece, _, kind in pieces if kind == _USER_DEFINED]
    if user_defined:
        hf_tokenizer.add_tokens([AddedToken(p, normalized=False) for p in user_defined])
    names = {"bos_token": trainer[41], "eos_token": trainer[42], "pad_token": trainer[43]}
    return hf_tokenizer, {name: piece_or_none(index) for name, index in names.items()}


def _bpe_merges(vocab: dict) -> list[tuple[str, str]]:
    """Merges implied by a BPE vocabulary: every split of a piece into two known pieces,
    ordered by the rank of the merged piece (sentencepiece stores no merge list)."""
    merges = []
    for piece, rank in vocab.items():
        for split in range(1, len(piece)):
            left, right = piece[:split], piece[split:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _parse_model_proto(data: bytes):
    """ModelProto -> ([(piece, score, type)], trainer_spec fields, normalizer_spec fields)."""
    pieces = []
    trainer, normalizer = dict(_TRAINER_DEFAULTS), dict(_NORMALIZER_DEFAULTS)
    for number, value in _fields(data):
        if number == 1:
            piece = {1: b"", 2: 0.0, 3: _NORMAL}
            piece.update(_fields(value))
            score = struct.unpack("<f", piece[2])[0] if isinstance(piece[2], bytes) else 0.0
            pieces.append((piece[1].decode("utf-8"), score, piece[3]))
        elif number == 2:
            trainer.update(_fields(value))
        elif number == 3:
            normalizer.update(_fields(value))
    for key in (40, 41, 42, 43):  # int32 ids: negative values arrive as 64-bit varints.
        if trainer[key] >= 2**31:
            trainer[key] -= 2**64
    return pieces, trainer, normalizer


def _fields(data: bytes):
    """Yields (field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(data, position)
        elif wire_type == 1:
            value, position = data[position : position + 8], position + 8
        elif wire_type == 2:
            length, position = _varint(data, position)
            value, position = data[position : position + length], position + length
        elif wire_type == 5:
            value, position = data[position : position + 4], position + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if position > len(data):
            raise ValueError("truncated protobuf message")
        yield number, value


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
