"""Property: whatever headers, shapes, dtypes, offsets and configs an upload carries, validation
either accepts it or raises an `AdapterError` (a 4xx). Any other exception would be a 500.

The strategies mix well-formed pieces (real module keys, consistent offsets, shapes near the
base's) with hostile ones (zero, 0-d, 2**64 dimensions, unknown dtypes, offsets past the file,
absurd ranks and alphas), so examples reach every stage: header, structure, tensors, bounds.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adapters.base import BaseInfo
from adapters.errors import AdapterError
from adapters.format import CONFIG_FILE, WEIGHTS_FILE
from adapters.safetensors_header import DTYPE_SIZES
from adapters.validate import validate_adapter_dir

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULES = [
    f"model.layers.{layer}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for layer in (0, 1, 5) for p in PROJECTIONS
]
DIMS = st.one_of(
    st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128]),
    st.integers(-3, 200),
    st.sampled_from([2**31 - 1, 2**31, 2**63, 2**64]),
)
NUMBERS = st.one_of(
    st.integers(-5, 100),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1e300, -1e300, 2**64, 1e-300]),
)


def rarely(draw, one_in: int = 8) -> bool:
    """A hostile choice now and then, so most examples get past the first checks."""
    return draw(st.integers(0, one_in - 1)) == one_in - 1  # not 0: hypothesis favours 0


@st.composite
def tensor_key(draw):
    if draw(st.booleans()):
        return f"base_model.model.{draw(st.sampled_from(MODULES))}.lora_{draw(st.sampled_from('AB'))}.weight"
    return draw(st.text(max_size=30))


TINY_IN_OUT = {"q_proj": (64, 64), "v_proj": (64, 32), "down_proj": (128, 64)}  # targeted by GOOD_CONFIG
GOOD_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": sorted(TINY_IN_OUT)}


@st.composite
def plausible_pair(draw) -> list[tuple[str, list]]:
    """lora_A/lora_B keys of one targeted module with shapes near the base's (rank maybe 0)."""
    layer, projection = draw(st.sampled_from([0, 1, 2])), draw(st.sampled_from(sorted(TINY_IN_OUT)))
    path = f"model.layers.{layer}.{'self_attn' if projection[0] in 'qkvo' else 'mlp'}.{projection}"
    in_f, out_f = TINY_IN_OUT[projection]
    r = 4 if not rarely(draw, 16) else draw(st.sampled_from([0, 1, 8]))
    shapes = [[r, in_f], [out_f, r]]
    if rarely(draw, 16):
        shapes[draw(st.integers(0, 1))] = draw(st.lists(DIMS, max_size=3))
    return [(f"base_model.model.{path}.lora_{which}.weight", shape) for which, shape in zip("AB", shapes)]


@st.composite
def weights_file(draw) -> bytes:
    """A safetensors container: consistent entries (offsets follow dtype x shape) or hostile ones."""
    entries, data = {}, b""
    named = [(key, None) for key in draw(st.lists(tensor_key(), max_size=1 if rarely(draw) else 0, unique=True))]
    for pair in draw(st.lists(plausible_pair(), min_size=1, max_size=4)):
        named += pair
    for key, planned in named:
        if key in entries:
            continue
        dtype = (
            draw(st.sampled_from(["F32", "F16", "BF16"]))
            if not rarely(draw, 32)
            else draw(st.one_of(st.sampled_from(sorted(DTYPE_SIZES)), st.text(max_size=4)))
        )
        shape = (
            planned
            if planned is not None and not rarely(draw, 32)
            else draw(st.one_of(st.lists(DIMS, max_size=3), st.just("4x4"), st.just([1.5, 2])))
        )
        size = (
            math.prod(shape) * DTYPE_SIZES.get(dtype, 4)
            if isinstance(shape, list) and all(isinstance(d, int) for d in shape)
            else 0
        )
        if not rarely(draw, 32) and 0 <= size <= 1 << 16:
            offsets = [len(data), len(data) + size]
            # zeros, ~0.01 (F32) / ~0.2 (16-bit), about the float32 limit, NaN
            values = draw(st.sampled_from([b"\x00", b"\x3c", b"\x3c", b"\x3e", b"\x7f", b"\xff"]))
            data += values * size
        else:
            offsets = draw(st.lists(st.one_of(st.integers(-1, 1 << 12), st.just(2**64)), min_size=1, max_size=3))
        entries[key] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    if rarely(draw):
        entries["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), NUMBERS), max_size=2)
        )
    header = json.dumps(entries).encode()
    length = draw(st.integers(0, 2**64 - 1)) if rarely(draw) else len(header)
    return struct.pack("<Q", length) + header + data + (draw(st.binary(max_size=8)) if rarely(draw) else b"")


