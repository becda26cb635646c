"""Refuse to start with default or missing secrets outside development."""

from __future__ import annotations

import logging

from api.keys import count_active_keys
from api.settings import DEFAULT_BOOTSTRAP_TOKEN, ApiSettings
from indexer.errors import InsecureConfigError
from indexer.settings import Settings
from indexer.store.db import Store

log = logging.getLogger(__name__)
MIN_BOOTSTRAP_LEN = 32
DEV_ENVIRONMENTS = ("development", "dev", "test")


def check_startup_safety(settings: Settings, api_settings: ApiSettings, store: Store) -> None:
    """``InsecureConfigError`` in production with a default/short bootstrap token or with no API key at all."""
    token = api_settings.bootstrap_admin_token
    if settings.environment.lower() in DEV_ENVIRONMENTS:
        if token:
            log.warning("a bootstrap admin token is configured: fine for development, refused in production")
        return
    if token is not None and (token == DEFAULT_BOOTSTRAP_TOKEN or len(token) < MIN_BOOTSTRAP_LEN):
        raise InsecureConfigError(
            f"SLEUTH_ENVIRONMENT={settings.environment} with a default or short SLEUTH_BOOTSTRAP_ADMIN_TOKEN: "
            "unset it and create keys with `sleuth keys create NAME --scope admin` (refusing to start)"
        )
    if token is None and count_active_keys(store) == 0:
        raise InsecureConfigError(
            f"SLEUTH_ENVIRONMENT={settings.environment} and no API key exists: nobody could use this server "
            "safely; create one with `sleuth keys create NAME --scope admin` first (refusing to start)"
        )
