"""Fuzzing the GGUF validator (operators/gguf_check.py) that stands between a model file and
llama.cpp, which answers a malformed file with a GGML_ASSERT that aborts the process.

In process: random byte edits and truncations of the tiny fixture models, and structured
mutations of every header field (magic, version, tensor and metadata counts, key lengths,
value types, scalar values, array element types, counts and string lengths, tensor dims,
types and offsets; tests/fuzz/gguf_fields.py finds them) give a GGUFInfo or a GGUFError,
nothing else. Through the real commands: a sample of mutated files goes to `sage embed
--model FILE` / `sage generate --model FILE`, which must exit 0 or 69, never die of a signal.

Walking every field of both tiny models through llama.cpp (one fork per file) found files the
validator passed and llama.cpp aborted on (SIGABRT): block_count 0 or huge, a NaN layer-norm
epsilon, an unknown pooling type, a BYTE token in a BERT vocabulary, a 1-D tensor that is not
F32; crashed on (SIGSEGV): a Q8_1 weight; or failed every record on (exit 1, 2): a
context_length of 2**31, or under 8 with absolute positions. The regression tests below keep
each of them at exit 69.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_cli.operators.base import ResourceUnavailable
from sage_cli.operators.gguf_check import GGUFError, GGUFInfo, _parse, check_gguf
from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage
from tests.fixtures.tiny_models import write_tiny_bert, write_tiny_llama
from tests.fuzz.conftest import examples
from tests.fuzz.gguf_fields import Field, current_value, fields, interesting, mutate

_MODELS: dict[str, bytes] = {}


def model_bytes(kind: str) -> bytes:
    """The bytes of a tiny model ("llama" or "bert"), written once per session."""
    if kind not in _MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{kind}.gguf"
            (write_tiny_llama if kind == "llama" else write_tiny_bert)(path)
            _MODELS[kind] = path.read_bytes()
    return _MODELS[kind]


def _field_list(kind: str) -> list[Field]:
    key = f"fields:{kind}"
    if key not in _FIELDS:
        _FIELDS[key] = fields(model_bytes(kind))
    return _FIELDS[key]


_FIELDS: dict[str, list[Field]] = {}
KINDS = st.sampled_from(["llama", "bert"])


def validate(data: bytes) -> GGUFInfo | GGUFError:
    """What the check says about `data`: its info, or the GGUFError (anything else fails)."""
    try:
        info = _parse(memoryview(data), len(data))
    except GGUFError as exc:
        assert str(exc)
        return exc
    if info.n_tensors:
        assert info.data_offset <= info.data_end <= len(data)
    return info


@st.composite
def byte_edits(draw: st.DrawFn) -> bytes:
    data = bytearray(model_bytes(draw(KINDS)))
    header = fields(bytes(data))[-1].offset + 16  # edits mostly in the header
    for _ in range(draw(st.integers(1, 6))):
        limit = header if draw(st.integers(0, 9)) else len(data)
        pos = draw(st.integers(0, limit - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.integers(0, 4)) == 0:
        del data[draw(st.integers(0, len(data) - 1)) :]
    return bytes(data)


@st.composite
def field_mutations(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(KINDS)
    data = model_bytes(kind)
    field = draw(st.sampled_from(_field_list(kind)))
    current = current_value(data, field)
    value = draw(
        st.sampled_from(interesting(field, current)) | st.integers(0, (1 << (8 * field.size)) - 1)
    )
    mutated = mutate(data, field, value)
    if draw(st.integers(0, 5)) == 0:  # and cut it just after the field
        mutated = mutated[: field.offset + field.size + draw(st.integers(0, 16))]
    return field.kind, mutated


@given(byte_edits())
def test_random_byte_edits_are_info_or_gguf_error(data: bytes) -> None:
    validate(data)


@given(field_mutations())
def test_every_header_field_mutated_is_info_or_gguf_error(case: tuple[str, bytes]) -> None:
    _kind, data = case
    validate(data)


@given(st.binary(max_size=64), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_garbage_after_a_valid_magic(tail: bytes, n_tensors: int, n_kv: int) -> None:
    data = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + tail
    result = validate(data)
    if isinstance(result, GGUFInfo):  # only an empty model is a well-formed one this short
        assert result.n_tensors == 0 and not result.metadata


# -- regressions: files the validator passed and llama.cpp aborted on (SIGABRT) -----------------


def _with(kind: str, field_kind: str, value: int, index: int = 0) -> bytes:
    matches = [f for f in _field_list(kind) if f.kind == field_kind]
    return mutate(model_bytes(kind), matches[index], value)


ABORTS = [
    ("bert", "value:bert.block_count", 0, "block_count"),
    ("bert", "value:bert.block_count", 2**31, "block_count"),
    ("bert", "value:bert.attention.layer_norm_epsilon", 0x7FFFFFFF, "finite"),
    ("bert", "value:bert.pooling_type", 7, "pooling_type"),
    ("bert", "element:tokenizer.ggml.token_type", 6, "byte token"),
    ("bert", "ttype:blk.1.layer_output_norm.bias", 1, "not F32"),
    ("bert", "value:bert.context_length", 3, "too short"),
    ("llama", "value:llama.attention.layer_norm_rms_epsilon", 0xFFFFFFFF, "finite"),
    ("llama", "value:llama.context_length", 2**31, "more than llama.cpp can take"),  # exit 1
    ("llama", "ttype:blk.1.ffn_down.weight", 9, "not a weight type"),  # SIGSEGV
]


@pytest.mark.parametrize(("kind", "field_kind", "value", "words"), ABORTS)
def test_files_llama_cpp_aborted_on_are_refused(
    tmp_path: Path, kind: str, field_kind: str, value: int, words: str
) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(_with(kind, field_kind, value))
    with pytest.raises(ResourceUnavailable, match=words):
        check_gguf(path)


def test_token_types_shorter_than_the_vocabulary_are_refused(tmp_path: Path) -> None:
    """llama.cpp reads one token type per token without checking the array's length."""
    path = tmp_path / "model.gguf"
    path.write_bytes(_with("bert", "count:tokenizer.ggml.token_type", 3))
    with pytest.raises(ResourceUnavailable):
        check_gguf(path)


