"""The JSON Schema of an inventory file, for editors: autocompletion and underlined mistakes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from restore_flows.inventory.models import InventoryFile


def inventory_schema() -> dict[str, Any]:
    return InventoryFile.model_json_schema(mode="validation")


def render_schema() -> str:
    return json.dumps(inventory_schema(), indent=2, sort_keys=True) + "\n"


def write_schema(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_schema(), encoding="utf-8")
