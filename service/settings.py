"""Service configuration: one pydantic-settings class, env prefix UNIADAPTER_."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNIADAPTER_", env_file=None, extra="ignore")

    backbone: str = Field(
        "demo",
        description="Backbone source: 'demo' (embedded), a bundled config name, a transformers-format "
        "folder, or a hub id (needs network).",
    )
    adapters_root: Path | None = Field(
        None, description="Folder of adapter sets: one sub-folder per set name, versions inside."
    )
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N'.")
    dtype: str = Field("auto", description="'auto' (fp16 on CUDA, fp32 on CPU), 'float32', 'float16', 'bfloat16'.")
    host: str = Field("127.0.0.1", description="Address uvicorn binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port uvicorn binds.")
    log_level: str = Field("info", description="Python log level.")
