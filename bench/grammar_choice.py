"""Which grammar engine: CPU time per token mask and per compile, on the default base's tokenizer.

`python -m bench.grammar_choice [--base DIR]` measures every engine that is importable among
llguidance, xgrammar and outlines-core: for a few realistic JSON schemas, the compile time and the
CPU time (time.process_time: the machine is shared, wall clock lies) of each per-step mask while
walking a valid instance token by token. It printed the figures the README quotes; llguidance is
the one pinned. Engines that are not installed are reported as such.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMAS = {
    "person": (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"}},
            "required": ["name", "age", "email"],
            "additionalProperties": False,
        },
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org"},
    ),
    "invoice": (
        {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "currency": {"enum": ["EUR", "USD", "GBP"]},
                "lines": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "sku": {"type": "string"},
                            "qty": {"type": "integer"},
                            "price": {"type": "number"},
                        },
                        "required": ["sku", "qty", "price"],
                        "additionalProperties": False,
                    },
                },
                "paid": {"type": "boolean"},
            },
            "required": ["id", "currency", "lines", "paid"],
            "additionalProperties": False,
        },
        {
            "id": "INV-2041",
            "currency": "EUR",
            "lines": [{"sku": "A-1", "qty": 2, "price": 9.5}, {"sku": "B-7", "qty": 1, "price": 120.0}],
            "paid": False,
        },
    ),
    "tool_call": (
        {
            "type": "object",
            "properties": {
                "name": {"const": "get_weather"},
                "arguments": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                    "required": ["city", "unit"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
    ),
}


def _cpu(fn):
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def run_llguidance(tokenizer, schema, instance_ids):
    import llguidance
    import llguidance.hf
    import llguidance.numpy

    lltok, tok_s = _cpu(lambda: llguidance.hf.from_tokenizer(tokenizer))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    matcher, compile_s = _cpu(lambda: llguidance.LLMatcher(lltok, grammar))
    bitmask = llguidance.numpy.allocate_token_bitmask(1, lltok.vocab_size)
    times = []
    for token in instance_ids:
        _, t = _cpu(lambda: llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, 0))
        times.append(t)
        if not matcher.consume_token(token):
            break
    return tok_s, compile_s, times


def run_xgrammar(tokenizer, schema, instance_ids):
    import xgrammar as xgr

    info, tok_s = _cpu(lambda: xgr.TokenizerInfo.from_huggingface(tokenizer))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compiled, compile_s = _cpu(lambda: compiler.compile_json_schema(json.dumps(schema)))
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    times = []
    for token in instance_ids:
        _, t = _cpu(lambda: matcher.fill_next_token_bitmask(bitmask))
        times.append(t)
        if not matcher.accept_token(token):
            break
    return tok_s, compile_s, times


def run_outlines_core(tokenizer, schema, instance_ids):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    def vocabulary():
        byte_decoder = {v: k for k, v in _bytes_to_unicode().items()}
        tokens: dict[bytes, list[int]] = {}
        eos = tokenizer.eos_token_id
        for piece, token_id in tokenizer.get_vocab().items():
            if token_id == eos or piece in tokenizer.all_special_tokens:
                continue
            raw = bytes(byte_decoder[c] for c in piece) if all(c in byte_decoder for c in piece) else piece.encode()
            tokens.setdefault(raw, []).append(token_id)
        return Vocabulary(eos, tokens)

    vocab, tok_s = _cpu(vocabulary)
    regex = build_regex_from_schema(json.dumps(schema))
    index, compile_s = _cpu(lambda: Index(regex, vocab))
    guide = Guide(index)
    times = []
    for token in instance_ids:
        allowed, t = _cpu(lambda: guide.get_tokens())
        times.append(t)
        if token not in allowed:
            break
        guide.advance(token)
    return tok_s, compile_s, times


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character table (byte-level BPE pieces are written in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


ENGINES = {"llguidance": run_llguidance, "xgrammar": run_xgrammar, "outlines-core": run_outlines_core}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="base directory (default: `loraswap base`)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    if args.base is None:
        from adapters.base import resolve_base

        args.base = str(resolve_base())
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    print(f"tokenizer: {args.base} (vocab {len(tokenizer)})")
    print(
        f"{'engine':14} {'schema':10} {'tokenizer s':>11} {'compile ms':>10} {'mask us median':>14} "
        f"{'mask us p90':>11} {'steps':>5}"
    )
    for engine, run in ENGINES.items():
        for name, (schema, instance) in SCHEMAS.items():
            ids = tokenizer(json.dumps(instance, separators=(",", ":")), add_special_tokens=False)["input_ids"]
            try:
                tok_s, compile_s, times = run(tokenizer, schema, ids)
            except ImportError as exc:
                print(f"{engine:14} not installed ({exc})")
                break
            times.sort()
            print(
                f"{engine:14} {name:10} {tok_s:11.2f} {compile_s * 1e3:10.1f} "
                f"{statistics.median(times) * 1e6:14.0f} {times[int(0.9 * (len(times) - 1))] * 1e6:11.0f} "
                f"{len(times):5d}"
            )


if __name__ == "__main__":
    main()