@pytest.mark.model
def test_real_models_still_pass(real_model_dirs: list[Path]) -> None:
    """The new checks do not refuse the models sage ships: both must be installed (a missing
    one fails here, with the fix, instead of leaving nothing to check)."""
    from sage_cli.operators.models import MODELS, locate

    for name, spec in MODELS.items():
        path = locate(name, real_model_dirs)  # ResourceUnavailable (fails) when not installed
        info = check_gguf(path)
        assert info.n_tensors > 0, name
        assert info.architecture == ("llama" if spec.task == "generate" else "bert"), name


# -- the real commands ---------------------------------------------------------------------------


def _run_model(kind: str, path: Path) -> tuple[int, str, bytes]:
    record = ndjson([{"id": "a", "text": "hello world", "prompt": "hi"}])
    env = clean_env(SAGE_CACHE_DIR=str(path.parent / "cache"), SAGE_THREADS="1")
    if kind == "bert":
        args = ["embed", "--model", str(path), "--no-cache"]
    else:
        args = ["generate", "--model", str(path), "--max-tokens", "4", "--no-cache"]
        args += ["--n-ctx", "128"]
    proc = run_sage(*args, input=record, env=env, timeout=120)
    return proc.returncode, proc.stderr.decode("utf-8", "replace"), proc.stdout


def _assert_clean(code: int, err: str, out: bytes) -> None:
    assert code in (0, 69), f"exit {code} (negative: killed by a signal): {err}"
    assert "Traceback" not in err and "SAGE_DEBUG" not in err, err
    if code == 69:
        assert err.count("\n") == 1, err
    else:
        (record,) = parse_ndjson(out)
        assert "embedding" in record or "answer" in record