@st.composite
def config(draw) -> bytes:
    def maybe(usual, hostile):
        return draw(hostile) if rarely(draw) else usual

    targets = maybe(
        sorted(TINY_IN_OUT),
        st.one_of(
            st.lists(st.sampled_from([*PROJECTIONS, *MODULES, "lm_head", ""]), max_size=6),
            st.text(max_size=8),
            st.none(),
        ),
    )
    keys = st.sampled_from([*PROJECTIONS, *MODULES[:3], "x(", ".*"])
    raw = {
        "peft_type": maybe("LORA", st.sampled_from(["IA3", 3])),
        "r": maybe(4, NUMBERS),
        "lora_alpha": draw(st.one_of(st.floats(-1e4, 1e4), NUMBERS)),
        "target_modules": targets,
        "use_rslora": draw(st.sampled_from([False, True])) if not rarely(draw) else "yes",
        "rank_pattern": maybe({}, st.dictionaries(keys, NUMBERS, max_size=3)),
        "alpha_pattern": draw(st.dictionaries(keys, st.one_of(st.floats(-1e4, 1e4), NUMBERS), max_size=2)),
    }
    if rarely(draw):
        raw["layers_to_transform"] = draw(st.one_of(st.lists(st.integers(-1, 4), max_size=3), st.integers(-1, 4)))
    return json.dumps(raw).encode()


@st.composite
def good_weights_file(draw) -> bytes:
    """Consistent pairs for every targeted module of the tiny base (values still drawn)."""
    entries, data = {}, b""
    for layer in (0, 1):
        for projection, (in_f, out_f) in TINY_IN_OUT.items():
            path = f"model.layers.{layer}.{'self_attn' if projection[0] in 'qkvo' else 'mlp'}.{projection}"
            for which, shape in (("A", [4, in_f]), ("B", [out_f, 4])):
                size = math.prod(shape) * 2
                entries[f"base_model.model.{path}.lora_{which}.weight"] = {
                    "dtype": "BF16",
                    "shape": shape,
                    "data_offsets": [len(data), len(data) + size],
                }
                data += draw(st.sampled_from([b"\x00", b"\x3c", b"\x3e"])) * size  # 0, ~0.01, ~0.19
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header + data


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    info = BaseInfo.from_dir(tiny_base_dir)
    info.weight_norms()  # measured once, outside the examples
    return info


def _outcome(base, config: bytes, weights: bytes) -> None:
    directory = Path(tempfile.mkdtemp(prefix="loraswap-property-"))
    try:
        (directory / CONFIG_FILE).write_bytes(config)
        (directory / WEIGHTS_FILE).write_bytes(weights)
        try:
            validate_adapter_dir(directory, base)
            event("accepted")
        except AdapterError as error:
            assert 400 <= error.status < 500 and error.code
            event(error.code)  # shown by --hypothesis-show-statistics: which stages examples reach
    finally:
        shutil.rmtree(directory)


PROPERTY = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(weights=weights_file())
def test_any_weights_file_is_accepted_or_refused_with_an_adapter_error(base, weights):
    _outcome(base, json.dumps(GOOD_CONFIG).encode(), weights)


@PROPERTY
@given(config=config(), weights=good_weights_file())
def test_any_config_is_accepted_or_refused_with_an_adapter_error(base, config, weights):
    _outcome(base, config, weights)
