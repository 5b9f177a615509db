"""Per-tenant store quotas and retention, and what an adapter is charged against them.

`StoreLimits` is the store's settings value; `adapter_bytes` prices a validated adapter from
its value (tensors, config, provenance), so `AdapterStore.publish` can refuse before it writes
anything. Each tenant pays in full for the contents its kept versions reference, whether or not
another tenant's identical upload shares the blob: the price never reveals a dedup.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from adapters.validate import ValidatedAdapter


@dataclass(frozen=True)
class StoreLimits:
    """Per-tenant quotas and retention (settings; each an int >= 1).

    Args:
        max_adapters_per_tenant: live names a tenant may have.
        max_stored_bytes_per_tenant: bytes of the distinct contents a tenant's kept versions
            reference.
        max_versions_kept: versions each name keeps; older ones are dropped at publish and
            their blobs collected later.
    """

    max_adapters_per_tenant: int = 64
    max_stored_bytes_per_tenant: int = 4 << 30
    max_versions_kept: int = 3

    def __post_init__(self):
        for setting in fields(self):
            value = getattr(self, setting.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{setting.name} must be an integer >= 1, got {value!r}")


def adapter_bytes(adapter: ValidatedAdapter) -> int:
    """The bytes a stored adapter is charged: its tensors, plus its config and provenance as JSON."""
    tensors = sum(
        m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in adapter.weights.modules.values()
    )
    config = len(json.dumps(adapter.weights.config))
    provenance = len(json.dumps(adapter.provenance.to_json_dict())) if adapter.provenance else 0
    return tensors + config + provenance