@given(field_mutations() | byte_edits().map(lambda data: ("bytes", data)))
@settings(max_examples=examples(8))
def test_sage_embed_and_generate_on_mutated_models_exit_0_or_69(case: tuple[str, bytes]) -> None:
    _field_kind, data = case
    kind = "bert" if b"bert.block_count" in data[:4096] else "llama"
    with tempfile.TemporaryDirectory(prefix="fuzz-gguf-") as tmp:
        path = Path(tmp) / "model.gguf"
        path.write_bytes(data)
        _assert_clean(*_run_model(kind, path))


@pytest.mark.parametrize(("kind", "field_kind", "value", "words"), ABORTS[:3])
def test_sage_embed_on_a_file_that_aborted_llama_cpp_is_69(
    tmp_path: Path, kind: str, field_kind: str, value: int, words: str
) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(_with(kind, field_kind, value))
    code, err, _ = _run_model(kind, path)
    assert code == 69 and words in err, err


def _replace(kind: str, old: bytes, new: bytes) -> bytes:
    data = model_bytes(kind)
    assert len(old) == len(new) and data.count(old) == 1
    return data.replace(old, new)


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        (b"{% for message", b"{% for \x12essage", "does not compile"),  # TemplateSyntaxError
        (b"message['role']", b"messige['role']", "does not work"),  # UndefinedError
    ],
)
def test_a_damaged_chat_template_is_69(tmp_path: Path, old: bytes, new: bytes, words: str) -> None:
    """Regression (fuzzing, random header bytes): one changed byte in the chat template made
    every record fail with TemplateSyntaxError or UndefinedError (exit 1)."""
    path = tmp_path / "model.gguf"
    path.write_bytes(_replace("llama", old, new))
    code, err, _ = _run_model("llama", path)
    assert code == 69 and words in err, err


def test_a_misspelt_or_missing_byte_token_is_refused(tmp_path: Path) -> None:
    """Regression (fuzzing): byte fallback looks each byte up as `<0xXX>` with `at()`; with
    `<0x69>` spelt `<0xK9>` the first text holding an `i` aborted llama.cpp (out_of_range)."""
    path = tmp_path / "model.gguf"
    path.write_bytes(_replace("llama", b"<0x69>", b"<0xK9>"))
    with pytest.raises(ResourceUnavailable, match="cannot be decoded"):
        check_gguf(path)
    code, err, _ = _run_model("llama", path)
    assert code == 69, err


def test_a_negative_layer_norm_epsilon_is_refused(tmp_path: Path) -> None:
    """Regression (fuzzing): one flipped sign bit made llama.cpp abort in GGML_ASSERT(eps >= 0)."""
    field = next(f for f in _field_list("bert") if f.kind.endswith("layer_norm_epsilon"))
    value = current_value(model_bytes("bert"), field) | 0x80000000
    path = tmp_path / "model.gguf"
    path.write_bytes(mutate(model_bytes("bert"), field, value))
    with pytest.raises(ResourceUnavailable, match="negative"):
        check_gguf(path)


def test_sentencepiece_without_token_types_still_needs_every_byte_token(tmp_path: Path) -> None:
    """Regression (fuzzing): with the token-type key renamed, a misspelt `<0xE2>` passed the
    check and SentencePiece's byte fallback aborted llama.cpp (unordered_map::at)."""
    data = _replace("llama", b"tokenizer.ggml.token_type\t", b"tokenizer.ggml.token_typf\t")
    path = tmp_path / "model.gguf"
    path.write_bytes(data.replace(b"<0xE2>", b"<0xZ2>"))
    with pytest.raises(ResourceUnavailable, match="no <0xE2>"):
        check_gguf(path)


def test_the_atheris_harness_takes_its_seeds() -> None:
    """tests/fuzz/harness/fuzz_gguf.py (run by `make fuzz`) passes its own seed corpus."""
    from tests.fuzz.harness import fuzz_gguf

    assert fuzz_gguf.SEEDS
    for seed in fuzz_gguf.SEEDS:
        fuzz_gguf.TestOneInput(seed)
