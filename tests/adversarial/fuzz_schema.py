"""The server's OpenAPI schema made precise enough that fuzzed cases reach the engine.

FastAPI's schema types `messages` as a list of free-form objects and `model` / `name` as any
string, so a fuzzer's cases mostly die in the validators (400/404). `precise_schema` overlays,
on a copy: typed messages (role + content), `model`, `name` and merge sources drawn from real
names, bounded `max_tokens` (so a bounded run stays bounded), the values the server documents
as refused (`n` != 1, `chat_template`, merge `density` / `rank` ranges) pinned to what it
accepts, and a multipart body for uploads.
Everything else (temperature, seed, top_k, stop, weights, densities...) stays as the server
declares it: those are what the fuzz is for.
"""

from __future__ import annotations

import copy

FUZZ_ADAPTERS = ("fuzz-a", "fuzz-b")  # the fuzz tenant's real adapters
FUZZ_NAMES = (*FUZZ_ADAPTERS, "fuzz-merged", "fuzz-new")
MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "cat")

MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["user", "assistant"]},  # system only first: settle_case
        "content": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "\\S"},
    },
    "additionalProperties": False,
}


def precise_schema(schema: dict, base_id: str, max_tokens: int) -> dict:
    schema = copy.deepcopy(schema)
    components = schema["components"]["schemas"]
    models = {"type": "string", "enum": [base_id, *FUZZ_ADAPTERS]}
    messages = {"type": "array", "minItems": 1, "maxItems": 4, "items": MESSAGE}
    tokens = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": max_tokens}, {"type": "null"}]}
    for request in ("ChatCompletionRequest", "TokenizeRequest"):
        properties = components[request]["properties"]
        properties.update(
            model=models,
            messages=messages,
            max_tokens=tokens,
            chat_template={"type": "null"},
            continue_final_message={"type": "boolean", "enum": [False]},
        )
        if "chat_template_kwargs" in properties:
            properties["chat_template_kwargs"] = {"type": "null"}
        if "min_tokens" in properties:
            properties["min_tokens"] = {"type": "integer", "minimum": 0, "maximum": 8}
        if "n" in properties:
            properties["n"] = {"type": "integer", "enum": [1]}
        if "max_completion_tokens" in properties:
            properties["max_completion_tokens"] = tokens
    merge = components["MergeRequest"]["properties"]
    merge["name"] = {"type": "string", "enum": ["fuzz-merged"]}
    merge["method"] = {"type": "string", "enum": list(MERGE_METHODS)}
    merge["density"] = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    merge["rank"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 64}, {"type": "null"}]}
    components["MergeSource"]["properties"]["name"] = {"type": "string", "enum": list(FUZZ_ADAPTERS)}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "name":
                    parameter["schema"] = {"type": "string", "enum": list(FUZZ_NAMES)}
                elif parameter["name"] == "model":
                    parameter["schema"] = models
            if path == "/v1/adapters" and method == "post":
                operation["requestBody"] = {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["name", "files"],
                                "properties": {
                                    "name": {"type": "string", "enum": ["fuzz-new"]},
                                    "files": {
                                        "type": "array",
                                        "maxItems": 3,
                                        "items": {"type": "string", "format": "binary", "maxLength": 4096},
                                    },
                                },
                            }
                        }
                    },
                }
    return schema


def settle_case(case) -> None:
    """Keep a chat/tokenize case on a path the engine runs: end on a user turn, bound tokens."""
    body = case.body if isinstance(case.body, dict) else None
    if body is None or "messages" not in body:
        return
    messages = body["messages"]
    if not messages or messages[-1].get("role") != "user":
        messages.append({"role": "user", "content": "What is the capital of France?"})
    if len(messages) > 1 and messages[0].get("role") == "assistant":
        messages[0]["role"] = "system"  # a conversation may open with a system turn
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 16
