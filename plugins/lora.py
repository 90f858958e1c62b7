"""Built-in LoRA adapter format: PEFT's (adapter_config.json + adapter_model.safetensors;
tandem.model.lora.PEFTFormat)."""
from __future__ import annotations

from tandem.model.lora import PEFTFormat
from tandem.plugins import hookimpl


@hookimpl
def tandem_adapter_formats(api_version: int):
    return [PEFTFormat]
